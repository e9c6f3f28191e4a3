"""Device and dtype, chosen once at load: auto = cuda bf16 > mps fp16 > cpu bf16 where the CPU has it, else fp32."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from functools import cache

import torch

from mistral_cli.errors import MistralError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class Placement:
    device: torch.device
    dtype: torch.dtype

    @property
    def dtype_name(self) -> str:
        return DTYPE_NAMES[self.dtype]

    def __str__(self) -> str:
        return f"{self.device.type} {self.dtype_name}"


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


def slow_half_matmul(placement: Placement) -> bool:
    """Whether bf16/fp16 matrix products here are much slower than float32 ones (a CPU without AVX512-BF16/AMX)."""
    return (
        placement.device.type == "cpu"
        and placement.dtype in (torch.bfloat16, torch.float16)
        and not cpu_has_fast_bf16()
    )


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


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise MistralError(
            "--device cuda was asked for, but PyTorch sees no CUDA GPU (is the CUDA build of torch installed?)."
        )
    if name == "mps" and not torch.backends.mps.is_available():
        raise MistralError("--device mps was asked for, but this machine has no Apple Metal GPU available.")
    if name not in ("cpu", "cuda", "mps"):
        raise MistralError(f"Unknown device {name!r}: use auto, cpu, cuda or mps.")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device, n_params: int = 0) -> torch.dtype:
    if name != "auto":
        if name not in DTYPES:
            raise MistralError(f"Unknown dtype {name!r}: use auto, bf16, fp16 or fp32.")
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    if cpu_has_fast_bf16():
        return torch.bfloat16
    # fp32 is the fast path on such CPUs, but it doubles the weights: take bf16 when fp32 would not fit in memory.
    free = available_memory()
    if free is not None and n_params * 4 > 0.85 * free:
        return torch.bfloat16
    return torch.float32


def pick(device: str = "auto", dtype: str = "auto", n_params: int = 0) -> Placement:
    dev = pick_device(device)
    return Placement(dev, pick_dtype(dtype, dev, n_params))
