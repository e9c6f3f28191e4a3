"""`mistral chat`: the interactive session around one engine and one conversation.

On a terminal: a prompt-toolkit prompt (history kept across sessions, Alt+Enter for a new line, completion of slash
commands, a status line) and replies streamed as Markdown with Rich. When stdin or stdout is not a terminal, each
input line is one message (slash commands work too) and replies are plain text on stdout, notes on stderr.
The history logic lives in `conversation.py`; this module owns the terminal.
"""

from __future__ import annotations

import contextlib
import difflib
import io
import os
import subprocess
import sys
import time
import traceback
import unicodedata
from collections.abc import Callable
from dataclasses import fields
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console, ConsoleOptions, RenderResult
from rich.live import Live
from rich.markdown import Markdown

from mistral_cli import __version__
from mistral_cli.errors import MistralError, UsageError
from mistral_cli.options import GenerationOptions, LoadOptions
from mistral_cli.text.conversation import CUT_REASONS, Conversation, Prompt, reply_room

if TYPE_CHECKING:
    from mistral_cli.engine.engine import Engine
    from mistral_cli.hub.models import ModelPaths

COMMANDS: dict[str, tuple[str, str]] = {
    "/help": ("", "show this list"),
    "/exit": ("", "leave (Ctrl-D does too)"),
    "/clear": ("", "forget the conversation; the system prompt stays"),
    "/system": ("[TEXT]", "set the system prompt; alone it shows it, '/system -' removes it"),
    "/set": ("[OPTION VALUE]", "change a generation option; alone it shows them all"),
    "/undo": ("", "drop the last exchange"),
    "/retry": ("", "answer the last message again"),
    "/save": ("[FILE]", "write the conversation as JSON (the `complete --messages` format)"),
    "/load": ("FILE", "continue a saved conversation"),
    "/info": ("", "model, device, context used, speeds"),
}
COMMAND_ALIASES = {"/quit": "/exit", "/bye": "/exit", "/?": "/help", "/reset": "/clear"}
OPTIONS = tuple(f.name for f in fields(GenerationOptions))
KEYS = (
    "Enter sends · Alt+Enter or Esc Enter starts a new line (pasted text is kept whole) · Tab completes · "
    "↑ recalls earlier input · Ctrl-C stops a reply or clears the line · Ctrl-D leaves · "
    "//text sends a message that starts with /"
)
REPAINT_S = 1 / 15  # how often a streaming reply is redrawn: smooth, yet cheap next to the model
# Columns kept free on the right of a streaming reply: where Rich and the terminal disagree on a character's width
# (emoji variants, some scripts' marks), a line Rich thinks fits would wrap and the redraw would repeat lines.
MARGIN = 4


# ------------------------------------------------------------------------------------------------------ helpers


def history_path() -> Path | None:
    """Where input history persists: $MISTRAL_CHAT_HISTORY ("" turns it off), else the user's data folder."""
    env = os.environ.get("MISTRAL_CHAT_HISTORY")
    if env is not None:
        return Path(env).expanduser() if env else None
    from platformdirs import user_data_path  # honours XDG_DATA_HOME

    return user_data_path("mistral-cli") / "chat_history"


def kilo(n: int) -> str:
    """1229 -> "1.2k", 32768 -> "32k": context sizes are powers of two, so k is 1024."""
    if n < 1000:
        return str(n)
    return f"{n / 1024:.1f}".removesuffix(".0") + "k"


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
    return GenerationOptions(**{**current.to_dict(), key: parsed})


def split_markdown(text: str) -> tuple[str, str]:
    """Split streamed Markdown into finished blocks that can be printed for good, and the rest.

    The split is after the last blank line outside a code block; inside a code block taller than that, after its
    last complete line, the block closed in the first part and reopened in the second.
    """
    fence = ""  # the opening line of the code block the text is in, if any
    fence_body = -1  # where the current code block's content starts
    best = in_fence = 0
    pos = 0
    for line in text.splitlines(keepends=True):
        if not line.endswith("\n"):
            break  # the line being written is never finished
        pos += len(line)
        mark = line.lstrip(" ")
        if not fence:
            if mark.startswith(("```", "~~~")):
                fence, fence_body = line, pos
            elif not line.strip():
                best = pos
        elif mark.rstrip() and set(mark.rstrip()) == {fence.lstrip(" ")[0]} and len(mark.rstrip()) >= 3:
            fence = ""
        else:
            in_fence = pos
    if fence and in_fence > max(best, fence_body - 1):
        closing = fence.lstrip(" ")[:3]
        return text[:in_fence] + closing + "\n", fence + text[in_fence:]
    return text[:best], text[best:]


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


