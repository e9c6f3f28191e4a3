"""What the machine offers, read without torch so `mistral info` can answer instantly: CPU flags, free memory,
and the dtype that `auto` resolves to."""

from __future__ import annotations

import os
import platform
import shlex
import shutil
from functools import cache

KERNELS_ENV = "MISTRAL_KERNELS"  # "off": torch's CPU kernels instead of ours; "avx2": ours without AVX-512
GRAPHS_ENV = "MISTRAL_CUDA_GRAPHS"  # "off": no CUDA graphs for decode steps


SWITCH_VALUES = ("", "0", "1", "on", "off", "yes", "no", "true", "false")


def bad_switch() -> str | None:
    """A sentence for a switch variable set to something that is not on or off, which would be ignored silently."""
    for env in (KERNELS_ENV, GRAPHS_ENV):
        raw = os.environ.get(env)
        allowed = (*SWITCH_VALUES, "avx2") if env == KERNELS_ENV else SWITCH_VALUES
        if raw is not None and raw.strip().lower() not in allowed:
            more = ", or avx2 for the AVX2 kernels on a CPU with AVX-512" if env == KERNELS_ENV else ""
            return f"{env} must be on or off (or 1, 0){more}, not {raw!r}."
    return None


def switched_off(env: str) -> bool:
    """Whether the variable `env` switches a feature off: 0, off, no or false."""
    return os.environ.get(env, "").strip().lower() in ("0", "off", "no", "false")


@cache
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags from /proc/cpuinfo (empty where there is none: macOS, Windows)."""
    if platform.system() == "Linux":
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                for line in f:
                    if line.startswith(("flags", "Features")):  # x86 and arm64 spellings
                        return frozenset(line.split(":", 1)[1].split())
        except OSError:
            pass
    return frozenset()


def _arm64() -> bool:
    return platform.machine().lower() in ("arm64", "aarch64")


@cache
def cpu_has_fast_bf16() -> bool:
    """bf16 matrix *products* are fast on a CPU only with AVX512-BF16 or AMX (docs/FORMAT.md section 7), or on Apple
    silicon; elsewhere torch runs a bf16 GEMM several times slower than a float32 one."""
    if cpu_flags() & {"avx512_bf16", "amx_bf16"}:
        return True
    return platform.system() == "Darwin" and _arm64()


@cache
def cpu_bf16_decode_ok() -> bool:
    """Whether bf16 weights decode at least as fast as float32 ones: true wherever torch converts bf16 with SIMD
    (AVX2 or AVX-512 on x86, NEON on arm64). A decode step is a matrix-vector product bound by memory bandwidth,
    and bf16 weights are half the bytes: on a 2-core AVX2 machine a bf16 decode step is about 2x faster than a
    float32 one even though a bf16 GEMM is slower (BENCHMARKS.md). Prompts still run in float32 blocks there (model/transformer.py)."""
    if cpu_has_fast_bf16() or _arm64():
        return True
    return bool(cpu_flags() & {"avx2", "avx512f"})


def available_memory() -> int | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def auto_dtype(device_type: str, n_params: int, cuda_bf16: bool = True) -> str:
    """The dtype name `auto` means: bf16 on cuda (fp16 on old GPUs), fp16 on mps; on a CPU bf16 wherever it
    decodes fast (AVX2/AVX-512/NEON: nearly every CPU of the last ten years), else fp32 if it fits in memory."""
    if device_type == "cuda":
        return "bf16" if cuda_bf16 else "fp16"
    if device_type == "mps":
        return "fp16"
    if cpu_bf16_decode_ok():
        return "bf16"
    # an old CPU with no SIMD bf16 conversion: fp32 is faster, unless the doubled weights would not fit
    free = available_memory()
    return "bf16" if free is not None and n_params * 4 > 0.85 * free else "fp32"


def dtype_name(requested: str, device_type: str, n_params: int, cuda_bf16: bool = True) -> str:
    """The compute dtype's name for --dtype `requested` ("auto", "bf16", "fp16", "fp32") on a device type: the one
    decision that `mistral info` reports and the loader maps to a torch dtype (model/placement.py)."""
    return requested if requested != "auto" else auto_dtype(device_type, n_params, cuda_bf16)


def c_compiler() -> list[str] | None:
    """The C compiler command that builds our kernels: $CC (which may carry options), else the first of cc, gcc
    and clang on the PATH; None when there is none."""
    if os.environ.get("CC", "").strip():
        cmd = shlex.split(os.environ["CC"])
        return cmd if shutil.which(cmd[0]) else None
    return next(([c] for c in ("cc", "gcc", "clang") if shutil.which(c)), None)


def kernels_not_wanted() -> str | None:
    """Why our CPU kernels (kernels.c) are not for this run whatever the user installs: switched off, or a CPU they
    do not run on. None when they are."""
    if switched_off(KERNELS_ENV):
        return f"switched off with ${KERNELS_ENV}"
    if platform.machine().lower() not in ("x86_64", "amd64") or not {"avx2", "fma"} <= cpu_flags():
        return "they need an x86-64 CPU with AVX2 and FMA"
    return None


def kernels_blocker() -> str | None:
    """Why our CPU kernels cannot be used here, or None when they can once the compiler builds them."""
    if reason := kernels_not_wanted():
        return reason
    if c_compiler() is None:
        return "no C compiler to build them ($CC, cc, gcc or clang)"
    return None
