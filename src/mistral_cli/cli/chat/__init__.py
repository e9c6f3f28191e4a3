"""`mistral chat`: the interactive session around one engine and one conversation.

On a terminal: a prompt-toolkit prompt (prompt.py) and replies streamed as Markdown with Rich (views.py). When stdin
or stdout is not a terminal, each input line is one message (slash commands work too) and replies are plain text on
stdout, notes on stderr. The session's state and turns are in session.py, the slash commands in commands.py, the
history logic in text/conversation.py; this module starts it all: the model found (or downloaded), loaded, the loop;
or, with --server, the server asked for its model (remote/client.py).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console

from mistral_cli.cli import banner
from mistral_cli.cli import loading as loading_
from mistral_cli.cli.chat import commands
from mistral_cli.cli.chat.prompt import stdin_reader, terminal_reader
from mistral_cli.cli.chat.session import Session, kilo
from mistral_cli.errors import MistralError
from mistral_cli.options import GenerationOptions, LoadOptions
from mistral_cli.text.conversation import Conversation

if TYPE_CHECKING:
    from mistral_cli.engine.engine import Engine
    from mistral_cli.hub.models import ModelPaths
    from mistral_cli.remote.client import RemoteEngine


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
        _download(e.command, err)
        return resolve_model(model)


def run_chat(
    *,
    model: str,
    generation: GenerationOptions,
    loading: LoadOptions,
    verbose: bool,
    system: str | None,
    load: Path | None,
    remote: RemoteEngine | None = None,
) -> None:
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    out = Console(highlight=False)
    out.soft_wrap = not out.is_terminal  # lines in a pipe or file stay whole
    err = Console(stderr=True, highlight=False)
    err.soft_wrap = not err.is_terminal
    engine: Engine | RemoteEngine
    if remote is None:
        paths = _resolve(model, err, interactive)
        engine = loading_.load(paths, loading, err)
        name, folder = (paths.folder.name if paths.source == "local" else paths.name), paths.folder
        where = f"{banner.hardware(engine)} · {kilo(engine.max_context)} context · loaded in {engine.load_s:.1f} s"
    else:
        engine = remote.connect()  # one request: the model, its context, and that the server answers at all
        name, folder = str(engine.model), None
        where = f"{engine.url} · {kilo(engine.max_context)} context"
    chat = Session(
        engine,
        Conversation(engine.tokenizer, system),  # a server's tokenizer is an estimate
        generation,
        model=name,
        out=out,
        notes=out if interactive else err,
        markdown=out.is_terminal,
        verbose=verbose,
        folder=folder,
        loading=loading,
    )
    if verbose or interactive:
        chat.note(f"{name} · {where}. /help lists the commands; Ctrl-D leaves.")
    if verbose and remote is None:
        chat.note(f"Weights: {engine.weights_note}.")
    if load is not None:
        chat.load(load, system)
    chat.conv.check_system(engine.max_context, chat.room())
    read = terminal_reader(chat) if interactive else stdin_reader()
    while True:
        try:
            line = read()
            if line is None or not chat.handle(line):
                break
        except KeyboardInterrupt:
            continue  # a Ctrl-C just after a reply, before the prompt is back, only stops what was running
    if not interactive and chat.failures:
        raise MistralError(f"{commands.count(chat.failures, 'input')} failed; see the errors above.")


def _download(command: list[str], err: Console) -> None:
    """Run `mistral download` (the `command` a missing model names) here, its progress on stderr."""
    from mistral_cli.hub.download import download_hub, download_tar

    name, tar = command[2], "--source" in command
    try:
        if tar:
            download_tar(name, None, console=err, dry_run=False, force=False)
        else:
            download_hub(name, None, None, console=err, dry_run=False, force=False)
    except (MistralError, KeyboardInterrupt) as exc:
        if isinstance(exc, MistralError):
            err.print(f"mistral: error: {exc}", markup=False, highlight=False)
        raise MistralError(f"The download did not finish; run `{' '.join(command)}` to try again.") from None
