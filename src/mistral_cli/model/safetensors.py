"""The safetensors format, read without torch: a file's header, parsed and checked against the file.

A safetensors file is an 8-byte little-endian length, that much JSON (a name -> {dtype, shape, data_offsets} object,
with an optional "__metadata__"), then the tensors' bytes, packed. `read_header` checks everything before the first
byte of data is read: each entry's fields, its byte count against its shape and dtype, and that the tensors fill the
rest of the file exactly, each starting where the one before it ends. The loader (checkpoint.py) maps the dtype
names to torch dtypes and reads the data; `mistral info` (hub/models.py) only counts them.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from mistral_cli.errors import MistralError

# bytes per element of each safetensors dtype name; the data are little-endian. The sizes of other names (4- and
# 6-bit floats) are not known here, so their entries' byte counts go unchecked: the loader refuses those dtypes.
DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}  # fmt: skip
MAX_HEADER = 100_000_000  # the safetensors library's own limit on the JSON header


@dataclass(frozen=True)
class Entry:
    """One tensor of a safetensors file, as its header describes it."""

    name: str
    dtype: str  # safetensors' name: BF16, F16, F32, ...
    shape: tuple[int, ...]
    begin: int  # byte offsets from the file's start
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class CorruptFile(MistralError):
    """A weight file that is truncated or corrupt; `no_header` when it does not even start with a safetensors
    header (too short, or a header length the file cannot hold)."""

    def __init__(self, path: Path, why: str, *, no_header: bool = False) -> None:
        super().__init__(f"{path} is truncated or corrupt ({why}); download it again.")
        self.no_header = no_header


def read_header(f: BinaryIO, path: Path) -> list[Entry]:
    """The tensors of the safetensors file `f` (open for binary reading at its start; `path` names it in errors),
    in the order of its header, once the header is checked against the file. Raises CorruptFile."""
    size = os.fstat(f.fileno()).st_size
    if size < 8:
        raise CorruptFile(path, f"{size} bytes, too short for a header", no_header=True)
    length = int.from_bytes(_read_bytes(f, 8, path), "little")
    if length > min(size - 8, MAX_HEADER):
        raise CorruptFile(path, f"header length {length} in a file of {size} bytes", no_header=True)
    try:
        header = json.loads(_read_bytes(f, length, path))
    except ValueError as exc:  # bad JSON or bad UTF-8
        raise CorruptFile(path, f"header is not JSON: {first_line(exc)}") from None
    if not isinstance(header, dict):
        raise CorruptFile(path, "header is not a JSON object")
    start = 8 + length
    entries = [_entry(name, info, start, path) for name, info in header.items() if name != "__metadata__"]
    end = start  # the data are packed: each tensor starts where the one before it ends, the last ends the file
    for e in sorted(entries, key=lambda e: e.begin):
        if e.begin != end:
            raise CorruptFile(path, f"tensor {e.name} starts at byte {e.begin}, expected {end}")
        end = e.end
    if end != size:
        raise CorruptFile(path, f"the tensors end at byte {end} but the file has {size} bytes")
    return entries


def _entry(name: str, info: object, start: int, path: Path) -> Entry:
    try:
        dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]  # type: ignore[index]
        if not isinstance(dtype, str) or not all(isinstance(n, int) and n >= 0 for n in (*shape, begin, end)):
            raise ValueError
    except (TypeError, KeyError, ValueError):
        raise CorruptFile(path, f"bad header entry for tensor {name}") from None
    if dtype in DTYPE_BYTES and end - begin != math.prod(shape) * DTYPE_BYTES[dtype]:
        raise CorruptFile(path, f"tensor {name} of shape {shape} and dtype {dtype} has {end - begin} bytes")
    return Entry(name, dtype, tuple(shape), start + begin, start + end)


def fill(f: BinaryIO, view: memoryview, path: Path) -> None:
    """Read exactly len(view) bytes of `f` into `view`; a file that ends first is truncated."""
    done = 0
    while done < len(view):  # one read returns at most about 2 GB on Linux, less at the end of the file
        got = f.readinto(view[done:])
        if not got:
            raise CorruptFile(path, f"the file ends {len(view) - done} bytes early")
        done += got


def _read_bytes(f: BinaryIO, n: int, path: Path) -> bytearray:
    buf = bytearray(n)
    fill(f, memoryview(buf), path)
    return buf


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name if it has none), at most 200 characters."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
