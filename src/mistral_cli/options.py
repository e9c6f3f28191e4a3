"""The options of a run, typed and checked once: what to generate (`GenerationOptions`) and how to load and run the
model (`LoadOptions`).

The command line builds them by name (cli/app.py), the engine and the sampler read them by name. No torch here: the
CLI checks them before the slow model load, and `mistral info` uses the same defaults.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from mistral_cli.errors import UsageError

DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "bf16", "fp16", "fp32")
QUANTIZATIONS = ("none", "int8", "int4")


class OptionError(UsageError):
    """A value out of range for one option; `option` is its field name, so the CLI can say where it was set."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(message)
        self.option = option


def _check(checks: list[tuple[str, bool, str]]) -> None:
    for option, ok, message in checks:
        if not ok:
            raise OptionError(option, message)


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
        """Raise OptionError with one sentence for a nonsense value."""
        _check([
            ("max_tokens", self.max_tokens is None or self.max_tokens >= 0,
             f"--max-tokens must be 0 or more, not {self.max_tokens}."),
            ("temperature", math.isfinite(self.temperature) and self.temperature >= 0,
             f"--temperature must be 0 (greedy) or more, not {self.temperature}."),
            ("top_p", 0 < self.top_p <= 1, f"--top-p must be in (0, 1], not {self.top_p}."),
            ("top_k", self.top_k >= 0, f"--top-k must be 0 (off) or more, not {self.top_k}."),
            ("min_p", 0 <= self.min_p <= 1, f"--min-p must be in [0, 1], not {self.min_p}."),
            ("repeat_penalty", math.isfinite(self.repeat_penalty) and self.repeat_penalty > 0,
             f"--repeat-penalty must be more than 0 (1 is off), not {self.repeat_penalty}."),
            ("seed", self.seed is None or 0 <= self.seed < 2**63,
             f"--seed must be between 0 and 2^63-1, not {self.seed}."),
            ("stop", all(self.stop), "--stop needs a non-empty text."),
        ])  # fmt: skip

    def with_seed(self) -> GenerationOptions:
        """A copy with a concrete seed, so a random run can be repeated (the seed is reported)."""
        if self.seed is not None:
            return self
        return GenerationOptions(**{**asdict(self), "seed": int.from_bytes(os.urandom(4), "little")})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class LoadOptions:
    """Where and how the model runs; `max_context` None is the model's own context, `threads` None one per core."""

    device: str = "auto"
    dtype: str = "auto"
    quantize: str = "none"
    max_context: int | None = None
    threads: int | None = None
    compile: bool = False  # torch.compile the decode step
    prepare: bool = True  # map prepared weights, writing them on the first load (engine/prepared.py)

    def __post_init__(self) -> None:
        _check([
            ("device", self.device in DEVICES, f"--device must be one of {', '.join(DEVICES)}, not {self.device!r}."),
            ("dtype", self.dtype in DTYPES, f"--dtype must be one of {', '.join(DTYPES)}, not {self.dtype!r}."),
            ("quantize", self.quantize in QUANTIZATIONS,
             f"--quantize must be one of {', '.join(QUANTIZATIONS)}, not {self.quantize!r}."),
            ("max_context", self.max_context is None or self.max_context >= 1,
             f"--max-context must be 1 or more, not {self.max_context}."),
            ("threads", self.threads is None or self.threads >= 1, f"--threads must be 1 or more, not {self.threads}."),
        ])  # fmt: skip


GENERATION = tuple(f.name for f in fields(GenerationOptions))
LOADING = tuple(f.name for f in fields(LoadOptions) if f.name not in ("compile", "prepare"))  # the command line only
