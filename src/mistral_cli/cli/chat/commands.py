"""The chat's slash commands: one table of name, arguments, help and the function that runs it, from which `/help`
and the prompt's completion are made."""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mistral_cli import __version__
from mistral_cli.cli import banner
from mistral_cli.errors import MistralError, UsageError
from mistral_cli.options import GENERATION, GenerationOptions, OptionError

if TYPE_CHECKING:
    from mistral_cli.cli.chat.session import Session

OPTIONS = GENERATION  # what /set changes
KEYS = (
    "Enter sends · Alt+Enter or Esc Enter starts a new line (pasted text is kept whole) · Tab completes · "
    "↑ recalls earlier input · Ctrl-C stops a reply or clears the line · Ctrl-D leaves · "
    "//text sends a message that starts with /"
)


@dataclass(frozen=True)
class Command:
    args: str
    help: str
    run: Callable[[Session, str], None] | None  # None: /exit, which the session loop handles


def run(s: Session, text: str) -> bool:
    """Run the slash command in `text`; False when it is /exit."""
    name, _, arg = text.partition(" ")
    name = ALIASES.get(name.lower(), name.lower())
    if name not in COMMANDS:
        close = difflib.get_close_matches(name, [*COMMANDS, *ALIASES], n=1, cutoff=0.5)
        hint = f"did you mean {ALIASES.get(close[0], close[0])}? " if close else ""
        raise UsageError(
            f"Unknown command {name}; {hint}/help lists the commands (start a message with // to send a /)."
        )
    command = COMMANDS[name].run
    if command is None:
        return False
    command(s, arg.strip())
    return True


def _help(s: Session, arg: str) -> None:
    width = max(len(f"{n} {c.args}") for n, c in COMMANDS.items())
    lines = [f"  {(n + ' ' + c.args).ljust(width)}  {c.help}" for n, c in COMMANDS.items()]
    s.out.print("\n".join(lines), markup=False, highlight=False)
    s.out.print(f"  OPTION is one of {', '.join(OPTIONS)}; 'none' unsets max_tokens, seed, stop.", style="dim")
    s.out.print("  /set format json|off, /set schema FILE: replies in JSON; /set verbose on|off: speeds after each "
                "reply.", style="dim")  # fmt: skip
    s.out.print(f"  {KEYS}", style="dim", markup=False, highlight=False)


def _clear(s: Session, arg: str) -> None:
    s.conv.clear()
    s.note("Conversation cleared" + (" (the system prompt stays)." if s.conv.system else "."))


def _system(s: Session, arg: str) -> None:
    if not arg:
        shown = repr(s.conv.system) if s.conv.system else "none"
        s.out.print(f"System prompt: {shown}", markup=False, highlight=False)
        return
    before, s.conv.system = s.conv.system, None if arg == "-" else arg
    try:
        s.conv.check_system(s.engine.max_context, s.room())
    except MistralError:
        s.conv.system = before
        raise
    what = "removed" if arg == "-" else "set"
    after = f"; the next reply re-reads the conversation ({s.conv.tokens_used()} tokens)" if s.conv.exchanges else ""
    s.note(f"System prompt {what}{after}.")


SWITCHES = ("format", "schema", "verbose")  # what /set changes besides the generation options
_ON, _OFF = ("on", "true", "yes", "1"), ("off", "false", "no", "0", "none")


def _set(s: Session, arg: str) -> None:
    name, _, value = arg.partition(" ")
    if not name:
        shown = ", ".join(f"{k}={v!r}" if k == "stop" else f"{k}={v}" for k, v in s.opts.to_dict().items())
        fmt = s.format.origin if s.format else "off"
        s.out.print(f"{shown}, format={fmt}, verbose={'on' if s.verbose else 'off'}", markup=False, highlight=False)
        return
    key, value = name.lower(), value.strip()
    if key == "verbose":
        if value.lower() not in (*_ON, *_OFF):
            raise UsageError("/set verbose takes on or off.")
        s.verbose = value.lower() in _ON
        s.note(f"verbose = {'on' if s.verbose else 'off'}")
        return
    if key in ("format", "schema"):
        _set_format(s, key, value)
        return
    s.opts = parse_option(name, value, s.opts)
    key = name.lstrip("-").replace("-", "_").lower()
    s.note(f"{key} = {getattr(s.opts, key)!r}")