# -------------------------------------------------------------------------------------------------------- views


class PlainView:
    """A reply as plain text on stdout, written as it comes (pipes and files)."""

    def __init__(self, notes: Console) -> None:
        self.notes = notes
        self.last = "\n"

    def add(self, text: str) -> None:
        # UTF-8 whatever the locale, as `complete` writes it
        sys.stdout.flush()
        sys.stdout.buffer.write(text.encode("utf-8"))
        sys.stdout.buffer.flush()
        self.last = text

    def end(self, note: str | None) -> None:
        if not self.last.endswith("\n"):
            self.add("\n")
        if note:
            self.notes.print(f"[{note}]", style="yellow", markup=False, highlight=False)


class _EchoOff:
    """Stops the terminal echoing keys (and "^C") while a reply is drawn: they would shift the redrawn lines."""

    def __init__(self) -> None:
        self.saved: list[Any] | None = None
        try:
            import termios
        except ImportError:
            return  # not POSIX
        try:
            fd = sys.stdin.fileno()
            saved = termios.tcgetattr(fd)
            quiet = termios.tcgetattr(fd)
            quiet[3] &= ~(termios.ECHO | getattr(termios, "ECHOCTL", 0))
            termios.tcsetattr(fd, termios.TCSANOW, quiet)
            self.saved = saved
        except (termios.error, OSError, ValueError):
            pass  # stdin is not a terminal

    def restore(self) -> None:
        if self.saved is not None:
            import termios

            termios.tcsetattr(sys.stdin.fileno(), termios.TCSANOW, self.saved)
            self.saved = None


class MarkdownView:
    """A reply rendered as Markdown while it streams.

    Only the unfinished tail is redrawn; finished blocks that would push the tail past the screen are printed for
    good above it, so long replies neither flicker nor lose lines that scrolled away. Text whose width terminals
    disagree on is streamed plainly from there on, as a redraw of it could repeat lines.
    """

    def __init__(self, console: Console, waiting: str) -> None:
        self.console = console
        self.tail = ""
        self.live: Live | None = None
        self.plain = False  # streaming without redraws
        self.ends_line = True
        self.echo = _EchoOff()
        self.status = console.status(waiting, spinner="dots")
        self.status.start()
        self.painted = 0.0

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        if self.tail:
            yield from Markdown(self.tail).__rich_console__(console, self._narrow(options))

    def _narrow(self, options: ConsoleOptions) -> ConsoleOptions:
        return options.update_width(max(options.max_width - MARGIN, 20))

    def add(self, text: str) -> None:
        self.status.stop()
        if not self.plain and _unsure_width(text):
            self.plain = True
            if self.live is not None:
                self.live.stop()  # the tail as it stands stays on screen
        if self.plain:
            self.console.file.write(text.translate(_CONTROLS))
            self.console.file.flush()
            self.ends_line = text.endswith("\n")
            return
        self.tail += text
        if self.live is None:
            self.live = Live(self, console=self.console, auto_refresh=False, transient=False)
            self.live.start()
        now = time.monotonic()
        if now - self.painted >= REPAINT_S:
            self.painted = now
            self._print_finished_blocks()
            self.live.refresh()

    def _print_finished_blocks(self) -> None:
        room = self.console.size.height - 2
        if len(self.console.render_lines(self, pad=False)) <= room:
            return
        head, self.tail = split_markdown(self.tail)
        if head.strip():
            self.console.print(Markdown(head), width=self._narrow(self.console.options).max_width)
            if not self.tail.lstrip(" ").startswith(("```", "~~~")):  # a code block brings its own padding
                self.console.print()

    def end(self, note: str | None) -> None:
        self.status.stop()
        if self.live is not None and self.live.is_started:
            self.live.refresh()
            self.live.stop()
        if self.plain and not self.ends_line:
            self.console.print()
        self.echo.restore()
        if note:
            self.console.print(f"[{note}]", style="yellow", markup=False, highlight=False)
        self.console.print()


# C0 and C1 controls but newline and tab: model text must not move the cursor or send escape sequences.
_CONTROLS = dict.fromkeys([*range(0x09), *range(0x0B, 0x20), *range(0x7F, 0xA0)])


