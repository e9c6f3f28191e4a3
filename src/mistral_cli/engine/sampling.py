"""The sampler: repetition penalty, temperature, top-k, top-p, min-p, seeded (options.GenerationOptions)."""

from __future__ import annotations

import math

import torch

from mistral_cli.errors import MistralError
from mistral_cli.options import GenerationOptions

REPEAT_LAST_N = 64  # the repetition penalty looks at this many recent tokens, as llama.cpp does
NOT_FINITE = (
    "The model computed scores that are not numbers (NaN or infinity): its weight files hold such values or are "
    "corrupt, or the dtype overflows; download the model again, or try --dtype fp32."
)


def check_finite(logits: torch.Tensor) -> None:
    """Refuse logits with NaN or infinity: sampling would fail, and the argmax of NaN is a meaningless token."""
    if not bool(torch.isfinite(logits).all()):
        raise MistralError(NOT_FINITE)


class Sampler:
    """Turns float32 logits (V,) into a token id; the same seed and options give the same sequence."""

    def __init__(self, options: GenerationOptions) -> None:
        self.opt = options
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(options.seed if options.seed is not None else 0)

    def __call__(self, logits: torch.Tensor, recent: list[int], *, masked: bool = False) -> int:
        """masked: the logits went through a grammar's mask, whose -inf are meant (the caller checked them before)."""
        logits = logits.float()
        if not masked:
            check_finite(logits)
        opt = self.opt
        if opt.repeat_penalty != 1.0 and recent:
            ids = torch.tensor(sorted(set(recent[-REPEAT_LAST_N:])), device=logits.device)
            picked = logits[ids]
            logits = logits.clone()
            logits[ids] = torch.where(picked > 0, picked / opt.repeat_penalty, picked * opt.repeat_penalty)
        if opt.temperature == 0:
            return int(logits.argmax())
        # Sampling runs on the CPU so a seed gives the same text on every device.
        logits = logits.cpu() / opt.temperature
        if opt.top_k > 0 and opt.top_k < logits.numel():
            kth = torch.topk(logits, opt.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, -math.inf)
        probs = torch.softmax(logits, dim=-1)
        if opt.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            # drop a token when the tokens ranked before it already cover top_p
            drop = sorted_probs.cumsum(0) - sorted_probs >= opt.top_p
            probs = probs.scatter(0, order, sorted_probs.masked_fill(drop, 0.0))
        if opt.min_p > 0:
            probs = probs.masked_fill(probs < opt.min_p * probs.max(), 0.0)
        return int(torch.multinomial(probs, 1, generator=self.generator))
