"""Prepared weights: the model exactly as the engine holds it, in one file that later loads map in place.

Building a model from a checkpoint converts every tensor (dtype, the fused q/k/v and gate/up rows, quantized values
and scales in our kernels' layouts) into fresh memory: 15-20 s for the 7B model on a small machine, on every call of
`mistral complete`. The first load writes the result to a prepared file under the cache folder; later loads map that
file and use its tensors where they lie, so a warm call costs little more than starting Python, and two processes on
one model share one copy in the page cache.

The file is a valid safetensors file (docs/FORMAT.md section 8), written here rather than by the safetensors library
because the library packs tensors end to end: ours starts every large tensor on a 2 MiB boundary (with the header
padded to one), so the kernel can map it with huge pages where the filesystem allows (ext4 and XFS on recent
kernels, tmpfs), and every other tensor on 64 bytes. The gaps are named padding entries, left as holes in the file.
Its `__metadata__` holds what the model is made of: the config, and for each quantized layer its class and plain
attributes, so a load rebuilds the same modules around the mapped tensors without computing anything.

A prepared file is named by a key of everything that shapes it: the source files (name, size, modification time and
a hash of their first and last bytes), the dtype, the quantization, the layout (our kernels' or torch's, on which
device type), LAYOUT_VERSION and torch's version. A changed checkpoint or a new layout gets a new key, so a stale file
is never loaded; the previous file for the same model and settings is removed when its successor is written.
Preparation is skipped, with a reason the command line prints, when it is switched off (`--no-prepare`,
MISTRAL_PREPARE=off), when the disk has no room or the cache folder cannot be written; loading then reads the
checkpoint as before. The file is written to a temporary name, flushed and renamed: an interrupted preparation
leaves nothing that a load would take for a prepared file.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import mmap
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mistral_cli.errors import MistralError
from mistral_cli.hardware import switched_off
from mistral_cli.model import prepared_files, quant
from mistral_cli.model.config import ModelConfig
from mistral_cli.model.prepared_files import (
    POPULATE,
    PREPARE_ENV,
    ROPE,
    ReadAhead,
    file_for,
    list_prepared,
    read_ahead,
    reading_order,
)
from mistral_cli.model.safetensors import CorruptFile, read_header
from mistral_cli.model.transformer import Transformer
from mistral_cli.native import quant as native_quant
from mistral_cli.native.kernels import Kernels

ALIGN = 2 << 20  # where tensors of at least BIG bytes start: a huge page
BIG = 1 << 20
SMALL_ALIGN = 64  # where the others start: the widest vector load

# The module classes a prepared file may name, by name: nothing else is ever built from one.
CLASSES: dict[str, type[nn.Module]] = {
    cls.__name__: cls
    for cls in (
        quant.WeightOnlyInt8Linear,
        quant.WeightOnlyInt4Linear,
        quant.TorchInt4Linear,
        native_quant.NativeInt8Linear,
        native_quant.NativeInt4Linear,
    )
}
DTYPES = {
    torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
}  # fmt: skip
TORCH_DTYPES = {name: dtype for dtype, name in DTYPES.items()}


@dataclass
class Outcome:
    """How the weights were loaded, for --verbose, and a warning for every run when preparing failed."""

    model: Transformer
    note: str
    warning: str | None = None
    reading: ReadAhead | None = None  # a mapped file read into memory ahead of the first pass


# ------------------------------------------------------------------------------------------------------------ keys


def describe(
    files: tuple[Path, ...], cfg: ModelConfig, dtype: torch.dtype, quantize: str, layout: str
) -> dict[str, Any]:
    """Everything the prepared file depends on; its hash names the file (model/prepared_files.py)."""
    return prepared_files.describe(files, cfg, DTYPES[dtype], quantize, layout, torch.__version__)


# --------------------------------------------------------------------------------------------------------- loading


def load_or_prepare(
    files: tuple[Path, ...],
    cfg: ModelConfig,
    device: torch.device,
    dtype: torch.dtype,
    quantize: str,
    kernels: Kernels | None,
    build: Callable[[], Transformer],
    *,
    enabled: bool = True,
) -> Outcome:
    """The model from its prepared file, mapped; else `build()` it from the checkpoint and write the prepared file
    for the next load (skipped, with a warning, where it cannot be written)."""
    if not enabled or switched_off(PREPARE_ENV):
        why = "--no-prepare" if not enabled else f"{PREPARE_ENV}=off"
        return Outcome(build(), f"read the checkpoint (prepared weights are off: {why})")
    layout = f"{'ours' if kernels is not None else 'torch'}-{device.type}"
    made_of = describe(files, cfg, dtype, quantize, layout)
    path = file_for(made_of)
    if path.is_file():
        try:
            model, reading = restore(path, cfg, device, kernels)
            return Outcome(model, f"mapped the prepared weights in {path}", reading=reading)
        except (OSError, MistralError, ValueError, KeyError, TypeError) as e:
            reason = e.strerror if isinstance(e, OSError) else str(e)
            with contextlib.suppress(OSError):
                path.unlink()  # corrupt or from a build that wrote it differently: made again below
            warning = f"the prepared weights in {path} could not be used ({reason}); preparing them again."
            model = build()
            return Outcome(model, f"read the checkpoint; {_write_or_why(model, path, made_of)}", warning)
    model = build()
    outcome = _write_or_why(model, path, made_of)
    if outcome.startswith("prepared"):
        return Outcome(model, f"read the checkpoint and {outcome}")
    return Outcome(model, "read the checkpoint", f"prepared weights not written: {outcome}; each load reads the "
                   "checkpoint (--no-prepare or MISTRAL_PREPARE=off says this is meant).")  # fmt: skip


def _write_or_why(model: Transformer, path: Path, made_of: dict[str, Any]) -> str:
    try:
        size = write(path, model, made_of)
    except OSError as e:
        return f"{path.parent}: {e.strerror or e}"
    except MistralError as e:
        return str(e).rstrip(".")
    for tmp in path.parent.glob(".*.tmp"):  # left by a preparation that was killed (Ctrl-C removes its own)
        with contextlib.suppress(OSError):
            if time.time() - tmp.stat().st_mtime > 3600:  # not one being written right now
                tmp.unlink()
    for old in list_prepared(made_of["folder"]):
        same = all(old.made_of.get(k) == made_of[k] for k in ("dtype", "quantize", "layout"))
        if same and old.path != path:
            with contextlib.suppress(OSError):
                old.path.unlink()  # made from an older state of the same checkpoint, or an older layout
    return f"prepared {path} ({size / 1e9:.2f} GB) for the next loads"


def restore(
    path: Path, cfg: ModelConfig, device: torch.device, kernels: Kernels | None
) -> tuple[Transformer, ReadAhead | None]:
    """Rebuild the model around the tensors of a prepared file, mapped (on a GPU: copied there from the mapping);
    and the file's reading ahead, if started."""
    tensors, meta, reading = read(path)
    if meta.get("config") != cfg.to_dict():
        raise ValueError("it was made for another config")
    with torch.device("meta"):
        model = Transformer(cfg)
    for name, spec in meta["modules"].items():
        cls = CLASSES[spec["class"]]
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.__dict__.update(spec["attrs"])
        if spec.get("kernels"):
            if kernels is None:
                raise ValueError("it was made for our kernels, which are not in use")
            module.kernels = kernels  # type: ignore[assignment]
        for buffer in spec["buffers"]:
            module.register_buffer(buffer, _to(tensors.pop(f"{name}.{buffer}"), device))
        quant.replace_module(model, name, module)
    rope = tuple(_to(tensors.pop(name), device) for name in ROPE)
    dtype = tensors["tok_embeddings.weight"].dtype
    if any(t.dtype != dtype or t.dim() != 3 or t.shape[1:] != (1, cfg.head_dim) for t in rope):
        raise ValueError("its RoPE tables do not fit the model")
    model._rope = rope  # type: ignore[assignment]  # the tables of every position, as the quick path reads them
    state = {k: _to(v, device) for k, v in tensors.items()}
    # not strict: the quantized layers above hold their own tensors; what is still on "meta" after this is missing
    unexpected = model.load_state_dict(state, strict=False, assign=True).unexpected_keys
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if unexpected or left:
        raise ValueError(f"its tensors do not fit the model ({(unexpected or left)[0]})")
    model.set_upcast(bool(meta["upcast"]))
    return model.eval().requires_grad_(False), reading


