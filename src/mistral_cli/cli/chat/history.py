"""The chat's input history across sessions (the up arrow, suggestions as you type), kept in one file.

The file has prompt-toolkit's `FileHistory` format, so a file written by either reads in both: each entry is a
"# <date>" line followed by its lines, each prefixed with "+". FileHistory appends to the file; a full disk or a
crash then leaves half an entry. Here each new entry rewrites the file through atomic.py (a temporary file and a
rename), after reading it again so that entries from another chat running at the same time are kept; the file keeps
the newest MAX_ENTRIES entries. A history file that cannot be read or written turns the history off for the session,
with one note, and the chat goes on.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterable
from pathlib import Path

from prompt_toolkit.history import History

from mistral_cli import atomic

MAX_ENTRIES = 2000


def parse(text: str) -> list[tuple[str, str]]:
    """The entries of a history file's text, oldest first, as (date line, entry)."""
    entries: list[tuple[str, str]] = []
    stamp, lines = "", []
    for line in text.splitlines():
        if line.startswith("+"):
            lines.append(line[1:])
            continue
        if lines:
            entries.append((stamp, "\n".join(lines)))
        stamp, lines = (line if line.startswith("#") else ""), []
    if lines:
        entries.append((stamp, "\n".join(lines)))
    return entries


def render(entries: Iterable[tuple[str, str]]) -> str:
    return "".join(
        f"\n{stamp or '#'}\n" + "".join(f"+{line}\n" for line in text.split("\n")) for stamp, text in entries
    )


class SafeFileHistory(History):
    """prompt-toolkit history stored in `path`, rewritten whole on each new entry. `warn` is called once, with one
    sentence, when the file turns out to be unusable (history then stays in memory)."""

    def __init__(self, path: Path, warn: Callable[[str], None]) -> None:
        self.path, self.warn = path, warn
        self.usable = True
        super().__init__()
        try:  # read now, so that a note comes before the prompt, not over it
            self.first: list[tuple[str, str]] = self._read()
        except OSError as e:
            self.first = []
            self._give_up(e)

    def _read(self) -> list[tuple[str, str]]:
        try:
            return parse(self.path.read_bytes().decode("utf-8", errors="replace"))
        except FileNotFoundError:
            return []

    def load_history_strings(self) -> Iterable[str]:
        return [text for _, text in reversed(self.first)]  # newest first, as prompt-toolkit wants them

    def store_string(self, string: str) -> None:
        if not self.usable:
            return
        stamp = f"# {datetime.datetime.now()}"
        try:
            entries = [*self._read(), (stamp, string)][-MAX_ENTRIES:]
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic.write_text(self.path, render(entries))
        except OSError as e:
            self._give_up(e)

    def _give_up(self, e: OSError) -> None:
        self.usable = False
        reason = "it is a folder" if self.path.is_dir() else (e.strerror or str(e))
        self.warn(
            f"Input history is off for this session: {self.path} cannot be used ({reason}); "
            "set MISTRAL_CHAT_HISTORY to a file path, or to nothing to turn it off."
        )
