"""The one thread that owns the engine: requests run one at a time, in the order they came, each as a `Job`.

The engine holds one sequence's key/value cache and is not made for two threads, so the server's handlers never touch
it: they queue a Job and read its events (the engine's `Chunk`s, then one `Done`, `Cancelled` or `Failed`) as they
come. Keeping one engine across requests is what lets a request that extends the previous one (the next turn of a
chat) prefill only its new tokens. A job is cancelled between two tokens: its client went away, or the server is
stopping.
"""

from __future__ import annotations

import asyncio
import collections
import queue
import threading
from dataclasses import dataclass
from typing import Any

from mistral_cli.engine.events import Chunk, Done
from mistral_cli.errors import MistralError
from mistral_cli.options import GenerationOptions
from mistral_cli.serve.protocol import ApiError

RETRY_AFTER_S = 2  # what a client turned away from a full queue is told to wait


@dataclass
class Cancelled:
    """The job stopped before its end (at a token, or before it started)."""


@dataclass
class Failed:
    error: BaseException


Event = Chunk | Done | Cancelled | Failed


class Job:
    """One request's generation, made on the event loop that reads its events."""

    def __init__(
        self, prompt: list[int], options: GenerationOptions, *, leading_space: bool, constraint: Any = None,
        logprobs: int | None = None, prompt_logprobs: bool = False,
    ) -> None:  # fmt: skip
        self.prompt, self.options, self.leading_space = prompt, options, leading_space
        self.constraint, self.logprobs, self.prompt_logprobs = constraint, logprobs, prompt_logprobs
        self._loop = asyncio.get_running_loop()
        self._events: collections.deque[Event] = collections.deque()
        self._ready = asyncio.Event()
        self._cancel = threading.Event()

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def put(self, event: Event) -> None:
        """From the worker thread."""
        self._events.append(event)
        self._loop.call_soon_threadsafe(self._ready.set)

    async def next(self, timeout: float) -> Event | None:
        """The next event, or None when none came within `timeout` seconds."""
        while not self._events:
            self._ready.clear()  # a put after this sets it again: its set() runs on this loop, after this line
            if self._events:
                break
            try:
                await asyncio.wait_for(self._ready.wait(), timeout)
            except asyncio.TimeoutError:
                return None
        return self._events.popleft()


class Worker:
    """Runs the jobs on `engine`; at most `waiting` wait behind the running one, past that a 503."""

    def __init__(self, engine: Any, waiting: int) -> None:
        self.engine, self.waiting = engine, waiting
        self.closed = False
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._live: set[Job] = set()  # queued or running
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="mistral-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Queue `job`, or refuse it with a 503 when the queue is full or the server is stopping."""
        with self._lock:
            if self.closed:
                raise ApiError(503, "The server is shutting down.", kind="server_error", code="shutting_down")
            if len(self._live) > self.waiting:
                raise ApiError(
                    503, f"The server is busy: {self.waiting} requests are already waiting; try again shortly.",
                    kind="server_error", code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)},
                )  # fmt: skip
            self._live.add(job)
        self._jobs.put(job)

    @property
    def busy(self) -> int:
        """Jobs queued or running."""
        return len(self._live)

    def close(self) -> None:
        """Take no more jobs and cancel those queued or running; the thread ends once the running one stops."""
        with self._lock:
            self.closed = True
            for job in self._live:
                job.cancel()
        self._jobs.put(None)

    def join(self, timeout: float) -> None:
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                self._generate(job)
            except MistralError as exc:  # what the engine refuses (a prompt it cannot hold) or a failed step
                job.put(Failed(exc))
            except Exception as exc:
                self.engine.reset()  # the cache may no longer match its tokens: the next prompt starts afresh
                job.put(Failed(exc))
            finally:
                with self._lock:
                    self._live.discard(job)

    def _generate(self, job: Job) -> None:
        if job.cancelled:
            job.put(Cancelled())
            return
        events = self.engine.generate(
            job.prompt, job.options, leading_space=job.leading_space, constraint=job.constraint,
            logprobs=job.logprobs, prompt_logprobs=job.prompt_logprobs,
        )  # fmt: skip
        try:
            for event in events:
                job.put(event)
                if job.cancelled and not isinstance(event, Done):
                    job.put(Cancelled())
                    return
        finally:
            events.close()  # the engine's own cleanup: the cache keeps exactly the tokens fed
