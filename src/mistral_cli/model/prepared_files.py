"""Where prepared weights live, what names each file and what it was made from, read without torch (for `mistral
info` and the quick path, engine/quick.py); engine/prepared.py writes and maps them."""

from __future__ import annotations

import ctypes
import hashlib
import json
import mmap
import os
import re
import sys
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from mistral_cli.model.config import ModelConfig
from mistral_cli.model.safetensors import Entry

SUFFIX = ".safetensors"
PREPARE_ENV = "MISTRAL_PREPARE"  # "off": never write or map prepared files
# Raise when what a prepared file holds changes meaning: older files are then never loaded. 2: the RoPE tables.
LAYOUT_VERSION = 2
ROPE = ("rope.cos", "rope.sin")  # the RoPE tables of every position, (max_context, 1, head_dim) in the model's dtype
_EDGE = 1 << 16  # bytes hashed at each end of a source file for its identity
POPULATE = 22  # madvise(2)'s MADV_POPULATE_READ (Linux 5.14): fault a range in, reading it as first use would
# The order in which a forward pass reads a block's tensors (by the name after "layers.N."), then the model's last
# ones; the embedding is read a row per token and the RoPE tables a row per position, so neither is read ahead.
_BLOCK_ORDER = ("attention_norm.", "attention.wqkv.", "attention.wo.", "ffn_norm.", "feed_forward.w13.",
                "feed_forward.w2.")  # fmt: skip
_LAST = ("norm.", "output.")
_CHUNK = 32 << 20  # bytes read ahead per call: the reading keeps the pass's order within a large tensor too


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
        if hasattr(os, "posix_fadvise"):  # the header alone: no read-ahead of the weights into memory
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_RANDOM)
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


def reading_order(entries: Iterable[Entry]) -> list[tuple[int, int]]:
    """A prepared file's byte ranges (begin, end) in the order a forward pass first reads them: block by block in
    the blocks' order (the file holds them in name order: 1, 10, 11, ..., 2, ...), each block's tensors as it uses
    them, then the final norm and the head."""

    def rank(e: Entry) -> tuple[int, int] | None:
        m = re.match(r"layers\.(\d+)\.(.*)", e.name)
        if m is not None:
            rest = m.group(2)
            at = next((i for i, p in enumerate(_BLOCK_ORDER) if rest.startswith(p)), len(_BLOCK_ORDER))
            return int(m.group(1)), at
        at = next((i for i, p in enumerate(_LAST) if e.name.startswith(p)), None)
        return None if at is None else (1 << 30, at)

    ranked = sorted((r, e.begin, e.end) for e in entries if (r := rank(e)) is not None and e.end > e.begin)
    return [(begin, end) for _, begin, end in ranked]


class ReadAhead:
    """A mapped prepared file being read into memory ahead of the forward pass (`read_ahead`): how far it has got."""

    def __init__(self, total: int) -> None:
        self.total = total  # bytes to read ahead
        self.done = 0  # bytes read so far
        self.finished = threading.Event()  # set when the thread is through (or gave up)


def read_ahead(advise: Callable[[int, int], object], spans: list[tuple[int, int]], size: int) -> ReadAhead | None:
    """Read a mapped prepared file into memory ahead of the forward pass, in a thread: `advise(offset, n)` faults n
    bytes from `offset` in (madvise with POPULATE on the mapping). A forward pass over a file not yet in memory
    otherwise waits for each block's weights in turn and reads nothing while it computes; read ahead, the disk keeps
    reading while the pass works on the blocks already there (BENCHMARKS.md, "Seventh run"). Where the file does not
    fit in the memory available, nothing is read ahead: pages read far ahead would push out the ones the pass is
    about to use. A file already in memory costs only the mapping of its pages. Returns the reading's progress, or
    None."""
    available = _available_memory()
    if not spans or available is None or size + (1 << 30) > available:
        return None
    reading = ReadAhead(sum(end - begin for begin, end in spans))

    def run() -> None:
        try:
            for begin, end in spans:
                at = begin // mmap.PAGESIZE * mmap.PAGESIZE  # madvise takes page-aligned addresses
                while at < end:
                    n = min(_CHUNK, end - at)
                    if advise(at, n) not in (None, 0):
                        return  # an older kernel (EINVAL): the pass reads as it goes
                    reading.done += min(at + n, end) - max(at, begin)
                    at += n
        except Exception:  # noqa: BLE001, S110  (a closed mapping: the pass reads as it goes)
            pass
        finally:
            reading.finished.set()

    threading.Thread(target=run, name="read-ahead", daemon=True).start()
    return reading


def _available_memory() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (the page cache the file may already fill counts as available), or
    None where it cannot be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


@cache
def libc() -> ctypes.CDLL:
    """The C library with mmap, munmap, madvise and mincore declared: a prepared file mapped through it has an address
    to hand to our kernels (Python's mmap gives one only for a writable mapping)."""
    lib = ctypes.CDLL(None, use_errno=True)
    lib.mmap.restype = ctypes.c_void_p
    lib.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    lib.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    lib.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    lib.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    return lib


def map_shared(fileno: int, size: int) -> int:
    """The address of a read-only shared mapping of an open file's first `size` bytes (the page cache's copy, which
    other processes share); OSError where the system refuses it."""
    base = libc().mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fileno, 0)
    if base is None or base == ctypes.c_void_p(-1).value:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))
    return int(base)


def resident_bytes(path: Path) -> int | None:
    """How many bytes of a file are in memory (the page cache), from mincore(2) over a mapping of it, which reads
    nothing; None where that cannot be told (not Linux, an unreadable file)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                return 0
            base = map_shared(f.fileno(), size)
    except OSError:
        return None
    try:
        pages = (ctypes.c_ubyte * -(-size // mmap.PAGESIZE))()
        if libc().mincore(base, size, pages) != 0:
            return None
        flags = bytes(pages)
        return min(size, (len(flags) - flags.count(0)) * mmap.PAGESIZE)
    finally:
        libc().munmap(base, size)
