"""Tiny random-weight Mistral models written to disk in every checkpoint format, with the real v1 tokenizer.

The weights are made once in HF layout; the native files are derived with the inverse of the HF converter's
q/k permutation (docs/FORMAT.md section 3), so loading both must give the same network.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import save_file


@dataclass(frozen=True)
class TinySpec:
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int = 16
    hidden_dim: int = 128
    vocab_size: int = 32000
    norm_eps: float = 1e-5
    rope_theta: float = 1e6
    sliding_window: int | None = None
    max_context: int = 32768

    def but(self, **changes: object) -> TinySpec:
        return replace(self, **changes)


V01 = TinySpec(rope_theta=1e4, sliding_window=6, max_context=8192)


def tokenizer_path() -> Path:
    import mistral_common

    return Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"


def random_state_dict(spec: TinySpec, seed: int = 0) -> dict[str, torch.Tensor]:
    """HF names, float32; scaled so logits are spread out (greedy choices are not near-ties)."""
    g = torch.Generator().manual_seed(seed)

    def lin(out_f: int, in_f: int) -> torch.Tensor:
        return torch.randn(out_f, in_f, generator=g) / in_f**0.5

    def norm() -> torch.Tensor:
        return 1.0 + 0.1 * torch.randn(spec.dim, generator=g)

    q, kv = spec.n_heads * spec.head_dim, spec.n_kv_heads * spec.head_dim
    sd = {"model.embed_tokens.weight": torch.randn(spec.vocab_size, spec.dim, generator=g)}
    for i in range(spec.n_layers):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = norm()
        sd[p + "self_attn.q_proj.weight"] = lin(q, spec.dim)
        sd[p + "self_attn.k_proj.weight"] = lin(kv, spec.dim)
        sd[p + "self_attn.v_proj.weight"] = lin(kv, spec.dim)
        sd[p + "self_attn.o_proj.weight"] = lin(spec.dim, q)
        sd[p + "post_attention_layernorm.weight"] = norm()
        sd[p + "mlp.gate_proj.weight"] = lin(spec.hidden_dim, spec.dim)
        sd[p + "mlp.up_proj.weight"] = lin(spec.hidden_dim, spec.dim)
        sd[p + "mlp.down_proj.weight"] = lin(spec.dim, spec.hidden_dim)
    sd["model.norm.weight"] = norm()
    sd["lm_head.weight"] = 4 * lin(spec.vocab_size, spec.dim)
    return sd


def hf_config(spec: TinySpec, rope_parameters: bool = False) -> dict:
    cfg = {
        "architectures": ["MistralForCausalLM"],
        "model_type": "mistral",
        "hidden_size": spec.dim,
        "num_hidden_layers": spec.n_layers,
        "num_attention_heads": spec.n_heads,
        "num_key_value_heads": spec.n_kv_heads,
        "head_dim": spec.head_dim,
        "intermediate_size": spec.hidden_dim,
        "vocab_size": spec.vocab_size,
        "rms_norm_eps": spec.norm_eps,
        "sliding_window": spec.sliding_window,
        "max_position_embeddings": spec.max_context,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "bfloat16",
    }
    if rope_parameters:
        cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": spec.rope_theta}
    else:
        cfg["rope_theta"] = spec.rope_theta
    return cfg


def write_hf(
    folder: Path,
    spec: TinySpec,
    sd: dict[str, torch.Tensor],
    *,
    shards: int = 1,
    dtype: torch.dtype = torch.float32,
    rope_parameters: bool = False,
    tokenizer: bool = True,
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(hf_config(spec, rope_parameters), indent=2))
    tensors = {k: v.to(dtype).contiguous() for k, v in sd.items()}
    if shards == 1:
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    else:
        names = list(tensors)  # dealt out in turn: q and k of a layer land in different shards
        save_shards(folder, ({k: tensors[k] for k in names[s::shards]} for s in range(shards)))
    if tokenizer:
        shutil.copy(tokenizer_path(), folder / "tokenizer.model")
    return folder


def save_shards(folder: Path, shards: Iterable[dict[str, torch.Tensor]]) -> None:
    """HF's sharded layout: model-0000i-of-0000n.safetensors and model.safetensors.index.json.

    Each shard is saved as it comes, so a generator of shards needs only one in memory at a time; the files get
    their names, which hold the number of shards, at the end."""
    names: list[list[str]] = []  # tensor names per shard, in order
    total = 0
    for shard in shards:
        save_file(shard, folder / f"part-{len(names)}.safetensors", metadata={"format": "pt"})
        names.append(list(shard))
        total += sum(t.numel() * t.element_size() for t in shard.values())
        del shard  # before the generator builds the next one
    weight_map: dict[str, str] = {}
    for i, shard_names in enumerate(names):
        final = f"model-{i + 1:05d}-of-{len(names):05d}.safetensors"
        (folder / f"part-{i}.safetensors").rename(folder / final)
        weight_map.update(dict.fromkeys(shard_names, final))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _to_native(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    dim = w.shape[1]
    return w.view(n_heads, 2, head_dim // 2, dim).transpose(1, 2).reshape(n_heads * head_dim, dim)


def native_state_dict(spec: TinySpec, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {
        "tok_embeddings.weight": sd["model.embed_tokens.weight"],
        "norm.weight": sd["model.norm.weight"],
        "output.weight": sd["lm_head.weight"],
    }
    for i in range(spec.n_layers):
        h, n = f"model.layers.{i}.", f"layers.{i}."
        out[n + "attention_norm.weight"] = sd[h + "input_layernorm.weight"]
        out[n + "ffn_norm.weight"] = sd[h + "post_attention_layernorm.weight"]
        out[n + "attention.wq.weight"] = _to_native(sd[h + "self_attn.q_proj.weight"], spec.n_heads, spec.head_dim)
        out[n + "attention.wk.weight"] = _to_native(sd[h + "self_attn.k_proj.weight"], spec.n_kv_heads, spec.head_dim)
        out[n + "attention.wv.weight"] = sd[h + "self_attn.v_proj.weight"]
        out[n + "attention.wo.weight"] = sd[h + "self_attn.o_proj.weight"]
        out[n + "feed_forward.w1.weight"] = sd[h + "mlp.gate_proj.weight"]
        out[n + "feed_forward.w2.weight"] = sd[h + "mlp.down_proj.weight"]
        out[n + "feed_forward.w3.weight"] = sd[h + "mlp.up_proj.weight"]
    return out


def params_json(spec: TinySpec) -> dict:
    params = {
        "dim": spec.dim,
        "n_layers": spec.n_layers,
        "head_dim": spec.head_dim,
        "hidden_dim": spec.hidden_dim,
        "n_heads": spec.n_heads,
        "n_kv_heads": spec.n_kv_heads,
        "norm_eps": spec.norm_eps,
        "vocab_size": spec.vocab_size,
    }
    if spec.rope_theta != 1e4:  # v0.1's params.json has no rope_theta
        params["rope_theta"] = spec.rope_theta
    if spec.sliding_window is not None:
        params["sliding_window"] = spec.sliding_window
    return params


def write_native(
    folder: Path,
    spec: TinySpec,
    sd: dict[str, torch.Tensor],
    *,
    fmt: str = "safetensors",
    dtype: torch.dtype = torch.float32,
    tokenizer: bool = True,
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.json").write_text(json.dumps(params_json(spec), indent=2))
    tensors = {k: v.to(dtype).contiguous() for k, v in native_state_dict(spec, sd).items()}
    if fmt == "safetensors":
        save_file(tensors, folder / "consolidated.safetensors")
    elif fmt == "pth":
        torch.save(tensors, folder / "consolidated.00.pth")
    else:
        raise ValueError(fmt)
    if tokenizer:
        shutil.copy(tokenizer_path(), folder / "tokenizer.model")
    return folder


def hf_reference(spec: TinySpec, sd: dict[str, torch.Tensor]):
    """transformers' MistralForCausalLM on the same weights, fp32, eager attention: the independent reference."""
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(**{k: v for k, v in hf_config(spec).items() if k not in ("architectures", "torch_dtype")})
    cfg._attn_implementation = "eager"
    model = MistralForCausalLM(cfg).eval()
    model.load_state_dict(sd, strict=True)
    return model
