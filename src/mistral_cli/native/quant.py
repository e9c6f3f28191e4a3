"""Quantized layers in our kernels' layouts (kernels.py), for CPU decode steps.

int8 keeps model/quant.py's codes with float32 scales; int4 keeps the same codes and scales as the plain layout,
packed by `pack_int4` (four rows in one stream) with `pack_int4_scales` records of integer subscales per superblock.
A single row (a decode step) runs on our kernels; so does a prompt with int4, or a short one with int8, where the
CPU has AVX512-VNNI (each row bit for bit what a decode step gives); otherwise a prompt dequantizes a block of rows
at a time into a float GEMM.
"""

from __future__ import annotations

import torch
from torch import nn

from mistral_cli.model import quant
from mistral_cli.model.layout import INT4_GROUP
from mistral_cli.model.quant import Weight, WeightOnlyInt4Linear, WeightOnlyInt8Linear, as_parts, int4_group
from mistral_cli.model.transformer import blocked_linear
from mistral_cli.native.kernels import Kernels, Operands, int4_superblock, pack_int4, pack_int4_scales, supports

# The most rows an int8 product multiplies as integers (AVX512-VNNI); above, torch's bf16 GEMM on weights dequantized
# a block at a time is faster (BENCHMARKS.md, "int8 prompts": even at 64 rows per 7B layer, 1.2x ahead at 128).
INT8_ROWS = 48


class NativeInt8Linear(WeightOnlyInt8Linear):
    """int8 whose single-row products run on our kernels."""

    def __init__(self, weight: Weight, kernels: Kernels, *, upcast: bool = False) -> None:
        super().__init__(weight, upcast=upcast)
        self.kernels = kernels

    def layout_kernel(self, torch_has_one: bool) -> str | None:
        return "ours"

    def scales_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return torch.float32  # what our kernels read

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == self.in_features:
            return self.kernels.linear_int8(x, self.weight, self.scales).to(x.dtype)
        if self.kernels.int8_rows and x.numel() <= INT8_ROWS * self.in_features:
            # a short prompt as integers, each row what a decode step computes
            return self.kernels.linear_int8_rows(x, self.weight, self.scales).to(x.dtype)
        return super().forward(x)

    def operands(self) -> Operands:
        """This layer for the whole-step call (kernels.DecodeStep)."""
        return Operands("int8", self.weight, self.scales)


class NativeInt4Linear(WeightOnlyInt4Linear):
    """int4 in our kernels' layout: pack_int4's codes and pack_int4_scales' records of the scales and lows
    (low = zero - 8 * scale)."""

    kernel = "ours"

    def __init__(self, weight: Weight, kernels: Kernels, *, upcast: bool = False) -> None:
        super().__init__(weight, group=INT4_GROUP, upcast=upcast)
        self.kernels = kernels

    def pack(self, codes: torch.Tensor) -> torch.Tensor:
        return pack_int4(codes)

    def store_scales(self, scales_and_zeros: torch.Tensor, dtype: torch.dtype) -> None:
        scales, zeros = scales_and_zeros.unbind(-1)  # (K/group, N) each
        self.register_buffer("scales_and_lows", pack_int4_scales(scales.T, (zeros - 8 * scales).T))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == self.in_features:
            return self.kernels.linear_int4(x, self.weight, self.scales_and_lows).to(x.dtype)
        if self.kernels.int4_rows:  # many rows as integers, each row what a decode step computes
            return self.kernels.linear_int4_rows(x, self.weight, self.scales_and_lows).to(x.dtype)
        dtype = torch.float32 if self.upcast else x.dtype
        into = dtype if dtype == torch.bfloat16 else torch.float32  # bf16 straight from the codes: one pass, not two
        return blocked_linear(x, self.weight, dtype, lambda rows, block: self.dequantize_rows(rows, into, block)).to(
            x.dtype
        )

    def dequantize_rows(
        self, rows: slice, dtype: torch.dtype = torch.float32, scratch: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Rows `rows` of the float weight, in float32 or bf16 (in `scratch` when given)."""
        return self.kernels.dequantize_int4(self.weight, self.scales_and_lows, rows, dtype, scratch)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        into = dtype if dtype == torch.bfloat16 else torch.float32
        return self.dequantize_rows(slice(0, self.out_features), into).to(dtype)

    def operands(self) -> Operands:
        """This layer for the whole-step call (kernels.DecodeStep)."""
        return Operands("int4", self.weight, self.scales_and_lows, int4_superblock(self.in_features))


def quantized_linear(name: str, weight: Weight, mode: str, *, upcast: bool = False, kernels: Kernels) -> nn.Module:
    """model/quant.py's `quantized_linear`, in our kernels' layouts where they take the layer (on the CPU)."""
    parts = as_parts(weight)
    N, K = sum(p.shape[0] for p in parts), parts[0].shape[1]
    if parts[0].device.type == "cpu":
        if quant.int4_layer(name, mode):
            if supports(K, int4_group(K), N):
                return NativeInt4Linear(weight, kernels, upcast=upcast)
        elif supports(K):
            return NativeInt8Linear(weight, kernels, upcast=upcast)
    return quant.quantized_linear(name, weight, mode, upcast=upcast)
