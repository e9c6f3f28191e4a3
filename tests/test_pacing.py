"""The decode threads adapt to the CPU time the steps get (engine/pacing.py). The pacer is driven here by a simulated
machine's step times (numbers, nothing timed); then real generations that change thread count between steps give
the reply they give at a fixed count, and loading sets a pacer only where the count is not the user's."""

from __future__ import annotations

import random

import pytest
import torch

from mistral_cli.engine import pacing
from mistral_cli.engine.load import load_engine
from mistral_cli.engine.pacing import Pacer
from mistral_cli.native import library
from mistral_cli.options import GenerationOptions, LoadOptions

# a 2-core machine's decode step, in units of the idle 2-thread step: one thread reads less of the memory; with a
# busy program on one core, two threads wait at every barrier for the one that shares its core
IDLE = {1: 1.6, 2: 1.0, 3: 0.95, 4: 0.9}
BUSY = {1: 1.7, 2: 3.0, 3: 2.4, 4: 2.2}


def drive(pacer: Pacer, busy: range, steps: int, noise: float = 0.0, slower: float = 1.0) -> list[int]:
    """The thread count of each step, the machine busy during the steps in `busy`; each step's time drawn within
    +-noise of the machine's, times `slower` from step 500 on (a longer context, ...)."""
    draw = random.Random(0)
    counts = []
    for i in range(steps):
        counts.append(pacer.threads)
        t = (BUSY if i in busy else IDLE)[pacer.threads] * (slower if i >= 500 else 1.0)
        pacer.note(t * (1 + draw.uniform(-noise, noise)))
    return counts


def test_an_idle_machine_keeps_every_core_through_noise():
    pacer = Pacer(2)
    assert set(drive(pacer, range(0), 4000, noise=0.25)) == {2} and not pacer.changes


def test_a_program_that_starts_later_gets_its_core_and_gives_it_back():
    pacer = Pacer(2)
    counts = drive(pacer, range(200, 2200), 4000)
    assert set(counts[:200]) == {2}
    # within three windows of the program's start, one thread; then at most the probes for a second
    assert counts[200 + 3 * pacing.WINDOW : 2200].count(1) > 0.95 * (2000 - 3 * pacing.WINDOW)
    # once it has ended, both cores come back within the longest wait between probes
    back = 2200 + (pacing.RETRY_MOST + 2) * pacing.WINDOW
    assert set(counts[back:]) == {2}
    time_taken = sum((BUSY if i in range(200, 2200) else IDLE)[n] for i, n in enumerate(counts))
    fixed = 200 * IDLE[2] + 2000 * BUSY[2] + 1800 * IDLE[2]
    assert time_taken < 0.75 * fixed


def test_a_slowdown_that_fewer_threads_do_not_cure_is_kept_at_every_core():
    """Every step 1.6x slower from step 500 on (as a long context makes them): one thread is tried once and the
    pacer comes back to two and stays, taking the slower pace as the new normal."""
    pacer = Pacer(2)
    counts = drive(pacer, range(0), 3000, slower=1.6)
    assert counts[500:].count(1) <= pacing.WINDOW and set(counts[600:]) == {2}


def test_a_reply_after_a_busy_one_starts_with_the_loads_count_again():
    for still_busy in (False, True):
        pacer = Pacer(2)
        drive(pacer, range(100, 400), 400)  # another program starts during the reply: one thread
        assert pacer.threads == 1
        assert pacer.begin() == 2  # the next reply: the other program may have ended meanwhile
        counts = drive(pacer, range(0, 400) if still_busy else range(0), 400)
        if still_busy:  # down again within three windows, and staying there but for a probe
            assert counts[3 * pacing.WINDOW :].count(1) >= 400 - 4 * pacing.WINDOW
        else:  # it had: both cores from the first step, kept
            assert set(counts) == {2}
    assert Pacer(2, threads=1).begin() == 1  # the load's own count (a program ran then) is not raised


@pytest.mark.parametrize("most", [1, 4])
def test_the_count_stays_within_one_and_the_cores(most):
    pacer = Pacer(most)
    counts = drive(pacer, range(100, 3000), 3000, noise=0.1)
    assert min(counts) >= 1 and max(counts) <= most and Pacer(2, threads=8).threads == 2


class EveryStep:
    """A pacer that changes the count after every step: 1, 2, 1, 2, ..."""

    def __init__(self) -> None:
        self.steps = 0

    def note(self, seconds: float) -> int:
        self.steps += 1
        return 1 + self.steps % 2

    def begin(self) -> int:
        self.replies = getattr(self, "replies", 0) + 1
        return 1  # the prompt at one thread: its tokens too are the same


@pytest.mark.skipif(library.library() is None, reason=f"our kernels: {library.status()}")
def test_changing_the_thread_count_between_steps_changes_no_token(hf_model_dir):
    prompt, options = [1, 415, 5565, 302, 4843], GenerationOptions(max_tokens=24, temperature=0)
    before = torch.get_num_threads()
    try:
        for quantize in ("none", "int4"):
            engine = load_engine(hf_model_dir, LoadOptions(device="cpu", dtype="bf16", quantize=quantize,
                                                           threads=2, prepare=False))  # fmt: skip
            assert engine.pacer is None  # --threads: the user's count stays
            fixed = list(engine.generate(prompt, options))[-1]
            engine.reset()
            engine.pacer = EveryStep()  # type: ignore[assignment]
            changing = list(engine.generate(prompt, options))[-1]
            assert changing.tokens == fixed.tokens and engine.pacer.steps == len(fixed.tokens) - 1
            assert engine.pacer.replies == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(library.library() is None, reason=f"our kernels: {library.status()}")
def test_loading_adapts_only_a_count_that_is_not_the_users_on_our_kernels(hf_model_dir, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MISTRAL_ADAPT_THREADS", raising=False)
    before = torch.get_num_threads()
    options = LoadOptions(device="cpu", dtype="bf16", prepare=False)
    try:
        assert load_engine(hf_model_dir, options).pacer is not None
        # fp32 steps run on torch's kernels, which may round differently at another count: the count stays
        assert load_engine(hf_model_dir, LoadOptions(device="cpu", dtype="fp32", prepare=False)).pacer is None
        monkeypatch.setenv("MISTRAL_ADAPT_THREADS", "off")
        assert load_engine(hf_model_dir, options).pacer is None
    finally:
        torch.set_num_threads(before)
