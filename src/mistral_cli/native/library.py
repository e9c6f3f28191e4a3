"""Our C kernels (kernels.c) as a library, built on first use and loaded with ctypes, without torch: the quick path
of `mistral complete` (engine/quick.py) runs a whole decode step and the sampler through it before torch is imported,
and kernels.py wraps the same library for torch tensors.

The C file is compiled once per machine with the system's C compiler (`$CC`, else cc/gcc/clang) and `-march=native`
into the user cache folder, keyed by the source, the compiler and the CPU. Where that cannot happen (no compiler,
not x86-64 with AVX2 and FMA, `MISTRAL_KERNELS=off`), `library()` returns None and `status()` says why.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import tempfile
from collections.abc import Sequence
from functools import cache
from pathlib import Path

from mistral_cli.hardware import KERNELS_ENV, c_compiler, cpu_flags, kernels_blocker, kernels_not_wanted

SOURCE = Path(__file__).with_name("kernels.c")
P, I64, INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
KINDS = {"bf16": 0, "int8": 1, "int4": 2}  # mc_linear's kind


class Linear(ctypes.Structure):
    """kernels.c's mc_linear: a linear layer's kind, shape (N rows of K), int4 superblock S, weight and scales."""

    _fields_ = [("kind", I64), ("N", I64), ("K", I64), ("S", I64), ("w", P), ("s", P)]


class Layer(ctypes.Structure):
    """kernels.c's mc_layer: one block's two norm weights and four linear layers."""

    _fields_ = [("attention_norm", P), ("ffn_norm", P)] + [(n, Linear) for n in ("wqkv", "wo", "w13", "w2")]


class Model(ctypes.Structure):
    """kernels.c's mc_model: what mc_decode_token reads of a model."""

    _fields_ = [
        ("embedding", P), ("layers", ctypes.POINTER(Layer)), ("n_layers", I64), ("dim", I64),
        ("H", I64), ("KV", I64), ("D", I64), ("hidden", I64), ("eps", ctypes.c_float), ("scale", ctypes.c_float),
        ("norm", P), ("head", Linear),
    ]  # fmt: skip


def attention_heads_fit(H: int, KV: int, D: int) -> bool:
    """Whether mc_attention_bf16 takes H query heads over KV key/value heads of D: it keeps up to 8 query heads per
    key/value head in registers and reads 16 columns at a time."""
    return D % 16 == 0 and H % KV == 0 and H // KV <= 8


def step_fits(dim: int, hidden: int, H: int, KV: int, D: int, shapes: Sequence[dict[str, tuple[int, int]]]) -> bool:
    """Whether mc_decode_token takes a model of these sizes whose blocks' linear layers have `shapes` (per block,
    (N, K) of wqkv, wo, w13 and w2)."""
    expected = {"wqkv": ((H + 2 * KV) * D, dim), "wo": (dim, H * D), "w13": (2 * hidden, dim), "w2": (dim, hidden)}
    return (
        dim % 16 == 0
        and hidden % 16 == 0
        and attention_heads_fit(H, KV, D)
        and bool(shapes)
        and all(dict(block) == expected for block in shapes)
    )


def bind(lib: ctypes.CDLL) -> None:
    """Declare the argument and result types of the library's functions."""
    signatures = {
        "mc_gemv_bf16": [P, P, INT, P, INT, I64, I64, INT],
        "mc_gemv_int8": [P, P, P, INT, P, INT, I64, I64, INT],
        "mc_gemv_int4": [P, P, P, INT, P, INT, I64, I64, I64, INT],
        "mc_gemm_int4": [P, P, P, INT, P, INT, I64, I64, I64, I64, INT],
        "mc_gemm_bf16": [P, P, P, I64, I64, I64, INT],
        "mc_gemm_int8": [P, P, P, INT, P, INT, I64, I64, I64, INT],
        "mc_dequant_int4": [P, P, P, INT, I64, I64, I64, I64, INT],
        "mc_attention_bf16": [P, P, P, I64, I64, I64, I64, I64, I64, ctypes.c_float, P, INT],
        "mc_decode_token": [ctypes.POINTER(Model), I64, P, P, I64, P, P, I64, I64, INT, P, INT],
        "mc_decode_tokens": [ctypes.POINTER(Model), P, I64, P, P, I64, P, P, I64, I64, INT, P, INT],
    }
    for name, args in signatures.items():
        f = getattr(lib, name)
        f.argtypes, f.restype = args, INT
    lib.mc_sample.argtypes = [
        P, I64, P, I64, ctypes.c_double, ctypes.c_double, I64, ctypes.c_double, ctypes.c_double, ctypes.c_double, INT
    ]  # fmt: skip
    lib.mc_sample.restype = I64


