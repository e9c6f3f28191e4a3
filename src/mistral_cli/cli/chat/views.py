"""How a reply appears while it streams: plain text on stdout for pipes and files, or Markdown redrawn with Rich on a
terminal (finished blocks printed for good, only the unfinished tail redrawn)."""

from __future__ import annotations

import sys
import threading
import time
import unicodedata
from typing import TYPE_CHECKING, Any

from rich.console import Console, ConsoleOptions, RenderResult
from rich.live import Live
from rich.markdown import Markdown

if TYPE_CHECKING:
    from mistral_cli.model.prepared_files import ReadAhead

REPAINT_S = 1 / 15  # how often a streaming reply is redrawn: smooth, yet cheap next to the model
# Columns kept free on the right of a streaming reply: where Rich and the terminal disagree on a character's width
# (emoji variants, some scripts' marks), a line Rich thinks fits would wrap and the redraw would repeat lines.
MARGIN = 4


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

    def __init__(
        self, console: Console, waiting: str, *, plain: bool = False, reading: ReadAhead | None = None
    ) -> None:
        """reading: a mapped prepared file still being read from disk, whose bytes the waiting line shows meanwhile."""
        self.console = console
        self.tail = ""
        self.live: Live | None = None
        self.plain = plain  # streaming without redraws (and without Markdown: the text as it is)
        self.ends_line = True
        self.echo = _EchoOff()
        self.status = console.status(waiting, spinner="dots")
        self.status.start()
        self.painted = 0.0
        self.waited = threading.Event()  # set once the reply starts or ends
        if reading is not None and not reading.finished.is_set():
            threading.Thread(target=self._show_reading, args=(reading, waiting), daemon=True).start()

    def _show_reading(self, reading: ReadAhead, waiting: str) -> None:
        """The waiting line with the bytes of the weights read so far, until they are all read or the reply starts."""
        while not reading.finished.wait(0.2) and not self.waited.is_set():
            self.status.update(f"reading the weights from disk: {reading.done / 1e9:.1f}/{reading.total / 1e9:.1f} GB "
                               f"({reading.done / max(reading.total, 1):.0%})…")  # fmt: skip
        if not self.waited.is_set():
            self.status.update(waiting)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        if self.tail:
            yield from Markdown(self.tail).__rich_console__(console, self._narrow(options))

    def _narrow(self, options: ConsoleOptions) -> ConsoleOptions:
        return options.update_width(max(options.max_width - MARGIN, 20))

    def add(self, text: str) -> None:
        self.waited.set()
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
        self.waited.set()
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