def _to(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    return tensor if device.type == "cpu" else tensor.to(device)  # one copy, from the mapping to the GPU


# --------------------------------------------------------------------------------------------------------- the file


def modules_of(model: nn.Module) -> dict[str, dict[str, Any]]:
    """The quantized layers of a model as a prepared file records them: class, plain attributes, buffer names."""
    out = {}
    for name, module in model.named_modules():
        cls = type(module).__name__
        if CLASSES.get(cls) is not type(module):
            if cls in CLASSES or hasattr(module, "scales") or hasattr(module, "scales_and_lows"):
                raise MistralError(f"the layer {name} ({cls}) is not one a prepared file can hold")
            continue
        attrs = {k: v for k, v in vars(module).items() if not k.startswith("_") and k not in ("training", "kernels")}
        for key, value in attrs.items():
            if not isinstance(value, (bool, int, float, str, type(None))):
                raise MistralError(f"the layer {name} has an attribute {key} a prepared file cannot hold")
        out[name] = {
            "class": cls,
            "attrs": attrs,
            "kernels": hasattr(module, "kernels"),
            "buffers": [b for b, _ in module.named_buffers(recurse=False)],
        }
    return out


def write(path: Path, model: Transformer, made_of: dict[str, Any]) -> int:
    """Write the model's tensors and structure to `path` (a temporary file, then a rename); returns its size."""
    state = model.state_dict()
    device = next(iter(state.values())).device
    state.update(zip(ROPE, (t.contiguous() for t in model.rope_rows(model.cfg.max_context, device)), strict=True))
    meta = {
        "made_of": made_of,
        "config": model.cfg.to_dict(),
        "modules": modules_of(model),
        "upcast": any(getattr(m, "upcast", False) for m in model.modules()),
    }
    header: dict[str, Any] = {"__metadata__": {"mistral-cli": json.dumps(meta)}}
    places: list[tuple[int, torch.Tensor]] = []
    end = 0
    for name, tensor in state.items():
        if tensor.dtype not in DTYPES:
            raise MistralError(f"the tensor {name} has dtype {tensor.dtype}, which a prepared file cannot hold")
        nbytes = tensor.numel() * tensor.element_size()
        align = ALIGN if nbytes >= BIG else SMALL_ALIGN
        start = -(-end // align) * align
        if start > end:  # safetensors wants the data packed: the gap is a named padding entry
            header[f"__padding_{len(places)}__"] = {"dtype": "U8", "shape": [start - end], "data_offsets": [end, start]}
        header[name] = {
            "dtype": DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [start, start + nbytes],
        }
        places.append((start, tensor))
        end = start + nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    data_start = -(-(8 + len(text)) // ALIGN) * ALIGN
    text += b" " * (data_start - 8 - len(text))  # the format allows trailing spaces in the header
    total = data_start + end

    path.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(path.parent).free
    if free < total + (1 << 30):
        raise MistralError(
            f"{path.parent} has {free / 1e9:.1f} GB free and the prepared weights need {total / 1e9:.1f} GB "
            "(and 1 GB to spare)"
        )
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(len(text).to_bytes(8, "little"))
            f.write(text)
            for start, tensor in places:
                f.seek(data_start + start)  # padding stays a hole
                _write_tensor(f, tensor)
            f.truncate(total)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return total


def _write_tensor(f: Any, tensor: torch.Tensor) -> None:
    """The tensor's bytes, straight from its memory (no numpy, no copy on the CPU)."""
    t = tensor.detach()
    t = t.cpu() if t.device.type != "cpu" else t
    t = t.contiguous()
    nbytes = t.numel() * t.element_size()
    step = 1 << 28
    for offset in range(0, nbytes, step):
        n = min(step, nbytes - offset)
        f.write((ctypes.c_char * n).from_address(t.data_ptr() + offset))


def read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], ReadAhead | None]:
    """The tensors of a prepared file as views of one read-only shared mapping, its metadata, and the reading of the
    file into memory ahead of the first pass (model/prepared_files.py), if started."""
    with open(path, "rb") as f:
        entries = read_header(f, path)  # checked: every tensor inside the file, packed with the padding
        f.seek(0)
        length = int.from_bytes(f.read(8), "little")
        meta = json.loads(json.loads(f.read(length))["__metadata__"]["mistral-cli"])
        mapping = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        with contextlib.suppress(OSError):
            mapping.madvise(mmap.MADV_HUGEPAGE)  # 2 MiB pages where the filesystem can: fewer TLB misses
    reading = read_ahead(lambda offset, n: mapping.madvise(POPULATE, offset, n), reading_order(entries), len(mapping))
    tensors = {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not writable.*")  # never written: the model is read-only
        for e in entries:
            if e.name.startswith("__padding_"):
                continue
            if e.dtype not in TORCH_DTYPES:
                raise CorruptFile(path, f"tensor {e.name} has dtype {e.dtype}")
            dtype = TORCH_DTYPES[e.dtype]
            if e.nbytes == 0:
                tensors[e.name] = torch.empty(e.shape, dtype=dtype)
                continue
            raw = torch.frombuffer(mapping, dtype=torch.uint8, count=e.nbytes, offset=e.begin)
            tensors[e.name] = raw.view(dtype).view(e.shape)
    return tensors, meta, reading