def _unsure_width(text: str) -> bool:
    """Spacing combining marks and joined emoji: Rich and terminals often count their columns differently."""
    return any(ord(c) > 0x2FF and (c == "\u200d" or unicodedata.category(c) == "Mc") for c in text)


# --------------------------------------------------------------------------------------------------------- chat


class Chat:
    """One session: an engine, a conversation, options, and what the user sees of them."""

    def __init__(
        self,
        engine: Engine,
        conversation: Conversation,
        options: GenerationOptions,
        *,
        model: str,
        out: Console,
        notes: Console,
        markdown: bool,
        verbose: bool = False,
        folder: Path | None = None,
    ) -> None:
        self.engine, self.conv, self.opts = engine, conversation, options
        self.model, self.folder = model, folder
        self.out, self.notes = out, notes  # command output; incidental notes (stderr when not interactive)
        self.markdown, self.verbose = markdown, verbose
        self.failures = 0
        self.last_speed: float | None = None  # decode tokens/s of the last reply
        self.last_done: Any = None
        self.last_seed: int | None = None

    # --------------------------------------------------------------------------------------------- input lines

    def handle(self, line: str) -> bool:
        """Act on one input (a message or a slash command); errors are reported here. False means: leave."""
        text = line.strip()
        if not text:
            return True
        try:
            if text.startswith("/") and not text.startswith("//"):
                return self.command(text)
            self.send(text[1:] if text.startswith("//") else text)
        except MistralError as e:
            self.error(str(e))
        except KeyboardInterrupt:
            self.note("Interrupted.")
        except BrokenPipeError:
            raise  # the reader of stdout went away: the session is over
        except Exception as e:  # a bug or an out-of-memory in one turn must not end the session
            self.engine.reset()  # the cache may be half-written; the next turn prefills from scratch
            if isinstance(e, MemoryError) or "out of memory" in str(e).lower():
                self.error("Out of memory: /clear the conversation, or start with a smaller --max-context.")
            else:
                self.error(f"Internal error: {type(e).__name__}: {e}")
            if self.verbose:
                self.notes.print(traceback.format_exc(), markup=False, highlight=False)
        return True

    def note(self, text: str, style: str = "dim") -> None:
        self.notes.print(text, style=style, markup=False, highlight=False)

    def error(self, text: str) -> None:
        self.failures += 1
        self.notes.print(f"error: {text}", style="bold red", markup=False, highlight=False)

    def status_line(self) -> str:
        parts = [self.model, f"{kilo(self.conv.tokens_used())}/{kilo(self.engine.max_context)} tokens"]
        if self.last_speed is not None:
            parts.append(f"{self.last_speed:.1f} tok/s")
        return " · ".join(parts)

    # ---------------------------------------------------------------------------------------------------- turns

    def send(self, text: str) -> None:
        self.reply(self.conv.ask(text, self.engine.max_context, self._room()))

    def _room(self) -> int:
        return reply_room(self.opts.max_tokens, self.engine.max_context)

    def reply(self, prompt: Prompt) -> None:
        """Generate the reply to the last message, streaming it; Ctrl-C keeps what came so far, marked as cut."""
        from mistral_cli.engine.engine import Done

        if prompt.dropped:
            n = len(prompt.dropped)
            self.note(
                f"The context is full: dropped the oldest {_count(n, 'exchange')} "
                f"({prompt.dropped_tokens} tokens) to make room; /save still writes them.",
                style="yellow",
            )
        opts = self.opts.with_seed()  # a random seed per turn unless one is set, so /retry gives a new reply
        self.last_seed = opts.seed
        new = len(prompt.ids) - _common_prefix(self.engine.tokens, prompt.ids)
        waiting = f"reading {new:,} tokens…" if new > 256 else "thinking…"
        view: PlainView | MarkdownView = MarkdownView(self.out, waiting) if self.markdown else PlainView(self.notes)
        parts: list[str] = []
        finish, produced, started = "interrupted", 0, None
        events = self.engine.generate(prompt.ids, opts)
        try:
            for event in events:
                if isinstance(event, Done):
                    self.last_done, finish = event, event.finish_reason
                    continue
                if started is None:
                    started = time.perf_counter()
                produced += event.token >= 0
                if event.text:
                    parts.append(event.text)
                    view.add(event.text)
        except KeyboardInterrupt:
            finish = "interrupted"
        except BaseException:
            finish = "error"
            raise
        finally:
            events.close()
            view.end(CUT_REASONS.get(finish))
            if finish == "error" and not parts:
                self.conv.undo()  # nothing came: as if the message had not been sent
            else:
                self.conv.answer("".join(parts), finish)
            if started is not None and produced > 1:  # the first token comes from the prefill, not a decode step
                self.last_speed = (produced - 1) / (time.perf_counter() - started)
        if self.verbose and finish not in ("interrupted", "error"):
            d = self.last_done
            self.note(
                f"prompt {d.prompt_tokens} tokens, {d.prefilled_tokens} new, read in {d.prefill_s:.2f} s "
                f"({d.prefill_tokens_per_s:.1f} tokens/s); {d.completion_tokens} tokens in {d.decode_s:.2f} s "
                f"({d.decode_tokens_per_s:.1f} tokens/s); finish: {d.finish_reason}"
            )

    # ------------------------------------------------------------------------------------------------- commands

    def command(self, text: str) -> bool:
        name, _, arg = text.partition(" ")
        name = COMMAND_ALIASES.get(name.lower(), name.lower())
        arg = arg.strip()
        if name not in COMMANDS:
            close = difflib.get_close_matches(name, [*COMMANDS, *COMMAND_ALIASES], n=1, cutoff=0.5)
            hint = f"did you mean {COMMAND_ALIASES.get(close[0], close[0])}? " if close else ""
            raise UsageError(
                f"Unknown command {name}; {hint}/help lists the commands (start a message with // to send a /)."
            )
        if name == "/exit":
            return False
        handler: Callable[[str], None] = getattr(self, "cmd_" + name[1:])
        handler(arg)
        return True

    def cmd_help(self, arg: str) -> None:
        width = max(len(f"{n} {a}") for n, (a, _) in COMMANDS.items())
        lines = [f"  {(n + ' ' + a).ljust(width)}  {h}" for n, (a, h) in COMMANDS.items()]
        self.out.print("\n".join(lines), markup=False, highlight=False)
        self.out.print(f"  OPTION is one of {', '.join(OPTIONS)}; 'none' unsets max_tokens, seed, stop.", style="dim")
        self.out.print(f"  {KEYS}", style="dim", markup=False, highlight=False)

    def cmd_clear(self, arg: str) -> None:
        self.conv.clear()
        self.note("Conversation cleared" + (" (the system prompt stays)." if self.conv.system else "."))

    def cmd_system(self, arg: str) -> None:
        if not arg:
            shown = repr(self.conv.system) if self.conv.system else "none"
            self.out.print(f"System prompt: {shown}", markup=False, highlight=False)
            return
        self.conv.system = None if arg == "-" else arg
        what = "removed" if arg == "-" else "set"
        after = (
            f"; the next reply re-reads the conversation ({self.conv.tokens_used()} tokens)"
            if self.conv.exchanges
            else ""
        )
        self.note(f"System prompt {what}{after}.")

    def cmd_set(self, arg: str) -> None:
        name, _, value = arg.partition(" ")
        if not name:
            shown = ", ".join(f"{k}={v!r}" if k == "stop" else f"{k}={v}" for k, v in self.opts.to_dict().items())
            self.out.print(shown, markup=False, highlight=False)
            return
        self.opts = parse_option(name, value, self.opts)
        key = name.lstrip("-").replace("-", "_").lower()
        self.note(f"{key} = {getattr(self.opts, key)!r}")

    def cmd_undo(self, arg: str) -> None:
        gone = self.conv.undo()
        if gone is None:
            self.note("Nothing to undo.")
            return
        self.note(f"Dropped the last exchange ({gone.user[:60]!r}{'…' if len(gone.user) > 60 else ''}).")

    def cmd_retry(self, arg: str) -> None:
        self.reply(self.conv.retry(self.engine.max_context, self._room()))

    def cmd_save(self, arg: str) -> None:
        path = Path(arg).expanduser() if arg else Path(f"chat-{datetime.now():%Y%m%d-%H%M%S}.json")
        metadata = {
            "app": f"mistral-cli {__version__}",
            "model": self.model,
            "options": self.opts.to_dict(),
            "saved": datetime.now().astimezone().isoformat(timespec="seconds"),
        }
        n = self.conv.save(path, metadata)
        self.note(f"Saved {n} messages to {path}.")

    def cmd_load(self, arg: str) -> None:
        if not arg:
            raise UsageError("/load needs a FILE (one written by /save, or any --messages file).")
        self.load(Path(arg).expanduser())

    def load(self, path: Path, system: str | None = None) -> None:
        """Continue the conversation in `path`; `system`, when given, replaces the file's system prompt."""
        self.conv.load(path)
        if system is not None:
            self.conv.system = system or None
        n = len(self.conv.exchanges)
        shown = f"; system prompt {self.conv.system[:60]!r}" if self.conv.system else ""
        self.note(f"Loaded {_count(n, 'exchange')} from {path} ({self.conv.tokens_used()} tokens{shown}).")
        if n:
            last = self.conv.exchanges[-1]
            self.note(f"> {last.user}")
            if last.reply is None:
                self.note("It ends with your message: /retry answers it.")
            elif self.markdown:
                self.out.print(Markdown(last.reply))
                self.out.print()
            else:
                self.note(last.reply, style="")

    def cmd_info(self, arg: str) -> None:
        e, conv = self.engine, self.conv
        dropped = len(conv.archived)
        rows = [
            ("model", f"{self.model}" + (f" ({self.folder})" if self.folder else "")),
            ("device", self.engine.hardware),
            ("context", f"{conv.tokens_used():,} of {e.max_context:,} tokens used"),
            ("cache", f"{len(e.tokens):,} tokens held"),
            ("history", _count(len(conv.exchanges), "exchange") + (f", {dropped} dropped" if dropped else "")),
            ("system", repr(conv.system) if conv.system else "none"),
            ("options", ", ".join(f"{k}={v}" for k, v in self.opts.to_dict().items())),
            ("load", f"{e.load_s:.2f} s"),
        ]
        d = self.last_done
        if d is not None:
            rows.append(
                (
                    "last reply",
                    f"{d.completion_tokens} tokens at {d.decode_tokens_per_s:.1f} tokens/s; read {d.prefilled_tokens} "
                    f"new prompt tokens at {d.prefill_tokens_per_s:.1f} tokens/s; seed {self.last_seed}; "
                    f"finish: {d.finish_reason}",
                )
            )
        hist = history_path()
        rows.append(("input history", str(hist) if hist else "off"))
        width = max(len(k) for k, _ in rows)
        self.out.print("\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows), markup=False, highlight=False)


# -------------------------------------------------------------------------------------------------------- input


def _terminal_reader(chat: Chat) -> Callable[[], str | None]:
    """Reads inputs with a prompt-toolkit prompt; Ctrl-C clears the line, Ctrl-D (None) ends."""
    from prompt_toolkit import PromptSession
    from prompt_toolkit.auto_suggest import AutoSuggestFromHistory
    from prompt_toolkit.completion import Completer, Completion, PathCompleter
    from prompt_toolkit.document import Document
    from prompt_toolkit.history import FileHistory, History, InMemoryHistory
    from prompt_toolkit.key_binding import KeyBindings
    from prompt_toolkit.styles import Style

    class SlashCompleter(Completer):
        paths = PathCompleter(expanduser=True)

        def get_completions(self, document, complete_event):  # type: ignore[no-untyped-def]
            text = document.text_before_cursor
            if not text.startswith("/") or "\n" in text:
                return
            if " " not in text:
                for name, (_, help_text) in COMMANDS.items():
                    if name.startswith(text.lower()):
                        yield Completion(name, -len(text), display_meta=help_text)
                return
            name, _, arg = text.partition(" ")
            if name == "/set" and " " not in arg:
                for option in OPTIONS:
                    if option.startswith(arg.replace("-", "_")):
                        yield Completion(
                            option + " ", -len(arg), display=option, display_meta=repr(getattr(chat.opts, option))
                        )
            elif name in ("/save", "/load"):
                yield from self.paths.get_completions(Document(arg, len(arg)), complete_event)

    class QuietFileHistory(FileHistory):
        def store_string(self, string: str) -> None:
            with contextlib.suppress(OSError):  # a read-only home must not break the chat
                super().store_string(string)

    history: History = InMemoryHistory()
    path = history_path()
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            history = QuietFileHistory(str(path))
        except OSError:
            pass

    keys = KeyBindings()

    @keys.add("enter")
    def _send(event) -> None:  # type: ignore[no-untyped-def]
        buf = event.current_buffer
        if buf.complete_state and buf.complete_state.current_completion:
            buf.apply_completion(buf.complete_state.current_completion)
        else:
            buf.validate_and_handle()

    # Not Ctrl-J: keys typed while a reply streams reach the prompt with Enter as "\n", which must still send.
    @keys.add("escape", "enter")
    def _newline(event) -> None:  # type: ignore[no-untyped-def]
        event.current_buffer.insert_text("\n")

    session: PromptSession[str] = PromptSession(
        history=history,
        multiline=True,
        key_bindings=keys,
        completer=SlashCompleter(),
        complete_while_typing=True,
        auto_suggest=AutoSuggestFromHistory(),
        bottom_toolbar=lambda: " " + chat.status_line() + "  ·  /help  ·  Alt+Enter new line ",
        prompt_continuation=lambda width, line_number, wrapped: "." * (width - 1) + " ",
        style=Style.from_dict({"prompt": "bold"}),
    )

    def read() -> str | None:
        try:
            return session.prompt([("class:prompt", "> ")])
        except KeyboardInterrupt:
            return ""
        except EOFError:
            return None

    return read


def _stdin_reader() -> Callable[[], str | None]:
    """Reads inputs from a pipe or file, one per line (None at the end); bad UTF-8 is replaced, not fatal."""
    stream = io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", errors="replace")

    def read() -> str | None:
        line = stream.readline()
        return line.rstrip("\r\n") if line else None

    return read


# ------------------------------------------------------------------------------------------------------ start-up


def _resolve(model: str, err: Console, interactive: bool) -> ModelPaths:
    """Find the model on disk; on a terminal, offer to download a missing one."""
    from mistral_cli.hub.models import ModelNotFound, resolve_model

    try:
        return resolve_model(model)
    except ModelNotFound as e:
        if not interactive:
            raise
        err.print(str(e), markup=False, highlight=False)
        try:
            answer = input("Download it now? [y/N] ").strip().lower()
        except EOFError:
            answer = ""
        if answer not in ("y", "yes"):
            raise
        done = subprocess.run([sys.executable, "-m", "mistral_cli", *e.command[1:]], stdout=subprocess.DEVNULL)
        if done.returncode != 0:
            raise MistralError(f"The download did not finish; run `{' '.join(e.command)}` to try again.") from None
        return resolve_model(model)


def _load_engine(paths: ModelPaths, err: Console, options: LoadOptions) -> Engine:
    """Load the model, with a spinner and the time spent on a terminal (loading 14 GB takes a while)."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from mistral_cli.engine.load import load_engine
    from mistral_cli.hub.models import human_bytes

    if not err.is_terminal:
        return load_engine(paths.folder, options)
    size = sum(p.stat().st_size for p in paths.weights if p.exists())
    columns = SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn()
    with Progress(*columns, console=err, transient=True) as bar:
        bar.add_task(f"Loading {paths.name} ({human_bytes(size)})", total=None)
        return load_engine(paths.folder, options)


def run_chat(
    *,
    model: str,
    generation: GenerationOptions,
    loading: LoadOptions,
    verbose: bool,
    system: str | None,
    load: Path | None,
) -> None:
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    out = Console(highlight=False)
    out.soft_wrap = not out.is_terminal  # lines in a pipe or file stay whole
    err = Console(stderr=True, highlight=False)
    err.soft_wrap = not err.is_terminal
    paths = _resolve(model, err, interactive)
    engine = _load_engine(paths, err, loading)
    name = paths.folder.name if paths.source == "local" else paths.name
    chat = Chat(
        engine,
        Conversation(engine.tokenizer, system),
        generation,
        model=name,
        out=out,
        notes=out if interactive else err,
        markdown=out.is_terminal,
        verbose=verbose,
        folder=paths.folder,
    )
    if verbose or interactive:
        chat.note(
            f"{name} · {engine.hardware} · {kilo(engine.max_context)} context · loaded in {engine.load_s:.1f} s. "
            "/help lists the commands; Ctrl-D leaves."
        )
    if load is not None:
        chat.load(load, system)
    read = _terminal_reader(chat) if interactive else _stdin_reader()
    while True:
        try:
            line = read()
            if line is None or not chat.handle(line):
                break
        except KeyboardInterrupt:
            continue  # a Ctrl-C just after a reply, before the prompt is back, only stops what was running
    if not interactive and chat.failures:
        raise MistralError(f"{_count(chat.failures, 'input')} failed; see the errors above.")
