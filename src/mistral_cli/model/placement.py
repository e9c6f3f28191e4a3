"""Device and dtype, chosen once at load: auto = cuda bf16 > mps fp16 > cpu bf16 (fp32 on CPUs with no SIMD bf16)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mistral_cli.errors import MistralError
from mistral_cli.hardware import cpu_has_fast_bf16, dtype_name

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


def slow_half_matmul(placement: Placement) -> bool:
    """Whether bf16/fp16 matrix products here are much slower than float32 ones (a CPU without AVX512-BF16/AMX)."""
    return (
        placement.device.type == "cpu"
        and placement.dtype in (torch.bfloat16, torch.float16)
        and not cpu_has_fast_bf16()
    )


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


def torch_dtype(name: str, device: torch.device, n_params: int = 0) -> torch.dtype:
    """The torch dtype of --dtype `name` on `device`: hardware.dtype_name decides, asking torch only whether a GPU
    has bf16."""
    if name != "auto" and name not in DTYPES:
        raise MistralError(f"Unknown dtype {name!r}: use auto, bf16, fp16 or fp32.")
    cuda_bf16 = name == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()
    return DTYPES[dtype_name(name, device.type, n_params, cuda_bf16)]


def pick(device: str = "auto", dtype: str = "auto", n_params: int = 0) -> Placement:
    dev = pick_device(device)
    return Placement(dev, torch_dtype(dtype, dev, n_params))