def check(rc: int) -> None:
    """Raise for a kernel's error code."""
    if rc == -1:
        raise MemoryError("out of memory in a decode kernel")
    if rc != 0:
        raise RuntimeError(f"a decode kernel failed with code {rc}")


def label(features: int | None) -> str:
    """What the decode steps run on (mc_features' bits), for --verbose, the chat banner and `mistral info`."""
    names = [name for bit, name in ((1, "AVX512-BF16"), (2, "AVX512-VNNI")) if (features or 0) & bit]
    return f"AVX2 + {' + '.join(names)} kernels" if names else "AVX2 kernels"


def _cache_folders() -> list[Path]:
    """Where the built library may go: the user cache folder, else (read-only home) a per-user temporary one."""
    from platformdirs import user_cache_path

    uid = os.getuid() if hasattr(os, "getuid") else 0
    return [user_cache_path("mistral-cli") / "kernels", Path(tempfile.gettempdir()) / f"mistral-cli-kernels-{uid}"]


def _ours(folder: Path) -> bool:
    """Whether only this user can write in `folder`: a library is loaded from there, so nobody else may put one."""
    st = folder.stat()
    return not hasattr(os, "getuid") or (st.st_uid == os.getuid() and not st.st_mode & 0o022)


def _build(cc: list[str]) -> Path:
    """Compile kernels.c for this CPU (once: the result is cached under a key of everything that shapes it)."""
    source = SOURCE.read_bytes()
    try:
        version = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise OSError(f"cannot run the C compiler {' '.join(cc)}: {e}") from e
    flags = _variant_flags()
    key = hashlib.sha256(
        b"\0".join(
            [
                source,
                " ".join(cc).encode(),  # $CC may carry options
                version.encode(),
                " ".join(sorted(cpu_flags())).encode(),
                platform.machine().encode(),
                " ".join(flags).encode(),
            ]
        )  # fmt: skip
    ).hexdigest()[:16]
    folders = _cache_folders()
    for folder in folders:
        if (folder / f"kernels-{key}.so").exists() and _ours(folder):
            return folder / f"kernels-{key}.so"
    for folder in folders:
        try:
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            if os.access(folder, os.W_OK) and _ours(folder):
                break
        except OSError:
            pass
    else:
        raise OSError(f"no writable folder for the built kernels (tried {', '.join(map(str, folders))})")
    path = folder / f"kernels-{key}.so"
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        out = Path(tmp) / path.name
        cmd = [*cc, "-O3", "-march=native", *flags, "-fopenmp", "-shared", "-fPIC", "-o", str(out), str(SOURCE)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.SubprocessError) as e:
            raise OSError(f"cannot run the C compiler {' '.join(cc)}: {e}") from e
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
            raise OSError(f"{' '.join(cc)} could not build the kernels: {last[:200]}")
        os.replace(out, path)  # atomic: another process building at the same time finds a whole file
    for old in folder.glob("kernels-*.so"):  # builds of other versions (a running process keeps its mapping)
        if old != path and old.name != _kept.get(bool(flags)):
            old.unlink(missing_ok=True)
    _kept[bool(flags)] = path.name
    return path


_kept: dict[bool, str] = {}  # the other variant's build, when this process built both (the tests do)


def _variant_flags() -> list[str]:
    """The compiler flags of the build asked for: MISTRAL_KERNELS=avx2 builds without AVX-512, so the AVX2 paths can
    be compared with the newer ones on the same CPU."""
    if os.environ.get(KERNELS_ENV, "").strip().lower() == "avx2":
        return ["-mno-avx512f"]
    return []


_status = "not loaded yet"


@cache
def library() -> tuple[ctypes.CDLL, Path] | None:
    """The library for this machine and its path, built on first use, or None where it cannot be used (see
    `status()`)."""
    global _status
    blocker = kernels_blocker()
    if blocker is not None:
        _status = blocker if blocker.startswith("switched off") else f"unavailable: {blocker}"
        return None
    cc = c_compiler()
    assert cc is not None
    try:
        path = _build(cc)
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        _status = f"unavailable: {e}"
        return None
    if lib.mc_version() != 1:
        _status = "unavailable: the compiler did not target AVX2 and FMA"
        return None
    bind(lib)
    _status = "on"
    return lib, path


def status() -> str:
    """'on', or why the kernels are not used."""
    return _status


def problem() -> str | None:
    """Why the kernels are not used on a CPU that could run them (no compiler, a failed build), for the user to
    fix; None when they are used, switched off, or the CPU cannot run them."""
    if library() is not None or kernels_not_wanted() is not None:
        return None
    return _status.removeprefix("unavailable: ")
