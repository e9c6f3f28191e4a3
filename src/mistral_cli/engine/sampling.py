"""The sampler: repetition penalty, temperature, top-k, top-p, min-p, seeded (options.GenerationOptions).

One algorithm, in float64, run by our C library where it is loaded (kernels.c's mc_sample: well under a millisecond
over 32,000 scores) and by torch elsewhere, the same steps up to rounding:

1. the repetition penalty on the distinct tokens among the last REPEAT_LAST_N: a positive score is divided by it, a
   negative one multiplied;
2. temperature 0 takes the first highest score; otherwise the scores are divided by the temperature,
3. those below the k-th highest dropped (top-k), the rest turned into probabilities (softmax),
4. in order of probability (ties by id), a token dropped once those before it sum to top-p or more,
5. those below min-p times the highest probability dropped,
6. and the token drawn where the running sum of what is left, in id order, first passes u times its total, for a
   number u in [0, 1) from Python's Mersenne Twister seeded with --seed.

Nothing here imports torch until a torch tensor is sampled: the quick path (engine/quick.py) samples its logits
through the C library alone. The same seed and options give the same tokens on the same logits.
"""

from __future__ import annotations

import ctypes
import math
import random
from typing import TYPE_CHECKING, Any

from mistral_cli.errors import MistralError
from mistral_cli.native import library
from mistral_cli.options import GenerationOptions

if TYPE_CHECKING:
    import torch

REPEAT_LAST_N = 64  # the repetition penalty looks at this many recent tokens, as llama.cpp does
NOT_FINITE = (
    "The model computed scores that are not numbers (NaN or infinity): its weight files hold such values or are "
    "corrupt, or the dtype overflows; download the model again, or try --dtype fp32."
)


def check_finite(logits: torch.Tensor) -> None:
    """Refuse logits with NaN or infinity: sampling would fail, and the argmax of NaN is a meaningless token."""
    import torch

    if not bool(torch.isfinite(logits).all()):
        raise MistralError(NOT_FINITE)


class Sampler:
    """Turns float32 logits (V,) into a token id; the same seed and options give the same sequence."""

    def __init__(self, options: GenerationOptions) -> None:
        self.opt = options
        self.random = random.Random(options.seed if options.seed is not None else 0)
        loaded = library.library()
        self.lib: Any = loaded[0] if loaded is not None else None

    def _recent(self, recent: list[int]) -> list[int]:
        return sorted(set(recent[-REPEAT_LAST_N:])) if self.opt.repeat_penalty != 1.0 else []

    def _u(self) -> float:
        return self.random.random() if self.opt.temperature > 0 else 0.0

    def pick(self, address: int, V: int, recent: list[int], *, masked: bool = False) -> int:
        """The token for V float32 logits at `address` (C memory: the quick path), through the C library."""
        ids = self._recent(recent)
        opt = self.opt
        token = int(
            self.lib.mc_sample(
                address,
                V,
                (ctypes.c_int64 * len(ids))(*ids),
                len(ids),
                opt.repeat_penalty,
                opt.temperature,
                opt.top_k,
                opt.top_p,
                opt.min_p,
                self._u(),
                int(masked),
            )  # fmt: skip
        )
        if token == -2:
            raise MistralError(NOT_FINITE)
        if token < 0:
            raise MemoryError("out of memory in the sampler")
        return token

    def __call__(self, logits: torch.Tensor, recent: list[int], *, masked: bool = False) -> int:
        """masked: the logits went through a grammar's mask, whose -inf are meant (the caller checked them before)."""
        import torch

        if self.lib is not None:
            row = logits.detach().to("cpu", torch.float32).contiguous()
            return self.pick(row.data_ptr(), row.numel(), recent, masked=masked)
        return self._torch(logits, recent, masked)

    def _torch(self, logits: torch.Tensor, recent: list[int], masked: bool) -> int:
        """The same steps with torch, where the C library is not loaded."""
        import torch

        if not masked:
            check_finite(logits)
        opt = self.opt
        x = logits.detach().to("cpu", torch.float64)
        if ids := self._recent(recent):
            index = torch.tensor(ids)
            picked = x[index]
            x[index] = torch.where(picked > 0, picked / opt.repeat_penalty, picked * opt.repeat_penalty)
        if opt.temperature == 0:
            return int(x.argmax())
        x = x / opt.temperature
        if 0 < opt.top_k < x.numel():
            x = x.masked_fill(x < torch.topk(x, opt.top_k).values[-1], -math.inf)
        probs = torch.softmax(x, dim=-1)
        if opt.top_p < 1.0:
            order = torch.argsort(-probs, stable=True)  # ties keep id order
            ordered = probs[order]
            before = torch.cat((ordered.new_zeros(1), ordered.cumsum(0)[:-1]))  # the sum of those ranked higher
            probs = probs.clone()
            probs[order[before >= opt.top_p]] = 0.0
        if opt.min_p > 0:
            probs = probs.masked_fill(probs < opt.min_p * probs.max(), 0.0)
        running = probs.cumsum(0)
        kept = (probs > 0).nonzero().flatten()
        past = (running > self._u() * running[-1]) & (probs > 0)
        hit = past.nonzero().flatten()
        return int(hit[0] if hit.numel() else kept[-1])
