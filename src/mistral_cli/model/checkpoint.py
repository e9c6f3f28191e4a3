"""Checkpoint tensors: the one place that knows weight names, the q/k permutation and fusing (docs/FORMAT.md
sections 2 and 3); everything else sees our layout.

Formats: HF safetensors (single file or sharded with an index), native `consolidated.safetensors`, native
`consolidated.00.pth` (zip-format torch pickle, loaded with weights_only=True and mmap=True). `load_state` yields
each tensor read, converted and placed one at a time, so that the loader (engine/load.py) never holds much more
than the final weights. Safetensors files are read with plain reads into each tensor's own buffer, not mapped:
pages of a mapped file count as resident memory for as long as the mapping lives, a whole shard beside the model.
"""

from __future__ import annotations

import ctypes
import os
import pickle
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from io import FileIO
from pathlib import Path

import torch

from mistral_cli.errors import MistralError
from mistral_cli.model.config import ModelConfig
from mistral_cli.model.files import weight_paths
from mistral_cli.model.placement import Placement
from mistral_cli.model.safetensors import CorruptFile, Entry, fill, first_line, read_header

HF_TO_NATIVE = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
HF_LAYER_TO_NATIVE = {
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3",
}
# Our fused parameters and the native tensors they are made of, in order.
FUSED = {
    "attention.wqkv": ("attention.wq", "attention.wk", "attention.wv"),
    "feed_forward.w13": ("feed_forward.w1", "feed_forward.w3"),
}
_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)\.weight")
_NATIVE_LAYER = re.compile(r"layers\.(\d+)\.(.+)\.weight")


@dataclass(frozen=True)
class WeightFiles:
    kind: str  # "safetensors" | "pth"
    files: tuple[Path, ...]


def find_weights(folder: Path) -> WeightFiles:
    files = weight_paths(folder)  # the one place that decides which files hold a folder's weights
    return WeightFiles("pth" if files[0].suffix == ".pth" else "safetensors", files)


def check_size(weights: WeightFiles, cfg: ModelConfig) -> None:
    """Refuse a config that claims more parameters than its weight files could hold (ModelConfig.size_problem)."""
    problem = cfg.size_problem(sum(path.stat().st_size for path in weights.files), weights.files[0].parent)
    if problem:
        raise MistralError(problem)


def iter_tensors(weights: WeightFiles) -> Iterator[tuple[str, torch.Tensor, Path]]:
    for path in weights.files:
        if weights.kind == "safetensors":
            yield from _iter_safetensors(path)
        else:
            yield from _iter_pth(path)


# the safetensors dtypes we read, as torch dtypes; the data are little-endian, as on every host torch runs on
# (big-endian is not handled). The header itself is read and checked by model/safetensors.py.
SAFETENSORS_DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _iter_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor, Path]]:
    try:
        with open(path, "rb", buffering=0) as f:
            if hasattr(os, "posix_fadvise"):  # read ahead hard: every byte is read once, front to back
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
            # every entry checked, its dtype too, before the first byte of data is read; then in the order of the data
            entries = [(e, _torch_dtype(e, path)) for e in sorted(read_header(f, path), key=lambda e: e.begin)]
            for entry, dtype in entries:
                f.seek(entry.begin)
                # not bound to a name: this frame keeps no reference while the consumer works on it
                yield entry.name, _read_tensor(f, entry, dtype, path), path
    except OSError as exc:
        raise MistralError(f"{path} could not be read ({exc.strerror or exc}).") from None


def _torch_dtype(entry: Entry, path: Path) -> torch.dtype:
    if entry.dtype not in SAFETENSORS_DTYPES:
        raise MistralError(f"{path}: tensor {entry.name} has dtype {entry.dtype}, which mistral-cli does not read.")
    return SAFETENSORS_DTYPES[entry.dtype]


def _read_tensor(f: FileIO, entry: Entry, dtype: torch.dtype, path: Path) -> torch.Tensor:
    buf = torch.empty(entry.nbytes, dtype=torch.uint8)  # fresh private memory: the model owns it
    if buf.numel():  # torch tensors have no buffer protocol: reach the bytes through ctypes
        fill(f, memoryview((ctypes.c_ubyte * buf.numel()).from_address(buf.data_ptr())).cast("B"), path)
    return buf.view(dtype).view(entry.shape)


