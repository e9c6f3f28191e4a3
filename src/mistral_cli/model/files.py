"""Which files of a model folder hold its config and its weights: the same choice for the loader, `mistral info`
and the downloads' checks (docs/FORMAT.md section 2). No torch."""

from __future__ import annotations

import json
from pathlib import Path

from mistral_cli.errors import MistralError


def model_files(folder: Path) -> tuple[str, Path, tuple[Path, ...]]:
    """(format, config file, weight files) of a model folder; the same choices as the checkpoint loader."""
    native = folder / "params.json"
    hf = folder / "config.json"
    if native.is_file():
        config, fmt = native, "native"
    elif hf.is_file():
        config, fmt = hf, "hf"
    else:
        raise MistralError(f"{folder} is not a model folder: it has neither config.json nor params.json.")
    return fmt, config, weight_paths(folder)


def weight_paths(folder: Path) -> tuple[Path, ...]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
            raise MistralError(f"{index} is not a valid safetensors index (no weight_map).") from None
        # a shard is a file of this folder: a name with a separator or '..' could reach any file on the machine
        strange = [n for n in names if not isinstance(n, str) or n in ("", ".", "..") or Path(n).name != n]
        if strange:
            raise MistralError(
                f"{index} names a weight file outside the model folder ({strange[0]!r}); it is not a valid index."
            )
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise MistralError(f"{folder / missing[0]} is missing (listed in {index.name}); download the model again.")
        return tuple(folder / n for n in names)
    for single in ("model.safetensors", "consolidated.safetensors"):
        if (folder / single).is_file():
            return (folder / single,)
    shards = sorted(folder.glob("model-*-of-*.safetensors"))
    if shards:
        return tuple(shards)
    pth = sorted(folder.glob("consolidated.*.pth"))
    if len(pth) > 1:
        raise MistralError(
            f"{folder} holds a checkpoint split for model parallelism ({len(pth)} .pth files); "
            "only single-file checkpoints are supported."
        )
    if pth:
        return (pth[0],)
    hint = (
        " (only PyTorch .bin files, which are not supported: use the safetensors files)"
        if any(folder.glob("pytorch_model*.bin"))
        else ""
    )
    raise MistralError(
        f"{folder} has no model weights{hint}: expected model*.safetensors, consolidated.safetensors "
        "or consolidated.00.pth."
    )
