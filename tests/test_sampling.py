"""The sampler (engine/sampling.py): the C implementation (kernels.c's mc_sample) and the torch one agree, and both
draw what the options say."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from mistral_cli.engine.sampling import Sampler
from mistral_cli.errors import MistralError
from mistral_cli.native import library
from mistral_cli.options import GenerationOptions

OPTIONS = [
    GenerationOptions(temperature=0),
    GenerationOptions(temperature=0, repeat_penalty=1.5),
    GenerationOptions(temperature=0.7),
    GenerationOptions(temperature=1.3, top_k=40),
    GenerationOptions(temperature=0.9, top_p=0.8),
    GenerationOptions(temperature=1.0, min_p=0.05),
    GenerationOptions(temperature=0.8, top_k=100, top_p=0.9, min_p=0.01, repeat_penalty=1.3),
]


def _samplers(options: GenerationOptions) -> tuple[Sampler, Sampler]:
    """Two samplers of the same seed: on the C library, and on torch."""
    if library.library() is None:
        pytest.skip(f"our kernels: {library.status()}")
    c, t = Sampler(options), Sampler(options)
    t.lib = None
    return c, t


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: f"{o.temperature}-{o.top_k}-{o.top_p}-{o.min_p}")
def test_c_and_torch_draw_the_same_tokens(options: GenerationOptions) -> None:
    options.seed = 5
    c, t = _samplers(options)
    g = torch.Generator().manual_seed(1)
    recent = torch.randint(0, 32000, (80,), generator=g).tolist()
    for _ in range(40):
        logits = torch.randn(32000, generator=g) * 3
        assert c(logits, recent) == t(logits, recent)


def test_draws_follow_the_probabilities() -> None:
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0, 1.5, 0.2])
    for lib in (True, False):
        s = Sampler(GenerationOptions(temperature=0.8, seed=3))
        if not lib:
            s.lib = None
        elif s.lib is None:
            continue
        n = 4000
        counts = Counter(s(logits, []) for _ in range(n))
        probs = torch.softmax(logits.double() / 0.8, dim=0)
        for token, p in enumerate(probs.tolist()):
            sd = math.sqrt(n * p * (1 - p))
            assert abs(counts[token] - n * p) < 5 * sd + 1, (lib, token, counts[token], n * p)


@pytest.mark.parametrize("torch_path", [False, True])
def test_filters_keep_only_what_they_allow(torch_path: bool) -> None:
    logits = torch.tensor([3.0, 2.9, 1.0, 0.5, 0.0, -1.0])
    probs = torch.softmax(logits.double(), dim=0)

    def drawn(**kw: float) -> set[int]:
        s = Sampler(GenerationOptions(temperature=1.0, seed=11, **kw))  # type: ignore[arg-type]
        if torch_path:
            s.lib = None
        elif s.lib is None:
            pytest.skip(f"our kernels: {library.status()}")
        return {s(logits, [0, 0, 1]) for _ in range(600)}

    assert drawn(top_k=2) == {0, 1}
    assert drawn(top_p=float(probs[0]) + 1e-9) == {0, 1}  # the first does not reach top-p alone: the second stays
    assert drawn(top_p=float(probs[0]) * 0.5) == {0}
    assert drawn(min_p=float(probs[2] / probs[0]) * 0.99) == {0, 1, 2}
    assert drawn() == set(range(6))
    # the penalty on 0 and 1 (divided: they are positive) leaves 2 the most likely
    greedy = Sampler(GenerationOptions(temperature=0, repeat_penalty=4.0))
    if torch_path:
        greedy.lib = None
    assert greedy(logits, [0, 1, 1]) == 2


@pytest.mark.parametrize("torch_path", [False, True])
def test_not_finite_is_refused_and_a_mask_is_obeyed(torch_path: bool) -> None:
    s = Sampler(GenerationOptions(temperature=1.0, seed=2))
    if torch_path:
        s.lib = None
    elif s.lib is None:
        pytest.skip(f"our kernels: {library.status()}")
    for bad in (math.nan, math.inf, -math.inf):
        logits = torch.zeros(10)
        logits[3] = bad
        with pytest.raises(MistralError, match="not numbers"):
            s(logits, [])
    masked = torch.full((10,), -math.inf)
    masked[[2, 7]] = torch.tensor([0.5, 0.1])
    assert {s(masked, [], masked=True) for _ in range(200)} == {2, 7}