def _set_format(s: Session, key: str, value: str) -> None:
    from mistral_cli.text.output_format import ANY_JSON, schema_format

    if key == "format" and value.lower() in _OFF:
        s.set_format(None)
        s.note("format = off: replies are free text again.")
        return
    if key == "format" and value.lower() != "json":
        raise UsageError("/set format takes json or off; /set schema FILE gives a JSON schema.")
    if key == "schema" and not value:
        raise UsageError("/set schema needs a FILE (or the schema itself, starting with '{').")
    fmt = replace(ANY_JSON, origin="/set format json") if key == "format" else schema_format(value, "/set schema")
    s.set_format(fmt)
    s.note(f"format = {fmt.origin}: every reply is {'a JSON object' if key == 'format' else 'JSON valid against it'}.")


def _continue(s: Session, arg: str) -> None:
    s.reply(s.conv.extend(s.engine.max_context, s.room()), extend=True)


def _models(s: Session, arg: str) -> None:
    from mistral_cli.hub.models import human_bytes, list_local_models

    found = list_local_models()
    if not found:
        s.note("No models on disk; `mistral download` gets one.")
        return
    width = max(len(m.name) for m in found)
    lines = [f"  {'*' if m.folder == s.folder else ' '} {m.name.ljust(width)}  {human_bytes(m.bytes):>9}  {m.folder}"
             for m in found]  # fmt: skip
    s.out.print("\n".join(lines), markup=False, highlight=False)


def _model(s: Session, arg: str) -> None:
    if not arg:
        s.note(f"The model is {s.model}; /models lists those on disk, /model NAME switches.")
        return
    s.switch(arg)


def _undo(s: Session, arg: str) -> None:
    gone = s.conv.undo()
    if gone is None:
        s.note("Nothing to undo.")
        return
    s.note(f"Dropped the last exchange ({gone.user[:60]!r}{'…' if len(gone.user) > 60 else ''}).")


def _retry(s: Session, arg: str) -> None:
    s.reply(s.conv.retry(s.engine.max_context, s.room()))