def _iter_pth(path: Path) -> Iterator[tuple[str, torch.Tensor, Path]]:
    try:
        with warnings.catch_warnings():  # torch's notes on pickle protocols are not for our users
            warnings.simplefilter("ignore")
            state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:
        raise MistralError(
            f"{path} needs arbitrary Python code to load (unsafe pickle); only plain tensor checkpoints are accepted."
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        raise CorruptFile(path, first_line(exc)) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MistralError(f"{path} is not a state dict of tensors.")
    for name in list(state):
        yield name, state.pop(name), path  # pop: drop our reference as soon as the tensor is consumed


def native_name(name: str) -> str | None:
    """Native (consolidated) name of a checkpoint tensor in either naming, or None for tensors we do not use."""
    if name in HF_TO_NATIVE:
        return HF_TO_NATIVE[name]
    if m := _HF_LAYER.fullmatch(name):
        inner = HF_LAYER_TO_NATIVE.get(m.group(2))
        return f"layers.{m.group(1)}.{inner}.weight" if inner else None
    if name in HF_TO_NATIVE.values() or _NATIVE_LAYER.fullmatch(name):
        return name
    return None


def native_to_hf_rope(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """Rows of a native q/k projection (interleaved RoPE pairs) reordered for RoPE on halves (docs/FORMAT.md section 3)."""
    dim = w.shape[1]
    return w.view(n_heads, head_dim // 2, 2, dim).transpose(1, 2).reshape(n_heads * head_dim, dim)


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    shapes: dict[str, tuple[int, ...]] = {
        "tok_embeddings.weight": (cfg.vocab_size, cfg.dim),
        "norm.weight": (cfg.dim,),
        "output.weight": (cfg.vocab_size, cfg.dim),
    }
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        shapes |= {
            p + "attention_norm.weight": (cfg.dim,),
            p + "ffn_norm.weight": (cfg.dim,),
            p + "attention.wq.weight": (q, cfg.dim),
            p + "attention.wk.weight": (kv, cfg.dim),
            p + "attention.wv.weight": (kv, cfg.dim),
            p + "attention.wo.weight": (cfg.dim, q),
            p + "feed_forward.w1.weight": (cfg.hidden_dim, cfg.dim),
            p + "feed_forward.w2.weight": (cfg.dim, cfg.hidden_dim),
            p + "feed_forward.w3.weight": (cfg.hidden_dim, cfg.dim),
        }
    return shapes


def load_state(
    weights: WeightFiles, cfg: ModelConfig, placement: Placement, *, fuse: bool = True
) -> Iterator[tuple[str, torch.Tensor | list[torch.Tensor]]]:
    """Yield (our parameter name, tensor on the target device and dtype), fusing q/k/v and gate/up.

    With fuse=False a fused parameter comes as the list of its parts, in row order, for a consumer that turns
    them into something else (quantized rows) and would only throw the concatenated float tensor away.
    """
    shapes = expected_shapes(cfg)
    seen: set[str] = set()
    pending: dict[str, torch.Tensor] = {}  # parts of a fused parameter waiting for their siblings
    # a tensor from an mmap'd .pth is a view of the file's mapping, which would keep the whole file mapped and
    # resident beside the model: copy it even when nothing changes; safetensors are read into private buffers
    copy = weights.kind == "pth"
    for name, tensor, path in iter_tensors(weights):
        native = native_name(name)
        if native is None:
            continue  # e.g. rotary inv_freq buffers in old HF checkpoints
        if native not in shapes:
            raise MistralError(
                f"{path} has tensor {name}, which a {cfg.n_layers}-layer model does not have; "
                "the config does not match the weights."
            )
        if tuple(tensor.shape) != shapes[native]:
            raise MistralError(
                f"{path}: tensor {name} has shape {list(tensor.shape)} but the config expects {list(shapes[native])}."
            )
        if native in seen:
            raise MistralError(f"{path}: tensor {name} appears twice in the checkpoint.")
        seen.add(native)
        is_hf = native != name
        if not is_hf and native.endswith(("attention.wq.weight", "attention.wk.weight")):
            heads = cfg.n_heads if ".wq." in native else cfg.n_kv_heads
            tensor = native_to_hf_rope(tensor, heads, cfg.head_dim)
        tensor = tensor.to(device=placement.device, dtype=placement.dtype, copy=copy)
        fused = _fused_target(native)
        if fused is None:
            yield native, tensor
            continue
        target, parts = fused
        pending[native] = tensor
        if all(k in pending for k in parts):
            ready = [pending.pop(k) for k in parts]
            yield target, torch.cat(ready, dim=0) if fuse else ready
            del ready
    missing = sorted(set(shapes) - seen, key=_natural)
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise MistralError(f"The checkpoint in {weights.files[0].parent} lacks tensor {missing[0]}{more}.")


def _fused_target(native: str) -> tuple[str, tuple[str, ...]] | None:
    """'layers.3.attention.wk.weight' -> ('layers.3.attention.wqkv.weight', (...wq, ...wk, ...wv names))."""
    m = _NATIVE_LAYER.fullmatch(native)
    if not m:
        return None
    for fused, parts in FUSED.items():
        if m.group(2) in parts:
            layer = f"layers.{m.group(1)}."
            return f"{layer}{fused}.weight", tuple(f"{layer}{p}.weight" for p in parts)
    return None


def _natural(name: str) -> list[object]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]
