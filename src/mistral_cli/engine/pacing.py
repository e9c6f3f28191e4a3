"""How many threads a decode step uses, adapted to the CPU time it gets as other programs start and stop.

At load, `hardware.share_the_cpu` leaves a core to each program already running. A program that starts later (a
browser, a build, an indexer) meets threads that wait for each other at every barrier of every step: the step goes
at the pace of the thread that shares its core, and on 2 cores keeps a quarter to a third of its idle speed, where
one thread alone keeps 55-70% (BENCHMARKS.md, "Sharing the machine"). The pacer times the decode steps in windows:
when a window runs markedly slower than the best window at this thread count, it tries one thread fewer for a
window and keeps whichever count was faster; after some windows at fewer threads it tries one more, so the cores
come back once the other program is gone. A new reply (`begin`) starts with the count chosen at load again: the
pause between two chat turns may have outlasted the other program, and if it did not, the first windows take the
count down again. On an idle machine the steps do not slow down and nothing changes.

The pacer runs where the steps are our kernels' whole-step calls (engine/load.py, engine/quick.py): there a thread
count changes no result, since each output row of a product is computed whole by one thread
(tests/test_kernels.py), so a reply is the same whatever counts it went through. torch's own kernels may split a
sum differently at another count, so a step on them keeps its count. No torch here: the quick path uses it too.
"""

from __future__ import annotations

import statistics
from collections import deque

WINDOW = 8  # decode steps timed together (their median)
HISTORY = 8  # the windows a count's usual pace is the median of
SLOWER = 1.4  # two windows in a row this much slower than the count's usual pace: the CPU is shared now
FASTER = 1.05  # a count tried for a window is kept only if the window was this much faster
RETRY = 16  # windows at fewer threads before one more is tried; doubled after each try that was no faster
RETRY_MOST = 64


class Pacer:
    """The thread count for the next decode steps, from the times of the steps so far (`note`)."""

    def __init__(self, most: int, threads: int | None = None) -> None:
        self.most = most  # the cores: never more threads than these
        self.threads = self.first = min(threads or most, most)
        self.changes: deque[tuple[int, int]] = deque(maxlen=32)  # (steps so far, new count), the latest
        self._times: list[float] = []
        self._usual: dict[int, deque[float]] = {}  # the last windows at each count
        self._slow = 0  # windows in a row markedly slower than usual
        self._trial: tuple[int, float] | None = None  # while a count is tried: the count before, its last window
        self._windows = 0  # windows at this count since it was chosen
        self._retry = RETRY
        self._steps = 0

    def begin(self) -> int:
        """A new reply starts: the thread count for its prompt and first steps. Fewer threads than at load (another
        program was running during the last reply) become the load's count again, which the steps then confirm or
        take down within three windows, instead of the next probe up to RETRY_MOST windows later."""
        self._times.clear()
        self._trial, self._slow = None, 0
        if self.threads < self.first:
            self._set(self.first)
        return self.threads

    def note(self, seconds: float) -> int:
        """One decode step took `seconds`: the thread count for the next steps."""
        self._steps += 1
        self._times.append(seconds)
        if len(self._times) < WINDOW:
            return self.threads
        window = statistics.median(self._times)
        self._times.clear()
        if self._trial is not None:
            before, was = self._trial
            self._trial = None
            if window * FASTER < was:  # kept
                self._history(self.threads).extend([window] * HISTORY)  # its pace now, not an older one
                if self.threads > before:
                    self._retry = RETRY
                return self.threads
            if self.threads > before:  # one more thread was no faster: the other program is still there
                self._retry = min(2 * self._retry, RETRY_MOST)
            else:  # fewer threads were no faster: the slower pace is the count's own now (a longer context, ...)
                self._history(before).extend([was] * HISTORY)
            self._set(before)
            return self.threads
        history = self._history(self.threads)
        usual = statistics.median(history) if history else window
        history.append(window)
        self._slow = self._slow + 1 if window > SLOWER * usual else 0
        self._windows += 1
        if self._slow >= 2 and self.threads > 1:
            self._trial = (self.threads, window)
            self._set(self.threads - 1)
        elif self.threads < self.most and self._windows >= self._retry:
            self._trial = (self.threads, window)
            self._set(self.threads + 1)
        return self.threads

    def summary(self) -> str | None:
        """--verbose's account of the changes, if any."""
        if not self.changes:
            return None
        n, last = len(self.changes), self.changes[-1][0]
        return (f"decode threads adapted {n} time{'s' * (n != 1)} to the CPU time the steps got ({self.first} at the "
                f"start, {self.threads} now; the last change at step {last})")  # fmt: skip

    def _history(self, threads: int) -> deque[float]:
        return self._usual.setdefault(threads, deque(maxlen=HISTORY))

    def _set(self, threads: int) -> None:
        self.threads, self._windows, self._slow = threads, 0, 0
        self.changes.append((self._steps, threads))