def _save(s: Session, arg: str) -> None:
    path = Path(arg).expanduser() if arg else Path(f"chat-{datetime.now():%Y%m%d-%H%M%S}.json")
    if path.exists() and not _saved_by_us(path):
        raise UsageError(f"{path} exists and is not a conversation saved by mistral chat; /save to another name.")
    metadata = {
        "app": f"mistral-cli {__version__}",
        "model": s.model,
        "options": s.opts.to_dict(),
        "saved": datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    n = s.conv.save(path, metadata)
    s.note(f"Saved {count(n, 'message')} to {path}.")


def _saved_by_us(path: Path) -> bool:
    """Whether `path` holds a conversation that /save wrote (and may overwrite)."""
    from mistral_cli.text.chat_format import load_conversation

    try:
        app = load_conversation(path)[1].get("app")
    except MistralError:
        return False
    return isinstance(app, str) and app.startswith("mistral-cli")


def _load(s: Session, arg: str) -> None:
    if not arg:
        raise UsageError("/load needs a FILE (one written by /save, or any --messages file).")
    s.load(Path(arg).expanduser())


def _context_row(used: int, max_context: int, about: str = "") -> str:
    if used <= max_context:
        return f"{about}{used:,} of {max_context:,} tokens used"
    return (
        f"full: the history is {about}{used:,} tokens of {max_context:,}; the next message drops the oldest exchanges"
    )


def _info(s: Session, arg: str) -> None:
    e, conv = s.engine, s.conv
    dropped = len(conv.archived)
    history = count(len(conv.exchanges), "exchange") + (f", {dropped} dropped" if dropped else "")
    if s.remote:
        rows = [
            ("model", f"{s.model}, remote: served by {e.url}"),
            ("context", _context_row(conv.tokens_used(), e.max_context, "~") + " (estimated: 3 bytes a token)"),
        ]
    else:
        rows = [
            ("model", f"{s.model}" + (f" ({s.folder})" if s.folder else "")),
            ("device", banner.hardware(e)),
            ("context", _context_row(conv.tokens_used(), e.max_context)),
            ("cache", f"{len(e.tokens):,} tokens held"),
        ]
    rows += [
        ("history", history),
        ("system", repr(conv.system) if conv.system else "none"),
        ("options", ", ".join(f"{k}={v}" for k, v in s.opts.to_dict().items())),
    ]
    if not s.remote:
        rows.append(("load", f"{e.load_s:.2f} s; {e.weights_note}"))
    d = s.last_done
    if d is not None and s.remote:
        rows.append(
            (
                "last reply",
                f"{d.completion_tokens} tokens at {d.decode_tokens_per_s:.1f} tokens/s; first token after "
                f"{d.prefill_s:.2f} s ({d.prompt_tokens} prompt tokens); seed {s.last_seed}; finish: {d.finish_reason}",
            )
        )
    elif d is not None:
        rows.append(
            (
                "last reply",
                f"{d.completion_tokens} tokens at {d.decode_tokens_per_s:.1f} tokens/s; read {d.prefilled_tokens} "
                f"new prompt tokens at {d.prefill_tokens_per_s:.1f} tokens/s; seed {s.last_seed}; "
                f"finish: {d.finish_reason}",
            )
        )
    from mistral_cli.cli.chat.prompt import history_path

    hist = history_path()
    rows.append(("input history", str(hist) if hist else "off"))
    width = max(len(k) for k, _ in rows)
    s.out.print("\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows), markup=False, highlight=False)


COMMANDS: dict[str, Command] = {
    "/help": Command("", "show this list", _help),
    "/exit": Command("", "leave (Ctrl-D does too)", None),
    "/clear": Command("", "forget the conversation; the system prompt stays", _clear),
    "/system": Command("[TEXT]", "set the system prompt; alone it shows it, '/system -' removes it", _system),
    "/set": Command("[OPTION VALUE]", "change a generation option; alone it shows them all", _set),
    "/undo": Command("", "drop the last exchange", _undo),
    "/retry": Command("", "answer the last message again", _retry),
    "/continue": Command("", "go on with the last reply where it stopped (max tokens, Ctrl-C)", _continue),
    "/save": Command("[FILE]", "write the conversation as JSON (the `complete --messages` format)", _save),
    "/load": Command("FILE", "continue a saved conversation", _load),
    "/info": Command("", "model, device (or server), context used, speeds", _info),
    "/models": Command("", "list the models on disk", _models),
    "/model": Command("[NAME]", "switch to another model; the conversation goes on", _model),
}
ALIASES = {"/quit": "/exit", "/bye": "/exit", "/?": "/help", "/reset": "/clear"}


def parse_option(name: str, value: str, current: GenerationOptions) -> GenerationOptions:
    """`/set NAME VALUE` as a new validated GenerationOptions; UsageError with one sentence otherwise."""
    key = name.lstrip("-").replace("-", "_").lower()
    if key not in OPTIONS:
        raise UsageError(f"Unknown option {name!r}; the options are {', '.join(OPTIONS)}.")
    text = value.strip()
    parsed: Any
    if key == "stop":
        parsed = [] if text.lower() in ("", "none", "off") else [text]
    elif text.lower() in ("none", "off", "random") and key in ("max_tokens", "seed"):
        parsed = None
    elif not text:
        raise UsageError(f"/set {key} needs a value.")
    else:
        whole = key in ("max_tokens", "top_k", "seed")
        try:
            parsed = int(text) if whole else float(text)
        except ValueError:
            kind = "a whole number" if whole else "a number"
            raise UsageError(f"{key} needs {kind}, not {text!r}.") from None
    try:
        return GenerationOptions(**{**current.to_dict(), key: parsed})
    except OptionError as e:  # its sentence names the command-line flag; here the option is /set's name for it
        raise UsageError(re.sub(r"--([a-z-]+)", lambda m: m[1].replace("-", "_"), str(e))) from None


def count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"
