"""Loading a model as both `chat` and `complete` show it: on a terminal, a bar with the bytes read and a percentage
while the checkpoint is read (mapping prepared weights is too quick to show); then the warning, when the prepared
weights could not be written, on every run until that is fixed or switched off. `reading_shown`: the same bar while a
mapped file not yet in memory is read from disk ahead of the first pass."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from rich.console import Console

from mistral_cli.errors import UsageError

if TYPE_CHECKING:
    from mistral_cli.engine.engine import Engine
    from mistral_cli.hub.models import ModelPaths
    from mistral_cli.model.prepared_files import ReadAhead
    from mistral_cli.options import LoadOptions

# A mapped file still being read this long after the mapping is coming from disk: the bar shows from then on (one
# already in memory is through in a few hundredths of a second, and shows nothing).
READING_SHOWN_AFTER = 0.3


def load(paths: ModelPaths, options: LoadOptions, err: Console) -> Engine:
    if options.device in ("auto", "cpu"):
        from mistral_cli.hardware import share_the_cpu

        share_the_cpu()  # before torch is imported
    from mistral_cli.engine.load import load_engine

    if options.compile:
        from mistral_cli.cli.info import detect_device

        device = detect_device(options.device)[0]
        if device != "cuda":  # refused before the load: the compiling would come at the first token
            raise UsageError(
                f"--compile is for cuda (it compiles the GPU's decode step), not {device}: there it would take half "
                "a minute to build a step slower than ours; leave it out."
            )

    if not err.is_terminal:
        engine = load_engine(paths.folder, options)
    else:
        size = sum(p.stat().st_size for p in paths.weights if p.exists())
        with _bytes_bar(err) as bar:
            task = bar.add_task(f"Loading {paths.name}", total=size)
            engine = load_engine(paths.folder, options, lambda done: bar.update(task, completed=done * size))
    if engine.weights_warning:
        err.print(f"mistral: warning: {engine.weights_warning}", style="yellow", markup=False, highlight=False,
                  soft_wrap=True)  # fmt: skip
    return engine


@contextmanager
def reading_shown(reading: ReadAhead | None, err: Console) -> Iterator[Callable[[], None]]:
    """On a terminal, a bar with the bytes of a mapped prepared file read from disk so far, while it is read ahead of
    the first pass; yields the call that takes the bar down, to be made before the reply's first text (and made on
    leaving)."""
    if reading is None or not err.is_terminal:
        yield lambda: None
        return
    stop = threading.Event()

    def show() -> None:
        if reading.finished.wait(READING_SHOWN_AFTER) or stop.is_set():
            return
        with _bytes_bar(err) as bar:
            task = bar.add_task("Reading the weights from disk", total=reading.total, completed=reading.done)
            while not stop.is_set() and not reading.finished.wait(0.1):
                bar.update(task, completed=reading.done)

    shower = threading.Thread(target=show, name="reading-shown", daemon=True)
    shower.start()

    def take_down() -> None:
        stop.set()
        shower.join()

    try:
        yield take_down
    finally:
        take_down()


def _bytes_bar(err: Console) -> Any:
    """A transient Rich bar of bytes: description, bar, bytes done/total, percentage, time elapsed."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

    columns = (
        TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TaskProgressColumn(), TimeElapsedColumn()
    )  # fmt: skip
    return Progress(*columns, console=err, transient=True)
