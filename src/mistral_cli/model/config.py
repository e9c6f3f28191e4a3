"""The model's architecture, read from the checkpoint's own params.json (native) or config.json (HF).

No torch here: `mistral info` reads configs without importing it.
"""

from __future__ import annotations

import json
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

    @property
    def n_params(self) -> int:
        attn = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        mlp = 3 * self.dim * self.hidden_dim
        per_layer = attn + mlp + 2 * self.dim
        return self.n_layers * per_layer + 2 * self.vocab_size * self.dim + self.dim

    def kv_bytes_per_token(self, element_size: int) -> int:
        return self.n_layers * 2 * self.n_kv_heads * self.head_dim * element_size

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_params_json(cls, data: dict[str, Any]) -> ModelConfig:
        """From a native `params.json` (mistral-inference's ModelArgs fields)."""
        n_heads = int(data["n_heads"])
        dim = int(data["dim"])
        rope_theta = float(data.get("rope_theta") or 10000.0)
        context = data.get("max_seq_len") or data.get("max_position_embeddings") or _default_context(rope_theta)
        return cls(
            dim=dim,
            n_layers=int(data["n_layers"]),
            n_heads=n_heads,
            n_kv_heads=int(data.get("n_kv_heads") or n_heads),
            head_dim=int(data.get("head_dim") or dim // n_heads),
            hidden_dim=int(data["hidden_dim"]),
            vocab_size=int(data["vocab_size"]),
            norm_eps=float(data.get("norm_eps", 1e-5)),
            rope_theta=rope_theta,
            sliding_window=_effective_window(data.get("sliding_window"), rope_theta, int(context)),
            max_context=int(context),
        )

    @classmethod
    def from_hf_config(cls, data: dict[str, Any]) -> ModelConfig:
        """From an HF `config.json`, with either a top-level `rope_theta` or transformers 5's `rope_parameters`."""
        n_heads = int(data["num_attention_heads"])
        dim = int(data["hidden_size"])
        rope_params = data.get("rope_parameters") or {}
        rope_theta = float(data.get("rope_theta") or rope_params.get("rope_theta") or 10000.0)
        context = int(data.get("max_position_embeddings") or _default_context(rope_theta))
        return cls(
            dim=dim,
            n_layers=int(data["num_hidden_layers"]),
            n_heads=n_heads,
            n_kv_heads=int(data.get("num_key_value_heads") or n_heads),
            head_dim=int(data.get("head_dim") or dim // n_heads),
            hidden_dim=int(data["intermediate_size"]),
            vocab_size=int(data["vocab_size"]),
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
                except (ValueError, TypeError, KeyError) as exc:
                    detail = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
                    raise MistralError(f"{path} is not a valid model config ({detail}).") from None
        raise MistralError(f"{folder} is not a model folder: it has neither params.json nor config.json.")


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
