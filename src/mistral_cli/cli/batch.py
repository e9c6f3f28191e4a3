"""`mistral complete --batch FILE.jsonl`: many prompts through one model load, one JSON line out per line in.

Each input line is an object: `prompt` (raw text, or one user turn with `instruct`) or `messages` (a conversation),
an optional `id`, and any of the run's options (the generation options by their names, `instruct`, `system`,
`logprobs`, `response_format`), which override the command line's for that line. Each output line is what
`complete --json` prints for it, plus the `id` (the line's number, from 1, when it has none); a line that cannot run
gets `{"id", "error"}` and the batch goes on, ending with exit status 1.

With `--resume OUT.jsonl` the results are appended to OUT.jsonl instead of stdout, one whole line at a time, and the
ids already answered there (without an error) are skipped: a batch cut by Ctrl-C, a crash or a reboot goes on where
it stopped. A torn last line (a crash in the middle of a write) is cut off first.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from mistral_cli.errors import MistralError, UsageError
from mistral_cli.options import GENERATION, GenerationOptions, LoadOptions, OptionError
from mistral_cli.userfiles import read_bounded

RUN_KEYS = ("instruct", "system", "logprobs", "response_format")
# Lines decoded together at most: where one product over several rows beats one row at a time (a GPU, bf16 or fp32
# weights on a CPU), 8 rows cost about what 2 do (BENCHMARKS.md, "Batch decoding"); lines with an output format or
# log-probabilities run alone.
BATCH = 8
MAX_FILE_BYTES = 1 << 30  # the input is read whole (for the progress bar's total): refuse what is surely a mistake


class LineError(Exception):
    """A line that cannot run: its sentence goes in its error object."""


def run_batch(
    *,
    source: Path,
    resume: Path | None,
    model: str,
    generation: GenerationOptions,
    loading: LoadOptions,
    verbose: bool,
    instruct: bool,
    system: str | None,
    output_format: Any,
    logprobs: int | None,
) -> None:
    from mistral_cli.cli.complete import _load

    lines = _read_lines(source)
    done_ids = _answered(resume) if resume is not None else set()
    todo = [(n, text) for n, text in enumerate(lines, start=1) if text.strip()]
    defaults = {"instruct": instruct, "system": system, "logprobs": logprobs, "format": output_format}
    engine = _load(model, loading, verbose)
    out = _open_output(resume)
    failures = written = skipped = 0
    grammars: dict[tuple[str, str], Any] = {}
    progress = _Progress(len(todo))
    group: list[_Job] = []  # lines waiting to be decoded together

    def emit(result: dict[str, Any]) -> None:
        nonlocal failures, written
        failures += "error" in result
        with _deferred_interrupt():  # a line is whole or absent, even when Ctrl-C comes during its write
            out.write(json.dumps(result, ensure_ascii=False) + "\n")
            out.flush()
        written += 1
        progress.advance(result.get("usage", {}).get("completion_tokens", 0))

    def flush() -> None:
        for result in _run_group(engine, model, group):
            emit(result)
        group.clear()

    try:
        for n, text in todo:
            job = _prepare(engine, n, text, generation, defaults, grammars, done_ids)
            if job is None:
                skipped += 1
                progress.advance(0)
            elif isinstance(job, dict):
                flush()
                emit(job)
            elif engine.batches() and job.constraint is None and job.logprobs is None:
                group.append(job)
                if len(group) == BATCH:
                    flush()
            else:
                flush()
                emit(_run_one(engine, model, job))
        flush()
    except KeyboardInterrupt:
        if resume is not None:
            progress.close()
            sys.stderr.write(f"mistral: {written} lines written to {resume}; the same command goes on from there.\n")
        raise
    finally:
        progress.close()
        if out is not sys.stdout:
            out.close()
    if verbose or skipped:
        answered = f", {skipped} already answered in {resume}" if resume is not None else ""
        sys.stderr.write(f"mistral: {written} lines written{answered}, {failures} failed.\n")
    if failures:
        raise MistralError(f"{failures} of {len(todo)} lines failed; their error objects are in the output.")


@dataclass
class _Job:
    """A line ready to run."""

    ident: Any
    ids: list[int]
    options: GenerationOptions
    raw: bool  # a raw continuation: its first space is a real one
    constraint: Any
    logprobs: int | None


def _prepare(
    engine: Any, n: int, text: str, generation: GenerationOptions, defaults: dict[str, Any],
    grammars: dict[tuple[str, str], Any], done_ids: set[str],
) -> _Job | dict[str, Any] | None:  # fmt: skip
    """Line `n` ready to run, or its error object, or None when its id is already answered."""
    from mistral_cli.cli.complete import _prompt_ids, read_line_messages

    ident: Any = n
    try:
        try:
            item = json.loads(text)
        except json.JSONDecodeError as e:
            raise LineError(f"line {n} is not valid JSON: {e.msg} at column {e.colno}.") from None
        except RecursionError:
            raise LineError(f"line {n} is nested too deeply.") from None
        if not isinstance(item, dict):
            raise LineError(f"line {n} must be a JSON object with a prompt or messages.")
        ident = item.get("id", n)
        if not isinstance(ident, (str, int)) or isinstance(ident, bool):
            ident = n
            raise LineError(f"line {n}: id must be a string or an integer.")
        if _key(ident) in done_ids:
            return None
        unknown = sorted(set(item) - {"id", "prompt", "messages", *GENERATION, *RUN_KEYS})
        if unknown:
            raise LineError(f"line {n}: unknown field {unknown[0]!r}.")
        opts = _options(item, generation, n).with_seed()
        run = {**defaults, **{k: item[k] for k in RUN_KEYS if k in item}}
        fmt = _format(item, run["format"], n)
        top = run["logprobs"]
        if top is not None and (not isinstance(top, int) or isinstance(top, bool) or not 0 <= top <= 20):
            raise LineError(f"line {n}: logprobs must be an integer from 0 to 20, not {json.dumps(top)}.")
        prompt, messages = item.get("prompt"), item.get("messages")
        if (prompt is None) == (messages is None):
            raise LineError(f"line {n} needs a prompt or messages (one of them).")
        if prompt is not None and (not isinstance(prompt, str) or not prompt.strip()):
            raise LineError(f"line {n}: prompt must be a non-empty string.")
        instruct = bool(run["instruct"]) or run["system"] is not None
        conversation = read_line_messages(messages, f"line {n}") if messages is not None else None
        ids = _prompt_ids(engine, prompt, conversation, opts, instruct=instruct, system=run["system"], truncate=False)
        constraint = None
        if fmt is not None:
            key = (fmt.kind, fmt.source)
            if key not in grammars:
                from mistral_cli.engine.grammar import Grammar

                grammars[key] = Grammar(engine.tokenizer, fmt)  # compiled once for all the lines that use it
            constraint = grammars[key].matcher()
        return _Job(ident, ids, opts, conversation is None and not instruct, constraint, top)
    except (LineError, MistralError) as e:
        return {"id": ident, "error": str(e)}


def _run_one(engine: Any, model: str, job: _Job) -> dict[str, Any]:
    from mistral_cli.cli.complete import _json_result

    try:
        events = engine.generate(job.ids, job.options, leading_space=job.raw, constraint=job.constraint,
                                 logprobs=job.logprobs)  # fmt: skip
        done = [e for e in events if not hasattr(e, "token")][-1]
    except MistralError as e:
        return {"id": job.ident, "error": str(e)}
    return {"id": job.ident, **_json_result(done, engine, model, job.options)}


def _run_group(engine: Any, model: str, group: list[_Job]) -> list[dict[str, Any]]:
    """Lines decoded together, one product over all of them per step (engine.generate_many), in their order."""
    from mistral_cli.cli.complete import _json_result

    if len(group) < 2:
        return [_run_one(engine, model, job) for job in group]
    try:
        dones = engine.generate_many([j.ids for j in group], [j.options for j in group],
                                     leading_space=[j.raw for j in group])  # fmt: skip
    except MistralError as e:
        return [{"id": j.ident, "error": str(e)} for j in group]
    return [{"id": j.ident, **_json_result(d, engine, model, j.options)} for j, d in zip(group, dones, strict=True)]


def _options(item: dict[str, Any], generation: GenerationOptions, n: int) -> GenerationOptions:
    values = generation.to_dict()
    for key in GENERATION:
        if key in item:
            value = item[key]
            if key == "stop" and isinstance(value, str):
                value = [value]
            values[key] = value
    try:
        _check_types(values, n)
        return GenerationOptions(**values)
    except OptionError as e:
        raise LineError(f"line {n}: {str(e).replace('--' + e.option.replace('_', '-'), e.option, 1)}") from None


def _check_types(values: dict[str, Any], n: int) -> None:
    kinds = {"max_tokens": int, "top_k": int, "seed": int, "temperature": float, "top_p": float, "min_p": float,
             "repeat_penalty": float}  # fmt: skip
    for key, kind in kinds.items():
        value = values[key]
        ok = value is None and key in ("max_tokens", "seed")
        ok = ok or (isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool))
        if not ok:
            raise LineError(f"line {n}: {key} must be a {'number' if kind is float else 'whole number'}, "
                            f"not {json.dumps(value)}.")  # fmt: skip
        if kind is float:
            values[key] = float(value)
    stop = values["stop"]
    if not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise LineError(f"line {n}: stop must be a string or a list of strings.")


def _format(item: dict[str, Any], default: Any, n: int) -> Any:
    if "response_format" not in item:
        return default
    from mistral_cli.text.output_format import from_response_format

    try:
        return from_response_format(item["response_format"])
    except ValueError as e:
        raise LineError(f"line {n}: {e}") from None


def _key(ident: Any) -> str:
    return json.dumps(ident)  # 1 and "1" are different ids


# --------------------------------------------------------------------------------------------------------- files


def _read_lines(source: Path) -> list[str]:
    from mistral_cli.cli.complete import _decode, _read_stdin

    if str(source) == "-":
        return _decode(_read_stdin(False, "The batch on stdin"), "stdin").splitlines()
    data = read_bounded(source, f"Batch file {source}", MAX_FILE_BYTES, "split it", UsageError)
    return _decode(data, f"Batch file {source}").splitlines()


def _answered(path: Path) -> set[str]:
    """The ids already answered in a --resume file, after cutting off a torn last line (a crash mid-write)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return set()
    except IsADirectoryError:
        raise UsageError(f"--resume {path} is a folder.") from None
    except OSError as e:
        raise MistralError(f"Cannot read {path}: {e.strerror or e}.") from None
    whole = data[: data.rfind(b"\n") + 1]
    if len(whole) != len(data):
        try:
            os.truncate(path, len(whole))
        except OSError as e:
            raise MistralError(f"Cannot cut the torn last line off {path}: {e.strerror or e}.") from None
        sys.stderr.write(f"mistral: note: cut off a torn last line of {path} (written when a run stopped).\n")
    answered = set()
    for line in whole.decode("utf-8", errors="replace").splitlines():
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(item, dict) and "id" in item and "error" not in item:
            answered.add(_key(item["id"]))
    return answered


