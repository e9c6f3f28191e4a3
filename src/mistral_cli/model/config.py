"""The model's architecture, read from the checkpoint's own params.json (native) or config.json (HF).

No torch here: `mistral info` reads configs without importing it.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mistral_cli.errors import MistralError

V02_CONTEXT = 32768
V01_CONTEXT = 8192


@dataclass(frozen=True)
class ModelConfig:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_dim: int
    vocab_size: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    sliding_window: int | None = None  # None: full causal attention
    max_context: int = V02_CONTEXT

    def __post_init__(self) -> None:
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_dim", "vocab_size"):
            if getattr(self, name) <= 0:
                raise MistralError(f"The model config has {name} = {getattr(self, name)}, which must be positive.")
        if self.n_heads % self.n_kv_heads:
            raise MistralError(
                f"The model config has {self.n_heads} query heads, not a multiple of its {self.n_kv_heads} "
                "key/value heads."
            )
        if self.head_dim % 2:
            raise MistralError(f"The model config has an odd head size ({self.head_dim}); RoPE needs an even one.")
        for name in ("norm_eps", "rope_theta"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise MistralError(f"The model config has {name} = {value}, which must be a positive number.")

    @property
    def n_params(self) -> int:
        attn = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        mlp = 3 * self.dim * self.hidden_dim
        per_layer = attn + mlp + 2 * self.dim
        return self.n_layers * per_layer + 2 * self.vocab_size * self.dim + self.dim

    def size_problem(self, stored_bytes: int, folder: Path) -> str | None:
        """Why the weight files (`stored_bytes` in all) cannot hold this config's parameters (a byte each at the very
        least), or None: an absurd config is refused before a model of its size is built."""
        if self.n_params <= stored_bytes:
            return None
        return (
            f"The config in {folder} describes {self.n_params:,} parameters, but the weight files hold only "
            f"{stored_bytes:,} bytes: they are truncated or corrupt, or the config does not match them; download "
            "the model again."
        )

    def vocab_problem(self, tokens: int, tokenizer: Path) -> str | None:
        """Why a tokenizer of `tokens` pieces cannot go with this model, or None."""
        if tokens == self.vocab_size:
            return None
        return (
            f"{tokenizer} has {tokens} tokens but the model expects {self.vocab_size}: the tokenizer does not belong "
            "to this model."
        )

    def context_problem(self, max_context: int | None) -> str | None:
        if max_context is None or 1 <= max_context <= self.max_context:
            return None
        return f"--max-context must be between 1 and the model's {self.max_context}, not {max_context}."

    def kv_bytes_per_token(self, element_size: int) -> int:
        return self.n_layers * 2 * self.n_kv_heads * self.head_dim * element_size

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_params_json(cls, data: dict[str, Any]) -> ModelConfig:
        """From a native `params.json` (mistral-inference's ModelArgs fields)."""
        n_heads = _whole(data, "n_heads")
        dim = _whole(data, "dim")
        rope_theta = float(data.get("rope_theta") or 10000.0)
        context = _whole(data, "max_seq_len", None) or _whole(data, "max_position_embeddings", None)
        context = context or _default_context(rope_theta)
        return cls(
            dim=dim,
            n_layers=_whole(data, "n_layers"),
            n_heads=n_heads,
            n_kv_heads=_whole(data, "n_kv_heads", None) or n_heads,
            head_dim=_head_dim(data, "head_dim", dim, n_heads, "dim"),
            hidden_dim=_whole(data, "hidden_dim"),
            vocab_size=_whole(data, "vocab_size"),
            norm_eps=float(data.get("norm_eps", 1e-5)),
            rope_theta=rope_theta,
            sliding_window=_effective_window(data.get("sliding_window"), rope_theta, int(context)),
            max_context=int(context),
        )

    @classmethod
    def from_hf_config(cls, data: dict[str, Any]) -> ModelConfig:
        """From an HF `config.json`, with either a top-level `rope_theta` or transformers 5's `rope_parameters`."""
        n_heads = _whole(data, "num_attention_heads")
        dim = _whole(data, "hidden_size")
        rope_params = data.get("rope_parameters") or {}
        rope_theta = float(data.get("rope_theta") or rope_params.get("rope_theta") or 10000.0)
        context = _whole(data, "max_position_embeddings", None) or _default_context(rope_theta)
        return cls(
            dim=dim,
            n_layers=_whole(data, "num_hidden_layers"),
            n_heads=n_heads,
            n_kv_heads=_whole(data, "num_key_value_heads", None) or n_heads,
            head_dim=_head_dim(data, "head_dim", dim, n_heads, "hidden_size"),
            hidden_dim=_whole(data, "intermediate_size"),
            vocab_size=_whole(data, "vocab_size"),
            norm_eps=float(data.get("rms_norm_eps", 1e-5)),
            rope_theta=rope_theta,
            sliding_window=_effective_window(data.get("sliding_window"), rope_theta, context),
            max_context=context,
        )

    @classmethod
    def from_folder(cls, folder: Path) -> ModelConfig:
        """params.json wins over config.json when a folder has both (it is the vendor's own)."""
        for name, build in (("params.json", cls.from_params_json), ("config.json", cls.from_hf_config)):
            path = folder / name
            if path.is_file():
                try:
                    data = json.loads(path.read_text(encoding="utf-8"))
                    if not isinstance(data, dict):
                        raise TypeError("not a JSON object")
                    return build(data)
                except (ValueError, TypeError, KeyError, OverflowError, RecursionError) as exc:
                    detail = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
                    raise MistralError(f"{path} is not a valid model config ({detail}).") from None
        raise MistralError(f"{folder} is not a model folder: it has neither params.json nor config.json.")


_REQUIRED = object()


def _whole(data: dict[str, Any], key: str, default: Any = _REQUIRED) -> Any:
    """data[key] as an int: a whole number (64.0 is 64), never a fraction silently cut (64.5 is an error)."""
    if key not in data or data[key] is None:
        if default is _REQUIRED:
            raise KeyError(key)
        return default
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise ValueError(f"{key} must be a whole number, not {value!r}")
    return int(value)


def _head_dim(data: dict[str, Any], key: str, dim: int, n_heads: int, dim_key: str) -> int:
    """The head size: given, or the width shared out among the heads, which must divide it."""
    given = _whole(data, key, None)
    if given:
        return given
    if n_heads <= 0 or dim % n_heads:
        raise ValueError(f"{dim_key} {dim} is not a multiple of the {n_heads} attention heads, and there is no {key}")
    return dim // n_heads


def _default_context(rope_theta: float) -> int:
    return V02_CONTEXT if rope_theta >= 1e6 else V01_CONTEXT


def _effective_window(window: Any, rope_theta: float, context: int) -> int | None:
    """v0.2 has no sliding window, though some of its configs carry 4096 or 32768 (docs/FORMAT.md section 1)."""
    if window is None:
        return None
    window = int(window)
    if window <= 0 or window >= context:
        return None
    if window == 4096 and rope_theta >= 1e6:
        return None
    return window
