"""Weight-only quantization of the linear layers: int8 per output channel, int4 in groups along the input.

Each quantized layer is a module swapped in for an `nn.Linear` (gpt-fast style), built from one float weight at
a time, so the loader never holds more than one float tensor beside the quantized model. Activations stay in the
model's dtype; only the weights are stored in fewer bits.

The layers here run on torch: `_weight_int8pack_mm` and `_weight_int4pack_mm_for_cpu` where torch has them (fast
with bf16 activations only, so activations are cast to bf16 around them), else a dequantize-and-matmul. A product
of many rows (a prefill) runs in float: the weight is dequantized a block of rows at a time into the compute dtype
and multiplied with the fast float GEMM, except with torch's int4 kernel, whose packed layout is private and which
therefore runs at every size. On a CUDA GPU with bf16 activations, int8 layers take torch's `_weight_int8pack_mm`
for up to KERNEL_MAX_ROWS rows, once a check at load (the layer's own weight, against its dequantized product)
says it computes the right product on that GPU; int4 there (and on mps) is the plain layout's dequantize-and-matmul,
which `torch.compile` fuses. (torch's CUDA int4 kernel, tinygemm, would need its private packing in place of the
plain one, and a prompt could then no longer be dequantized for a fast GEMM.) Our CPU kernels' layouts are
subclasses of these in native/quant.py.

One class per layout: int8 (`WeightOnlyInt8Linear`), int4 plain (`WeightOnlyInt4Linear`: two codes a byte),
int4 in torch's CPU packing (`TorchInt4Linear`). `quantized_linear` picks the layout for a layer.

What is quantized: every linear layer of the blocks. The output head is always int8, even in int4 mode: it
turns hidden states straight into logits, where int4's error would show most, and it is under 2% of the 7B
model's weights. The embedding table stays in the model dtype: a token reads one row of it, so it costs no
bandwidth per token.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mistral_cli.model.layout import INT4_GROUP, layer_mode
from mistral_cli.model.transformer import blocked_linear

MODES = ("int8", "int4")
KERNEL_MAX_ROWS = 16  # int8: above this many rows, dequantizing and one float GEMM is faster than the kernel
QUANT_BLOCK = 1 << 20  # weights quantized at a time: small float32 temporaries, reused with no page faults
_INT8_OP = "_weight_int8pack_mm"
_HAS_INT8_KERNEL = hasattr(torch.ops.aten, _INT8_OP)
_HAS_INT4_KERNEL = hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
    torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"
)


def has_kernel(op: str, device: torch.device) -> bool:
    """Whether torch has a kernel for aten `op` on this device type (CUDA builds, for instance)."""
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"aten::{op}", device.type.upper())
    except (AttributeError, RuntimeError):
        return False


def int8_weights(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float -> int8 (N, K) and float32 scales (N,), symmetric per output channel: w ~ q * scale."""
    w = w.float()
    scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def int4_weights(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float -> codes 0..15 as uint8 (N, K) and float32 scales_and_zeros (K/group, N, 2).

    Asymmetric per group (min/max): w ~ (q - 8) * scale + zero, the layout torch's int4 kernels read.
    """
    N, K = w.shape
    g = w.float().reshape(N, K // group, group)
    lo, hi = g.amin(dim=-1, keepdim=True), g.amax(dim=-1, keepdim=True)
    scales = ((hi - lo) / 15).clamp(min=1e-12)
    q = torch.round((g - lo) / scales).clamp(0, 15).to(torch.uint8).reshape(N, K)
    zeros = lo + 8 * scales
    return q, torch.cat([scales, zeros], dim=-1).transpose(0, 1).contiguous()


def row_blocks(N: int, K: int) -> list[slice]:
    """Slices of rows to quantize one at a time; starts at multiples of 64, which the CPU int4 kernel's packing
    (blocks of 32 or 64 rows, each stored contiguously) needs so that blocks packed apart equal one packing."""
    rows = max(64, QUANT_BLOCK // K // 64 * 64)
    return [slice(i, min(N, i + rows)) for i in range(0, N, rows)]


def stacked_blocks(parts: list[torch.Tensor]) -> Iterator[tuple[slice, torch.Tensor]]:
    """Blocks of rows of the weight that `parts` make stacked along rows: (rows in the whole, those rows), each
    block a view of one part, so the whole float weight is never built."""
    start = 0
    for part in parts:
        for rows in row_blocks(*part.shape):
            yield slice(start + rows.start, start + rows.stop), part[rows]
        start += part.shape[0]


def as_parts(weight: torch.Tensor | Sequence[torch.Tensor], align: int = 1) -> list[torch.Tensor]:
    """A weight, or the row-stacked parts of one, as a list of parts; joined into one where a part would start
    at a row that is not a multiple of `align`."""
    parts = [weight] if isinstance(weight, torch.Tensor) else list(weight)
    starts = itertools.accumulate((p.shape[0] for p in parts[:-1]), initial=0)
    if any(s % align for s in starts):
        return [torch.cat(parts)]
    return parts


def int4_group(K: int, group: int = INT4_GROUP) -> int:
    """The largest group of at most `group` that divides K (small test models have narrow layers)."""
    while K % group and group > 1:
        group //= 2
    return group


Weight = torch.Tensor | Sequence[torch.Tensor]  # a float weight, or its parts stacked along rows


class WeightOnlyInt8Linear(nn.Module):
    """y = x @ (q * scale).T with q int8 (N, K) and one scale per output channel, on torch's kernel where it has one
    (`kernel == "torch"`), else dequantized and multiplied (`kernel is None`)."""

    kernel: str | None = None

    def __init__(self, weight: Weight, *, upcast: bool = False) -> None:
        """`weight`: the float weight, or its parts stacked along rows (q/k/v as they come from a checkpoint)."""
        super().__init__()
        parts = as_parts(weight)
        ref = parts[0]
        self.out_features, self.in_features = sum(p.shape[0] for p in parts), ref.shape[1]
        self.upcast = upcast  # multi-row products in float32 (CPUs without fast bf16)
        q = torch.empty(self.out_features, self.in_features, dtype=torch.int8, device=ref.device)
        scales = torch.empty(self.out_features, device=ref.device)
        for rows, block in stacked_blocks(parts):
            q[rows], scales[rows] = int8_weights(block)
        self.register_buffer("weight", q)
        # torch's kernel: on the CPU; on a GPU with bf16 activations, where torch has one and it passes a check
        cpu = ref.device.type == "cpu"
        gpu_kernel = ref.device.type == "cuda" and ref.dtype == torch.bfloat16 and has_kernel(_INT8_OP, ref.device)
        self.kernel = self.layout_kernel(_HAS_INT8_KERNEL and (cpu or gpu_kernel))
        self.register_buffer("scales", scales.to(self.scales_dtype(ref.dtype)))
        if gpu_kernel and self.kernel == "torch" and not self.kernel_agrees():
            self.kernel = None  # the dequantize-and-matmul path, with the same bf16 scales

    def layout_kernel(self, torch_has_one: bool) -> str | None:
        return "torch" if torch_has_one else None

    def scales_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """torch's kernel takes the scales in the activation dtype it runs in: bf16."""
        return torch.bfloat16 if self.kernel == "torch" else dtype

    def kernel_agrees(self, tolerance: float = 0.02) -> bool:
        """Whether torch's kernel computes x @ (q * scale).T for this layer on its device: one random bf16 row
        against the dequantized product (a block of rows at a time), within bf16 rounding; a kernel that raises
        does not agree. For a kernel nothing else has shown right where it runs (a GPU's), at load."""
        N, K = self.out_features, self.in_features
        device = self.weight.device
        x = torch.randn(1, K, generator=torch.Generator(device).manual_seed(0), device=device).to(torch.bfloat16)
        try:
            got = torch.ops.aten._weight_int8pack_mm(x, self.weight, self.scales.to(torch.bfloat16)).float()
        except RuntimeError:
            return False
        deq = [self.weight[rows].float() * self.scales[rows].float()[:, None] for rows in row_blocks(N, K)]
        expected = torch.cat([x.float() @ w.T for w in deq], dim=-1)
        if got.shape != expected.shape or not torch.isfinite(got).all():
            return False
        return float((got - expected).norm() / expected.norm().clamp(min=1e-30)) < tolerance

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if self.kernel == "torch" and rows <= KERNEL_MAX_ROWS:
            y = torch.ops.aten._weight_int8pack_mm(x.reshape(rows, -1).to(torch.bfloat16), self.weight, self.scales)
            return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        dtype = torch.float32 if self.upcast else x.dtype
        if x.device.type == "cpu":  # dequantized a block at a time: no page faults for a full-size float copy
            y = blocked_linear(x, self.weight, dtype)
        else:  # one expression that torch.compile fuses into the matmul
            y = F.linear(x.to(dtype), self.weight.to(dtype))
        return (y * self.scales.to(dtype)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel={self.kernel}"


class WeightOnlyInt4Linear(nn.Module):
    """y = x @ w.T with w = (q - 8) * scale + zero per group of `group` input columns, q in 0..15.

    The plain layout: two codes a byte (even column in the low nibble) and (K/group, N, 2) scales_and_zeros in the
    model's dtype, dequantized and multiplied. Subclasses store the same codes and scales in a kernel's layout
    (`pack`, `store_scales`) and multiply with it.
    """

    kernel: str | None = None

    def __init__(self, weight: Weight, *, group: int = INT4_GROUP, upcast: bool = False) -> None:
        """`weight`: the float weight, or its parts stacked along rows (q/k/v as they come from a checkpoint)."""
        super().__init__()
        parts = as_parts(weight, align=64)  # torch's kernel packs blocks of rows that start at multiples of 64
        ref = parts[0]
        self.out_features, self.in_features = N, K = sum(p.shape[0] for p in parts), ref.shape[1]
        self.group = int4_group(K, group)
        self.upcast = upcast
        packed = torch.empty(N, K // 2, dtype=torch.uint8, device=ref.device)
        scales_and_zeros = torch.empty(K // self.group, N, 2, device=ref.device)
        for rows, block in stacked_blocks(parts):
            q, scales_and_zeros[:, rows] = int4_weights(block, self.group)
            packed[rows] = self.pack(q)
        self.register_buffer("weight", packed)
        self.store_scales(scales_and_zeros, ref.dtype)

    def pack(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes 0..15 (rows, K) as uint8 -> this layout's (rows, K/2) bytes."""
        return codes[:, 0::2] | (codes[:, 1::2] << 4)  # two codes per byte: even column low, odd high

    def store_scales(self, scales_and_zeros: torch.Tensor, dtype: torch.dtype) -> None:
        """Keep the (K/group, N, 2) scales and zeros as this layout reads them (activations of `dtype`)."""
        self.register_buffer("scales_and_zeros", scales_and_zeros.to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.float32 if self.upcast else x.dtype
        return F.linear(x.to(dtype), self.dequantize(dtype)).to(x.dtype)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """The float weight (N, K) this layer stands for."""
        N, K = self.out_features, self.in_features
        q = torch.stack([self.weight & 15, self.weight >> 4], dim=-1).reshape(N, K // self.group, self.group)
        scales, zeros = self.scales_and_zeros.to(dtype).transpose(0, 1).unbind(-1)  # (N, K/group) each
        return ((q.to(dtype) - 8) * scales[..., None] + zeros[..., None]).reshape(N, K)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, group={self.group}, "
            f"kernel={self.kernel}"
        )


class TorchInt4Linear(WeightOnlyInt4Linear):
    """int4 on torch's CPU kernel, in its private packing (so it runs at every size: it cannot be dequantized)."""

    kernel = "torch"

    @staticmethod
    def fits(N: int, group: int, device: torch.device) -> bool:
        """torch's CPU kernel: groups of 32..256, N a multiple of 16 (its packing works on blocks of rows)."""
        return _HAS_INT4_KERNEL and device.type == "cpu" and group in (32, 64, 128, 256) and N % 16 == 0

    def pack(self, codes: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)

    def store_scales(self, scales_and_zeros: torch.Tensor, dtype: torch.dtype) -> None:
        super().store_scales(scales_and_zeros, torch.bfloat16)  # the kernel reads them in its activation dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.reshape(rows, -1).to(torch.bfloat16), self.weight, self.group, self.scales_and_zeros
        )
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        raise RuntimeError("the CPU kernel's packed layout cannot be dequantized")


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown quantization {mode!r}: use one of {', '.join(MODES)}")


def quantized_linear(name: str, weight: Weight, mode: str, *, upcast: bool = False) -> nn.Module:
    """The quantized layer replacing linear layer `name` (a module path such as 'layers.0.attention.wqkv'), from
    its float weight or the parts of it stacked along rows, in the best layout torch runs here."""
    if int4_layer(name, mode):
        parts = as_parts(weight)
        N, K = sum(p.shape[0] for p in parts), parts[0].shape[1]
        torch_kernel = TorchInt4Linear.fits(N, int4_group(K), parts[0].device)
        return (TorchInt4Linear if torch_kernel else WeightOnlyInt4Linear)(weight, upcast=upcast)
    return WeightOnlyInt8Linear(weight, upcast=upcast)


def int4_layer(name: str, mode: str) -> bool:
    """Whether layer `name` is int4 in quantization `mode` (layout.layer_mode: the output head stays int8)."""
    check_mode(mode)
    return layer_mode(name, mode) == "int4"


def is_quantized_layer(name: str) -> bool:
    """Whether the parameter `name` (e.g. 'layers.0.feed_forward.w2.weight') is a weight that gets quantized."""
    return name.endswith(".weight") and (name == "output.weight" or ".attention.w" in name or ".feed_forward.w" in name)


def quantize_model(model: nn.Module, mode: str) -> nn.Module:
    """Swap every linear layer of an already loaded model for its quantized version, in place."""
    check_mode(mode)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and is_quantized_layer(f"{name}.weight"):
            upcast = bool(getattr(module, "upcast", False))
            layer = quantized_linear(name, module.weight.detach(), mode, upcast=upcast)
            replace_module(model, name, layer)
    return model


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)
