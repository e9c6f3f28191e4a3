"""Our kernels wired into a loaded model from outside, so that model/transformer.py stays plain torch.

`use_kernels` gives the model's bf16 linear layers and its attention our kernels for a decode step (a layer changes
its class to a subclass that overrides one method, as torch's own parametrizations do), and returns a `FusedStep`,
a whole decode step in one call to them, where every block fits it. Quantized layers are built for our kernels by
the loader (model/quant.py, `kernels=`); here they only join the whole step.
"""

from __future__ import annotations

import torch

from mistral_cli.model.cache import KVCache
from mistral_cli.model.transformer import Attention, Block, Linear, Transformer, window_start
from mistral_cli.native.kernels import DecodeStep, Kernels, LayerOperands, Operands, supports

# The most rows of a bf16 product that go to our kernels' several-rows product instead of torch's GEMM, measured per
# 7B layer on a Zen 4 host (BENCHMARKS.md): with AVX512-BF16 ours is 1.1-1.6x faster from 2 to 16 rows, 1.1x at 32,
# equal at 64; on the AVX2 paths (against torch's float32 GEMM of the widened weights, which CPUs without fast bf16
# take, limited to AVX2) 2.2-4x from 2 to 16 rows, 1.8x at 32, equal at 64.
BF16_ROWS = 32


class KernelLinear(Linear):
    """A bf16 linear layer whose single-row products (a decode step's) run on our kernels."""

    kernels: Kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if rows == 1:
            return self.kernels.linear_bf16(x, self.weight)
        if rows <= BF16_ROWS and x.dtype == torch.bfloat16:
            return self.kernels.linear_bf16_rows(x, self.weight)  # a short prompt: the weights read once
        return super().forward(x)


class KernelAttention(Attention):
    """Attention whose decode steps over a growing cache run on our kernels."""

    kernels: Kernels

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, pos: int | torch.Tensor
    ) -> torch.Tensor:
        B, H, T, D = q.shape
        # a growing cache holds exactly the keys [0, pos]; a sliding window sees the last `window` of them
        # (a 4-D mask is a batch's padding, which the kernel does not read)
        one = T == 1 and (mask is None or mask.dim() == 2)
        if one and isinstance(pos, int) and k.shape[2] == pos + 1 and self.kernels.attention_fits(q, k, v):
            return self.kernels.attention(q, k, v, window_start(k.shape[2], self.window)).view(B, T, H * D)
        return super().attend(q, k, v, mask, pos)


class FusedStep:
    """A decode step in one call to our kernels (kernels.c's mc_decode_token): the embedding row, every block, the
    final norm and the output head, bit for bit what the model's modules compute on the same kernels."""

    def __init__(self, model: Transformer, kernels: Kernels, step: DecodeStep) -> None:
        self.model, self.kernels, self.step = model, kernels, step

    def __call__(self, token: int, cache: KVCache, pos: int) -> torch.Tensor:
        """Feed `token` at position `pos` of a growing cache (which then holds [0, pos]); its float32 logits (V,)."""
        if pos > cache.length:
            raise ValueError(f"cannot write at position {pos}: the cache holds only {cache.length}")
        cache.reserve(pos + 1)
        cos, sin = self.model.rope_rows(pos + 1, cache.device)
        start = window_start(pos + 1, self.model.cfg.sliding_window)  # the call applies the sliding window itself
        logits = self.kernels.decode_token(self.step, token, cos, sin, cache.k, cache.v, pos, start)
        cache.length = pos + 1
        return logits

    def feed(self, tokens: list[int], cache: KVCache, pos: int) -> torch.Tensor:
        """`tokens` at positions pos, pos + 1, ... in one call, block by block (kernels.c's mc_decode_tokens): the
        cache and the last token's logits bit for bit those of a call per token."""
        if pos > cache.length:
            raise ValueError(f"cannot write at position {pos}: the cache holds only {cache.length}")
        end = pos + len(tokens)
        cache.reserve(end)
        cos, sin = self.model.rope_rows(end, cache.device)
        window = self.model.cfg.sliding_window
        logits = self.kernels.decode_tokens(self.step, tokens, cos, sin, cache.k, cache.v, pos, window)
        cache.length = end
        return logits


def use_kernels(model: Transformer, kernels: Kernels) -> FusedStep | None:
    """Decode the model's bf16 linear layers and its attention with our kernels; the whole-step call where every
    block's layers run on them (bf16 activations; quantized layers built with the same kernels), else None."""
    bf16 = model.tok_embeddings.weight.dtype == torch.bfloat16  # the activations' and the cache's dtype
    for module in model.modules():
        if bf16 and type(module) is Attention:
            module.__class__ = KernelAttention
        elif type(module) is Linear and _fits(module.weight):
            module.__class__ = KernelLinear
        else:
            continue
        module.kernels = kernels  # type: ignore[assignment]
    blocks = [_block_operands(block) for block in model.layers]
    head = operands(model.output)
    if not bf16 or None in blocks or head is None:
        return None
    cfg = model.cfg
    step = DecodeStep.of(
        blocks,  # type: ignore[arg-type]
        cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.norm_eps, model.tok_embeddings.weight, model.norm.weight, head,
    )  # fmt: skip
    return None if step is None else FusedStep(model, kernels, step)


def operands(layer: torch.nn.Module) -> Operands | None:
    """A linear layer as the whole-step call reads it, when its single-row products run on our kernels."""
    if isinstance(layer, KernelLinear):
        return Operands("bf16", layer.weight)
    native = getattr(layer, "operands", None)  # quantized layers built for our kernels
    return native() if native is not None else None


def _fits(weight: torch.Tensor) -> bool:
    return weight.dtype == torch.bfloat16 and weight.is_contiguous() and supports(weight.shape[1])


def _block_operands(block: Block) -> LayerOperands | None:
    linears = (block.attention.wqkv, block.attention.wo, block.feed_forward.w13, block.feed_forward.w2)
    ops = [operands(layer) for layer in linears]
    if not isinstance(block.attention, KernelAttention) or None in ops:
        return None
    return LayerOperands(block.attention_norm.weight, block.ffn_norm.weight, *ops)  # type: ignore[arg-type]
