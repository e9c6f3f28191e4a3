"""Generation options and the sampler: repetition penalty, temperature, top-k, top-p, min-p, seeded."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from mistral_cli.errors import UsageError

REPEAT_LAST_N = 64  # the repetition penalty looks at this many recent tokens, as llama.cpp does


@dataclass
class GenerationOptions:
    max_tokens: int | None = None  # None: until end of sequence or a full context
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repeat_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise UsageError with one sentence for a nonsense value."""
        checks = [
            (self.max_tokens is None or self.max_tokens >= 0, f"--max-tokens must be 0 or more, not {self.max_tokens}."),
            (math.isfinite(self.temperature) and self.temperature >= 0,
             f"--temperature must be 0 (greedy) or more, not {self.temperature}."),
            (0 < self.top_p <= 1, f"--top-p must be in (0, 1], not {self.top_p}."),
            (self.top_k >= 0, f"--top-k must be 0 (off) or more, not {self.top_k}."),
            (0 <= self.min_p <= 1, f"--min-p must be in [0, 1], not {self.min_p}."),
            (math.isfinite(self.repeat_penalty) and self.repeat_penalty > 0,
             f"--repeat-penalty must be more than 0 (1 is off), not {self.repeat_penalty}."),
            (self.seed is None or 0 <= self.seed < 2**63, f"--seed must be between 0 and 2^63-1, not {self.seed}."),
            (all(self.stop), "--stop needs a non-empty text."),
        ]  # fmt: skip
        for ok, message in checks:
            if not ok:
                raise UsageError(message)

    def with_seed(self) -> GenerationOptions:
        """A copy with a concrete seed, so a random run can be repeated (the seed is reported)."""
        if self.seed is not None:
            return self
        return GenerationOptions(**{**asdict(self), "seed": int.from_bytes(os.urandom(4), "little")})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Sampler:
    """Turns float32 logits (V,) into a token id; the same seed and options give the same sequence."""

    def __init__(self, options: GenerationOptions) -> None:
        self.opt = options
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(options.seed if options.seed is not None else 0)

    def __call__(self, logits: torch.Tensor, recent: list[int]) -> int:
        logits = logits.float()
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