@contextmanager
def _deferred_interrupt() -> Iterator[None]:
    """Ctrl-C (SIGINT) raised only once the block is done."""
    main = threading.current_thread() is threading.main_thread()  # only there can a signal handler be set
    if not main or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield  # SIGINT ignored, or someone else's handler: theirs to handle
        return
    came: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: came.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if came:
            raise KeyboardInterrupt


def _open_output(resume: Path | None) -> IO[str]:
    if resume is None:
        return sys.stdout
    try:
        return open(resume, "a", encoding="utf-8")
    except OSError as e:
        raise MistralError(f"Cannot write {resume}: {e.strerror or e}.") from None


class _Progress:
    """Lines done of the total, tokens/s and the time left, on stderr when it is a terminal."""

    def __init__(self, total: int) -> None:
        self.tokens, self.start = 0, time.perf_counter()
        self.bar: Any = None
        if sys.stderr.isatty() and total:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("batch"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[speed]}"),
                TimeRemainingColumn(), console=Console(stderr=True), transient=True,
            )  # fmt: skip
            self.bar.start()
            self.task = self.bar.add_task("batch", total=total, speed="")

    def advance(self, tokens: int) -> None:
        self.tokens += tokens
        if self.bar is not None:
            rate = self.tokens / max(time.perf_counter() - self.start, 1e-9)
            self.bar.update(self.task, advance=1, speed=f"{rate:.1f} tokens/s")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
