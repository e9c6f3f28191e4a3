"""Where the chat's input comes from: a prompt-toolkit prompt on a terminal (history kept across sessions, Alt+Enter
for a new line, completion of slash commands and options, a status line), else one message per line of stdin."""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from mistral_cli.cli.chat.commands import COMMANDS, OPTIONS, SWITCHES

if TYPE_CHECKING:
    from mistral_cli.cli.chat.session import Session


def history_path() -> Path | None:
    """Where input history persists: $MISTRAL_CHAT_HISTORY ("" turns it off), else the user's data folder."""
    env = os.environ.get("MISTRAL_CHAT_HISTORY")
    if env is not None:
        return Path(env).expanduser() if env else None
    from platformdirs import user_data_path  # honours XDG_DATA_HOME

    return user_data_path("mistral-cli") / "chat_history"


def terminal_reader(chat: Session) -> Callable[[], str | None]:
    """Reads inputs with a prompt-toolkit prompt; Ctrl-C clears the line, Ctrl-D (None) ends."""
    from prompt_toolkit import PromptSession
    from prompt_toolkit.auto_suggest import AutoSuggestFromHistory
    from prompt_toolkit.completion import Completer, Completion, PathCompleter
    from prompt_toolkit.document import Document
    from prompt_toolkit.history import History, InMemoryHistory
    from prompt_toolkit.key_binding import KeyBindings
    from prompt_toolkit.styles import Style

    class SlashCompleter(Completer):
        paths = PathCompleter(expanduser=True)

        def get_completions(self, document, complete_event):  # type: ignore[no-untyped-def]
            text = document.text_before_cursor
            if not text.startswith("/") or "\n" in text:
                return
            if " " not in text:
                for name, command in COMMANDS.items():
                    if name.startswith(text.lower()):
                        yield Completion(name, -len(text), display_meta=command.help)
                return
            name, _, arg = text.partition(" ")
            if name == "/set" and " " not in arg:
                for option in (*OPTIONS, *SWITCHES):
                    if option.startswith(arg.replace("-", "_")):
                        meta = repr(getattr(chat.opts, option)) if option in OPTIONS else ""
                        yield Completion(option + " ", -len(arg), display=option, display_meta=meta)
            elif name in ("/save", "/load") or (name == "/set" and arg.startswith("schema ")):
                path = arg.removeprefix("schema ") if name == "/set" else arg
                yield from self.paths.get_completions(Document(path, len(path)), complete_event)
            elif name == "/model":
                from mistral_cli.hub.models import list_local_models

                for model in list_local_models():
                    if model.name.startswith(arg):
                        yield Completion(model.name, -len(arg), display_meta=str(model.folder))

    history: History = InMemoryHistory()
    path = history_path()
    if path is not None:
        from mistral_cli.cli.chat.history import SafeFileHistory

        history = SafeFileHistory(path, lambda text: chat.note(text, style="yellow"))

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


def stdin_reader() -> Callable[[], str | None]:
    """Reads inputs from a pipe or file, one per line (None at the end); bad UTF-8 is replaced, not fatal."""
    stream = io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", errors="replace")

    def read() -> str | None:
        line = stream.readline()
        return line.rstrip("\r\n") if line else None

    return read
