"""The quantized layouts of a linear layer in numbers, without torch: the constants model/quant.py and
native/kernels.py store weights with, and the bytes a layer takes in each, which `mistral info` adds up.

A linear layer has N output rows and K input columns (its weight is (N, K)); activations have `dtype_size` bytes.
- none: the weight in the activation dtype.
- int8: a byte a weight and a scale per output row, in the activation dtype (torch's layout) or float32 (ours).
- int4: half a byte a weight and a scale and a zero (a low, in ours) per group of INT4_GROUP input columns; ours
  adds a float32 multiplier per row and superblock (`int4_superblock`), the scales being int16 subscales of it.
Scales and zeros are counted at the activation dtype's size, as the plain layouts keep them; on a CPU with fp32
activations torch's kernels and ours keep them in 16 bits, so the count is a little high there.
"""

from __future__ import annotations

INT4_GROUP = 64  # input columns per int4 scale and zero, in torch's layout and in ours
INT4_SUB_MAX = 16383  # the largest int16 subscale of our int4 layout (kernels.c: INT4_SUB_MAX)
FLOAT32_BYTES = 4  # our kernels' int8 scales and int4 multipliers


def layer_mode(name: str, mode: str) -> str:
    """The quantization of linear layer `name` (a module path such as 'layers.0.attention.wqkv') in `mode`: the
    output head stays int8 in int4 mode, since its error shows straight in the logits (under 2% of the 7B bytes)."""
    if mode not in ("none", "int8", "int4"):
        raise ValueError(f"unknown quantization {mode!r}: use one of none, int8, int4")
    return "int8" if mode == "int4" and name == "output" else mode


def int4_superblock(K: int) -> int:
    """Columns per superblock of our kernels' int4 layout for K input columns (a multiple of 64): 256 where they
    divide K, else 128 or 64. x is quantized in blocks of this size for the decode product."""
    return next((S for S in (256, 128) if K % S == 0), INT4_GROUP)


def linear_bytes(N: int, K: int, mode: str, dtype_size: int, ours: bool = False) -> int:
    """Bytes of an (N, K) linear layer quantized with `mode` ("none", "int8", "int4"), in our kernels' layout
    (`ours`) or torch's, beside activations of `dtype_size` bytes."""
    if mode == "none":
        return N * K * dtype_size
    if mode == "int8":
        return N * K + N * (FLOAT32_BYTES if ours else dtype_size)
    if mode == "int4":
        multipliers = N * K // int4_superblock(K) * FLOAT32_BYTES if ours else 0
        return N * K // 2 + N * K // INT4_GROUP * 2 * dtype_size + multipliers
    raise ValueError(f"unknown quantization {mode!r}: use none, int8 or int4")
