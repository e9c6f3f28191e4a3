"""Our own CPU kernels (kernels.c, built and loaded by library.py) for torch tensors: the decode step's matrix-vector
products, a prompt's rows, the attention and the whole-step call.

Where the library cannot be built or loaded (no compiler, not x86-64 with AVX2 and FMA, `MISTRAL_KERNELS=off`),
`native()` returns None and the model keeps torch's kernels: the same results up to float rounding, only slower.

The wrappers take one activation row and return it multiplied by the weight, in the activation's dtype.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from mistral_cli.hardware import c_compiler  # noqa: F401  (the tests and benchmarks build through this module)
from mistral_cli.model.layout import INT4_GROUP, INT4_SUB_MAX, int4_superblock
from mistral_cli.native import library
from mistral_cli.native.library import (  # noqa: F401  (_build: the tests and benchmarks build both variants)
    KINDS,
    Layer,
    Linear,
    Model,
    _build,
    attention_heads_fit,
    check,
    problem,
    status,
    step_fits,
)

_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}


def supports(K: int, group: int | None = None, N: int = 4) -> bool:
    """Whether a layer of N output rows and K input columns (int4: in groups of `group`) can use these kernels: they
    work on blocks of 32 columns, and int4 on groups of 64 columns in blocks of four rows."""
    if group is not None:
        return K % INT4_GROUP == 0 and group == INT4_GROUP and N % 4 == 0
    return K % 32 == 0


def _prompt_rows(x: torch.Tensor, N: int, K: int) -> tuple[torch.Tensor, int, torch.Tensor]:
    """x's rows of K as the C code reads them (contiguous float32 or bf16), that dtype's code, and the (rows, N)
    output in the same dtype."""
    rows = x.reshape(-1, K)
    rows = (rows if rows.dtype in _DTYPE_CODES else rows.float()).contiguous()
    return rows, _DTYPE_CODES[rows.dtype], torch.empty(rows.shape[0], N, dtype=rows.dtype)


@dataclass(frozen=True)
class Operands:
    """A linear layer as the C code reads it: kind 'bf16' (weight), 'int8' (weight, float32 scales) or 'int4'
    (pack_int4's codes, and pack_int4_scales' records over superblocks of `superblock` columns)."""

    kind: str
    weight: torch.Tensor
    scales: torch.Tensor | None = None
    superblock: int = 0

    @property
    def shape(self) -> tuple[int, int]:
        """(N, K) of the product: output and input features."""
        N, columns = self.weight.shape
        return N, columns * (2 if self.kind == "int4" else 1)


@dataclass(frozen=True)
class LayerOperands:
    """One transformer block for `Kernels.decode_token`: its two norm weights and four linear layers."""

    attention_norm: torch.Tensor
    ffn_norm: torch.Tensor
    wqkv: Operands
    wo: Operands
    w13: Operands
    w2: Operands


def _linear(op: Operands) -> Linear:
    scales = None if op.scales is None else op.scales.data_ptr()
    return Linear(KINDS[op.kind], *op.shape, op.superblock, op.weight.data_ptr(), scales)


class DecodeStep:
    """A model laid out once for kernels.c's `mc_decode_token`, which runs a whole decode step (embedding, every
    block, the final norm and the output head) in one call; it keeps the tensors it points to alive. Build it with
    `DecodeStep.of`."""

    def __init__(
        self,
        layers: list[LayerOperands],
        H: int,
        KV: int,
        D: int,
        eps: float,
        embedding: torch.Tensor,
        norm: torch.Tensor,
        head: Operands,
    ) -> None:
        # the tensors the C code points to, kept alive; KV, D and vocab for the checks of each call
        self.layers, self.embedding, self.norm, self.head = layers, embedding, norm, head
        self.KV, self.D, (self.vocab, dim) = KV, D, embedding.shape
        self.table = (Layer * len(layers))()
        for row, layer in zip(self.table, layers, strict=True):
            row.attention_norm, row.ffn_norm = layer.attention_norm.data_ptr(), layer.ffn_norm.data_ptr()
            for name in ("wqkv", "wo", "w13", "w2"):
                setattr(row, name, _linear(getattr(layer, name)))
        hidden = layers[0].w2.shape[1]
        self.model = Model(
            embedding.data_ptr(), self.table, len(layers), dim, H, KV, D, hidden, eps, D**-0.5, norm.data_ptr(),
            _linear(head),
        )  # fmt: skip
        self.cache: tuple[tuple[int, ...], ctypes.Array, ctypes.Array] | None = None  # checked cache buffers

    @classmethod
    def of(
        cls,
        layers: Sequence[LayerOperands],
        n_heads: int,
        n_kv_heads: int,
        head_dim: int,
        eps: float,
        embedding: torch.Tensor,
        norm: torch.Tensor,
        head: Operands | None,
    ) -> DecodeStep | None:
        """The step for these blocks, embedding table (vocab, dim), final norm weight and output head, or None where
        mc_decode_token cannot take them: shapes it does not handle, or a head not on our kernels (None)."""
        if not layers or head is None:
            return None
        H, KV, D = n_heads, n_kv_heads, head_dim
        dim, hidden = layers[0].attention_norm.numel(), layers[0].w2.shape[1]
        names = ("wqkv", "wo", "w13", "w2")
        fits = (
            step_fits(dim, hidden, H, KV, D, [{n: getattr(la, n).shape for n in names} for la in layers])
            and all(_bf16_row(t, dim) for t in (embedding, norm))
            and norm.numel() == dim
            and head.shape[1] == dim
            and all(_bf16_row(la.attention_norm, dim) and _bf16_row(la.ffn_norm, dim) for la in layers)
        )
        return cls(list(layers), H, KV, D, eps, embedding, norm, head) if fits else None

    def buffers(self, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> tuple[ctypes.Array, ...]:
        """The cache's key and value buffers as pointer arrays, after checking their layout (1, KV, capacity, D)
        bf16, once for each set of buffers (a cache reallocates all of them when it grows)."""
        key = tuple(t.data_ptr() for t in (*keys, *values)) + tuple(keys[0].shape)
        if self.cache is None or self.cache[0] != key:
            cap = keys[0].shape[2]
            if not (
                len(keys) == len(values) == len(self.layers)
                and all(
                    t.shape == (1, self.KV, cap, self.D) and t.dtype == torch.bfloat16 and t.is_contiguous()
                    for t in (*keys, *values)
                )
            ):
                raise ValueError("the decode step's cache does not have the layout the kernels read")
            pointers = ctypes.c_void_p * len(keys)
            self.cache = (key, pointers(*key[: len(keys)]), pointers(*key[len(keys) : 2 * len(keys)]))
        return self.cache[1], self.cache[2]


def _bf16_row(t: torch.Tensor, n: int) -> bool:
    """Whether t is a contiguous bf16 tensor of rows of n (a norm weight, an embedding table)."""
    return t.dtype == torch.bfloat16 and t.is_contiguous() and t.shape[-1] == n


@cache
def _torch_vector_halves() -> int:
    """torch's float vectors in its CPU kernels, in halves of 8 lanes: 2 where it runs AVX-512 code. kernels.c adds
    RMSNorm's squares in the order torch's sum does, which depends on it."""
    return 2 if torch.backends.cpu.get_cpu_capability().startswith("AVX512") else 1


class Kernels:
    """The loaded library; each method computes x @ W.T for x of one row (any leading shape of size 1)."""

    def __init__(self, lib: ctypes.CDLL, path: Path) -> None:
        self.path = path
        self.features = int(lib.mc_features())  # kernels.c: 1 AVX512-BF16 (bf16), 2 AVX512-VNNI (int4, int8 rows)
        library.bind(lib)  # a library loaded elsewhere too (the tests' second build)
        self.lib = lib
        self._bf16, self._int8, self._int4 = lib.mc_gemv_bf16, lib.mc_gemv_int8, lib.mc_gemv_int4
        self._gemm4, self._gemm_bf16, self._gemm8 = lib.mc_gemm_int4, lib.mc_gemm_bf16, lib.mc_gemm_int8
        self._dequant4, self._attention, self._decode = lib.mc_dequant_int4, lib.mc_attention_bf16, lib.mc_decode_token
        self._decode_many = lib.mc_decode_tokens

    @staticmethod
    def _io(x: torch.Tensor, N: int, K: int, *weights: torch.Tensor) -> tuple[torch.Tensor, int, torch.Tensor]:
        """x as the C code reads it (contiguous float32 or bf16) and the output to fill; the C code trusts shapes and
        layouts, so they are checked here."""
        if x.shape[-1] != K or x.numel() != K or not all(w.is_contiguous() for w in weights):
            raise ValueError(f"a decode kernel takes one contiguous row of {K}, got {tuple(x.shape)}")
        if x.dtype not in _DTYPE_CODES:
            x = x.float()
        x = x.contiguous()
        y = torch.empty(*x.shape[:-1], N, dtype=x.dtype)
        return x, _DTYPE_CODES[x.dtype], y

    def linear_bf16(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        N, K = w.shape
        x, code, y = self._io(x, N, K, w)
        check(self._bf16(w.data_ptr(), x.data_ptr(), code, y.data_ptr(), code, N, K, torch.get_num_threads()))
        return y

    def linear_int8(self, x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        N, K = q.shape
        x, code, y = self._io(x, N, K, q, scales)
        rc = self._int8(
            q.data_ptr(), scales.data_ptr(), x.data_ptr(), code, y.data_ptr(), code, N, K, torch.get_num_threads()
        )
        check(rc)
        return y

    def linear_int4(self, x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """`packed` from pack_int4, `scales` from pack_int4_scales."""
        N, K = packed.shape[0], packed.shape[1] * 2
        S = _check_int4(packed, scales)
        x, code, y = self._io(x, N, K, packed, scales)
        rc = self._int4(
            packed.data_ptr(), scales.data_ptr(), x.data_ptr(), code, y.data_ptr(), code, N, K, S,
            torch.get_num_threads(),
        )  # fmt: skip
        check(rc)
        return y

    def linear_bf16_rows(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """`linear_bf16` of a few bf16 rows at once (a short prompt), each row's result equal to `linear_bf16` of that
        row: the weights are read from memory once for all the rows (with AVX512-BF16 where the build has it, else
        widened to float32 on the AVX2 paths)."""
        N, K = w.shape
        if x.shape[-1] != K or x.dtype != torch.bfloat16 or w.dtype != torch.bfloat16 or not w.is_contiguous():
            raise ValueError(f"a bf16 product of {K} columns takes bf16 rows of {K}, got {tuple(x.shape)} {x.dtype}")
        rows = x.reshape(-1, K).contiguous()
        y = torch.empty(rows.shape[0], N, dtype=torch.bfloat16)
        check(
            self._gemm_bf16(w.data_ptr(), rows.data_ptr(), y.data_ptr(), rows.shape[0], N, K, torch.get_num_threads())
        )
        return y.reshape(*x.shape[:-1], N)

    @property
    def int8_rows(self) -> bool:
        """Whether `linear_int8_rows` is in this build (AVX512-VNNI)."""
        return bool(self.features & 2)

    def linear_int8_rows(self, x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """`linear_int8` of many rows at once (a prompt), each row's result equal to `linear_int8` of that row: the
        weights are read once per block of rows and multiplied as integers, with no dequantized copy."""
        N, K = q.shape
        if x.shape[-1] != K or q.dtype != torch.int8 or not q.is_contiguous() or K % 32:
            raise ValueError(f"an int8 product of {K} columns takes rows of {K}, got {tuple(x.shape)}")
        if scales.dtype != torch.float32 or scales.numel() != N or not scales.is_contiguous():
            raise ValueError(f"an int8 product of {N} rows takes {N} float32 scales, got {tuple(scales.shape)}")
        rows, code, y = _prompt_rows(x, N, K)
        rc = self._gemm8(
            q.data_ptr(), scales.data_ptr(), rows.data_ptr(), code, y.data_ptr(), code, rows.shape[0], N, K,
            torch.get_num_threads(),
        )  # fmt: skip
        check(rc)
        return y.reshape(*x.shape[:-1], N)

    @property
    def int4_rows(self) -> bool:
        """Whether `linear_int4_rows` is in this build (AVX512-VNNI)."""
        return bool(self.features & 2)

    def linear_int4_rows(self, x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """`linear_int4` of many rows at once (a prompt), each row's result equal to `linear_int4` of that row: the
        weights are read once per block of rows and multiplied as integers, with no dequantized copy."""
        N, K = packed.shape[0], packed.shape[1] * 2
        S = _check_int4(packed, scales)
        if x.shape[-1] != K:
            raise ValueError(f"an int4 product of {K} columns takes rows of {K}, got {tuple(x.shape)}")
        rows, code, y = _prompt_rows(x, N, K)
        rc = self._gemm4(
            packed.data_ptr(), scales.data_ptr(), rows.data_ptr(), code, y.data_ptr(), code, rows.shape[0], N, K, S,
            torch.get_num_threads(),
        )  # fmt: skip
        check(rc)
        return y.reshape(*x.shape[:-1], N)

    @staticmethod
    def attention_fits(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
        """Whether `attention` takes these: one bf16 query row, keys/values laid out as the cache keeps them."""
        B, KV, L, D = k.shape
        H = q.numel() // D
        return (
            B == 1
            and q.dtype == k.dtype == v.dtype == torch.bfloat16
            and attention_heads_fit(H, KV, D)
            and k.stride()[2:] == v.stride()[2:] == (D, 1)
            and k.stride(1) == v.stride(1)
        )

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int = 0) -> torch.Tensor:
        """One decode step's attention: q (H query heads of D, any shape) against keys/values (1, KV, L, D) from
        position `start` on (a sliding window), query head h reading key/value head h // (H / KV); (H, D) out."""
        _, KV, L, D = k.shape
        H = q.numel() // D
        q = q.reshape(H, D).contiguous()
        out = torch.empty(H, D, dtype=torch.bfloat16)
        rc = self._attention(
            q.data_ptr(), k.data_ptr(), v.data_ptr(), k.stride(1), start, L, H, KV, D, D**-0.5, out.data_ptr(),
            torch.get_num_threads(),
        )  # fmt: skip
        check(rc)
        return out

    def decode_token(
        self,
        step: DecodeStep,
        token: int,
        cos: torch.Tensor,
        sin: torch.Tensor,
        keys: Sequence[torch.Tensor],
        values: Sequence[torch.Tensor],
        pos: int,
        start: int,
    ) -> torch.Tensor:
        """One decode step of `token` at position `pos`: its float32 logits. Each block writes its key/value at `pos`
        of keys[l]/values[l] (1, KV, capacity, D) and attends to positions [start, pos]; cos/sin are RoPE tables
        (rows, 1, D) or (rows, D) whose row `pos` is this position's."""
        D, (kc, vc) = step.D, step.buffers(keys, values)
        cap = keys[0].shape[2]
        self._check_step(step, [token], cos, sin, cap, pos)
        if not 0 <= start <= pos:
            raise ValueError("the decode step's position or RoPE tables do not have the layout the kernels read")
        logits = torch.empty(step.head.shape[0])
        rc = self._decode(
            step.model, token, kc, vc, cap * D, cos.data_ptr() + 2 * pos * D,
            sin.data_ptr() + 2 * pos * D, pos, start, _torch_vector_halves(), logits.data_ptr(),
            torch.get_num_threads(),
        )  # fmt: skip
        check(rc)
        return logits

    def decode_tokens(
        self,
        step: DecodeStep,
        tokens: Sequence[int],
        cos: torch.Tensor,
        sin: torch.Tensor,
        keys: Sequence[torch.Tensor],
        values: Sequence[torch.Tensor],
        pos: int,
        window: int | None,
    ) -> torch.Tensor:
        """`decode_token` for each of `tokens` at positions pos, pos + 1, ..., taken block by block (each block's
        weights read once for all of them), bit for bit the same; the last token's float32 logits. cos/sin: RoPE
        tables whose row p is position p's; window: the sliding window, None for none."""
        D, (kc, vc) = step.D, step.buffers(keys, values)
        cap = keys[0].shape[2]
        self._check_step(step, tokens, cos, sin, cap, pos)
        logits = torch.empty(step.head.shape[0])
        ids = (ctypes.c_int64 * len(tokens))(*tokens)
        rc = self._decode_many(
            step.model, ids, len(tokens), kc, vc, cap * D, cos.data_ptr(), sin.data_ptr(), pos, window or 0,
            _torch_vector_halves(), logits.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
        check(rc)
        return logits

    @staticmethod
    def _check_step(step: DecodeStep, tokens: Sequence[int], cos: torch.Tensor, sin: torch.Tensor, cap: int,
                    pos: int) -> None:  # fmt: skip
        """What the whole-step calls trust: token ids, their positions from `pos` on inside the cache and the RoPE
        tables, and the tables' layout."""
        D, n = step.D, len(tokens)
        for token in tokens:
            if not 0 <= token < step.vocab:
                raise IndexError(f"token id {token} is not in the vocabulary of {step.vocab}")
        if not (
            n >= 1
            and cos.dtype == sin.dtype == torch.bfloat16
            and cos.shape[-1] == sin.shape[-1] == D
            and cos.is_contiguous()
            and sin.is_contiguous()
            and pos >= 0
            and pos + n <= min(cap, cos.numel() // D, sin.numel() // D)
        ):
            raise ValueError("the decode step's position or RoPE tables do not have the layout the kernels read")

    def dequantize_int4(
        self,
        packed: torch.Tensor,
        scales: torch.Tensor,
        rows: slice,
        dtype: torch.dtype = torch.float32,
        scratch: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Rows `rows` of an int4 weight in our layout (pack_int4, pack_int4_scales), as float32 or bf16 (the
        float32 values rounded, as `.to(torch.bfloat16)` would); written into the start of `scratch` (contiguous,
        of `dtype`) when it is given and large enough."""
        N, K = packed.shape[0], packed.shape[1] * 2
        S = _check_int4(packed, scales)
        if not 0 <= rows.start <= rows.stop <= N:
            raise ValueError(f"rows {rows.start}..{rows.stop} of a weight of {N}")
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"int4 weights dequantize to float32 or bf16, not {dtype}")
        n = (rows.stop - rows.start) * K
        if scratch is not None and scratch.dtype == dtype and scratch.is_contiguous() and scratch.numel() >= n:
            out = scratch.view(-1)[:n].view(rows.stop - rows.start, K)
        else:
            out = torch.empty(rows.stop - rows.start, K, dtype=dtype)
        rc = self._dequant4(
            packed.data_ptr(), scales.data_ptr(), out.data_ptr(), _DTYPE_CODES[dtype], rows.start, rows.stop, K, S,
            torch.get_num_threads(),
        )  # fmt: skip
        check(rc)
        return out


def _check_int4(packed: torch.Tensor, scales: torch.Tensor) -> int:
    """The superblock of an int4 weight in our layout, after checking that its codes and scales fit together (the C
    code trusts them)."""
    N, K = packed.shape[0], packed.shape[1] * 2
    S = int4_superblock(K) if supports(K, INT4_GROUP, N) else 0
    record = 16 + 16 * S // INT4_GROUP
    expected = (N // 4, K // S, record) if S else None
    if packed.dtype != torch.uint8 or scales.dtype != torch.uint8 or tuple(scales.shape) != expected:
        raise ValueError(f"not an int4 weight in our layout: codes {tuple(packed.shape)}, scales {tuple(scales.shape)}")
    if not (packed.is_contiguous() and scales.is_contiguous()):
        raise ValueError("an int4 weight's codes and scales must be contiguous")
    return S


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Codes 0..15 (N, K) as uint8 -> (N, K/2) bytes in kernels.c's layout: for each block of four rows and group of
    64 columns, the four rows' 32 bytes in turn, byte i holding column i in its low nibble and 32+i in its high
    one. Rows 4b..4b+3 of the result hold rows 4b..4b+3 of the codes, so blocks of rows can be packed apart."""
    N, K = codes.shape
    halves = codes.reshape(N // 4, 4, K // 64, 2, 32)
    return (halves[:, :, :, 0] | (halves[:, :, :, 1] << 4)).transpose(1, 2).reshape(N, K // 2)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of pack_int4."""
    N, half = packed.shape
    blocks = packed.reshape(N // 4, half // 32, 4, 1, 32).transpose(1, 2)
    return torch.cat([blocks & 15, blocks >> 4], dim=3).reshape(N, half * 2)


def pack_int4_scales(scales: torch.Tensor, lows: torch.Tensor) -> torch.Tensor:
    """Per-group scales (positive) and lows (N, K/64) -> kernels.c's records (N/4, K/S, 16 + 16 J) of S = 64 J
    columns (`int4_superblock`): per block of four rows and superblock, the four rows' float32 multipliers f (the
    superblock's largest scale / 16383), then per group the four rows' int16 subscales round(scale / f), then per
    group their bf16 lows. The scale a weight gets is f * subscale: within 1/32766 of the superblock's largest."""
    N, groups = scales.shape
    J = int4_superblock(groups * INT4_GROUP) // INT4_GROUP
    by_block = scales.double().reshape(N, groups // J, J)  # float64: a float32 quotient near 16383 is off by 1e-3
    f = (by_block.amax(dim=-1) / INT4_SUB_MAX).clamp(min=torch.finfo(torch.float32).tiny).float()
    sub = torch.round(by_block / f.double()[..., None]).clamp(0, INT4_SUB_MAX).to(torch.int16)

    def four_rows(t: torch.Tensor) -> torch.Tensor:  # (N, ...) -> (N/4, ..., 4): the rows of a block last
        return t.reshape(N // 4, 4, *t.shape[1:]).movedim(1, -1).contiguous()

    per_group = [four_rows(sub), four_rows(lows.reshape(N, -1, J).to(torch.bfloat16))]  # (N/4, K/S, J, 4) each
    return torch.cat([four_rows(f).view(torch.uint8), *(t.view(torch.uint8).flatten(2) for t in per_group)], dim=-1)


def unpack_int4_scales(records: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """pack_int4_scales' records -> the scales f * subscale and the lows, float32 (N, K/64) each."""
    blocks, superblocks, size = records.shape
    J = (size - 16) // 16
    N = 4 * blocks

    def by_row(t: torch.Tensor) -> torch.Tensor:  # (N/4, K/S, [J,] 4) -> (N, K/S [* J])
        return t.movedim(-1, 1).reshape(N, -1)

    f = by_row(records[..., :16].contiguous().view(torch.float32))
    sub, lows = (records[..., 16 + 8 * J * i : 16 + 8 * J * (i + 1)].reshape(blocks, superblocks, J, 8) for i in (0, 1))
    sub = by_row(sub.contiguous().view(torch.int16)).float()
    lows = by_row(lows.contiguous().view(torch.bfloat16)).float()
    return sub * f.repeat_interleave(J, dim=1), lows


def label(kernels: Kernels | None = None) -> str:
    """What the decode steps run on, for --verbose, the chat banner and `mistral info`."""
    k = kernels or native()
    return library.label(k.features if k is not None else 0)


@cache
def native() -> Kernels | None:
    """The kernels for this machine, built on first use, or None where they cannot be used (see `status()`)."""
    loaded = library.library()
    return None if loaded is None else Kernels(*loaded)


if __name__ == "__main__":  # python -m mistral_cli.native.kernels: build them now and say where they are
    k = native()
    print(f"kernels: {status()}" + (f" ({k.path})" if k else ""))
    sys.exit(0 if k else 1)
