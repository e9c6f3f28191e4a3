"""What the machine offers, read without torch so `mistral info` can answer instantly: CPU bf16, free memory,
and the dtype that `auto` resolves to."""

from __future__ import annotations

import os
import platform
from functools import cache


@cache
def cpu_has_fast_bf16() -> bool:
    """bf16 matmuls are fast on a CPU only with AVX512-BF16 or AMX (TECH.md section 7); elsewhere they are slow."""
    if platform.system() == "Linux":
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                for line in f:
                    if line.startswith("flags"):
                        flags = set(line.split(":", 1)[1].split())
                        return bool(flags & {"avx512_bf16", "amx_bf16"})
        except OSError:
            return False
    # Apple M2 and later have BF16 instructions; on M1 torch still runs bf16 correctly
    return platform.system() == "Darwin" and platform.machine() == "arm64"


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
    """The dtype name `auto` means: bf16 on cuda (fp16 on old GPUs), fp16 on mps, bf16 or fp32 on a CPU."""
    if device_type == "cuda":
        return "bf16" if cuda_bf16 else "fp16"
    if device_type == "mps":
        return "fp16"
    if cpu_has_fast_bf16():
        return "bf16"
    # fp32 is the fast path on such CPUs, but it doubles the weights: take bf16 when fp32 would not fit in memory.
    free = available_memory()
    return "bf16" if free is not None and n_params * 4 > 0.85 * free else "fp32"
