"""Where prepared weights live and what each file was made from, read without torch (for `mistral info`);
engine/prepared.py writes and maps them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUFFIX = ".safetensors"


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
