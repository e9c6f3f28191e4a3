"""Where prepared weights live, what names each file and what it was made from, read without torch (for `mistral
info` and the quick path, engine/quick.py); engine/prepared.py writes and maps them."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mistral_cli.model.config import ModelConfig

SUFFIX = ".safetensors"
PREPARE_ENV = "MISTRAL_PREPARE"  # "off": never write or map prepared files
# Raise when what a prepared file holds changes meaning: older files are then never loaded. 2: the RoPE tables.
LAYOUT_VERSION = 2
ROPE = ("rope.cos", "rope.sin")  # the RoPE tables of every position, (max_context, 1, head_dim) in the model's dtype
_EDGE = 1 << 16  # bytes hashed at each end of a source file for its identity


def folder() -> Path:
    """The prepared files' folder, under the user cache folder (XDG_CACHE_HOME on Linux)."""
    from platformdirs import user_cache_path

    return user_cache_path("mistral-cli") / "prepared"


@dataclass
class PreparedFile:
    path: Path
    size: int  # bytes on disk (the padding between tensors is left as holes)
    made_of: dict[str, Any]  # engine/prepared.py `describe`: source folder and files, dtype, quantization, layout


def list_prepared(source_folder: str | None = None) -> list[PreparedFile]:
    """The prepared files in the cache folder, by name; only those of one model folder (its resolved path) when
    given. A file whose header cannot be read is listed with nothing known of it."""
    base = folder()
    found = []
    for path in sorted(base.glob(f"*{SUFFIX}")) if base.is_dir() else []:
        try:
            made_of = made_of_file(path)
        except (OSError, ValueError, KeyError, TypeError):
            made_of = {}
        if source_folder is None or made_of.get("folder") == source_folder:
            try:
                size = path.stat().st_blocks * 512
            except OSError:
                continue  # removed meanwhile
            found.append(PreparedFile(path, size, made_of))
    return found


def made_of_file(path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        if length > 64 << 20:
            raise ValueError("header too long")
        return json.loads(json.loads(f.read(length))["__metadata__"]["mistral-cli"])["made_of"]


def source_identity(files: tuple[Path, ...]) -> list[list[Any]]:
    """What identifies each source file cheaply: name, size, modification time and a hash of both ends (the
    safetensors header is at the start; a rewrite in place changes the time)."""
    out = []
    for path in files:
        st = path.stat()
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            digest.update(f.read(_EDGE))
            if st.st_size > 2 * _EDGE:
                f.seek(st.st_size - _EDGE)
                digest.update(f.read(_EDGE))
        out.append([path.name, st.st_size, st.st_mtime_ns, digest.hexdigest()])
    return out


def describe(
    files: tuple[Path, ...], cfg: ModelConfig, dtype: str, quantize: str, layout: str, torch_version: str
) -> dict[str, Any]:
    """Everything a prepared file depends on (dtype as safetensors names it, "BF16"); its hash names the file."""
    return {
        "version": LAYOUT_VERSION,
        "torch": torch_version,
        "folder": str(files[0].parent.resolve()),
        "sources": source_identity(files),
        "config": cfg.to_dict(),
        "dtype": dtype,
        "quantize": quantize,
        "layout": layout,
    }


def file_for(made_of: dict[str, Any]) -> Path:
    key = hashlib.sha256(json.dumps(made_of, sort_keys=True).encode()).hexdigest()[:20]
    name = Path(made_of["folder"]).name or "model"
    return folder() / f"{name}-{made_of['dtype'].lower()}-{made_of['quantize']}-{key}{SUFFIX}"
