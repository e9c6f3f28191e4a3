"""The Mistral network: pure math in plain torch, no I/O, no device or dtype decisions.

Layout: q/k/v and gate/up projections are fused (one matmul each instead of three and two), and RoPE rotates
halves of each head (the HF convention), so native checkpoints are permuted once at load (checkpoint.py; the
permutation is docs/FORMAT.md section 3).

Two paths: `forward` for prompts and steps over a growing cache, `decode_step` for one step over a static cache
(fixed shapes, for torch.compile and CUDA graphs). Our C kernels are wired in from outside (native/decode.py): they
take over single-row products and a step's attention, or a whole decode step, without this file knowing them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mistral_cli.model.cache import KVCache
from mistral_cli.model.config import ModelConfig

_SDPA_HAS_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2] if p.isdigit()) >= (2, 5)


class Embedding(nn.Embedding):
    def reset_parameters(self) -> None:
        pass


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x * rsqrt(mean(x^2) + eps) in float32, as the reference does, in one op instead of five
        h = F.rms_norm(x.float(), self.weight.shape, eps=self.eps)
        return h.to(x.dtype) * self.weight


def inv_frequencies(head_dim: int, theta: float, device: torch.device) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))  # (D/2,)


def rope_tables(
    positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype, inv_freq: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape (T, 1, head_dim) for the given positions (broadcast over heads), computed in float32."""
    if inv_freq is None:
        inv_freq = inv_frequencies(head_dim, theta, positions.device)
    freqs = positions.float()[:, None] * inv_freq[None, :]  # (T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # (T, 1, D)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, T, heads, D); rotates (x[j], x[j + D/2]) pairs
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def window_start(length: int, window: int | None) -> int:
    """The first of `length` positions that a query at the last one attends to: all of them, or the last `window`."""
    return max(0, length - window) if window else 0


BLOCK_BYTES = 16 << 20  # weights converted at a time by blocked_linear: the fastest of 1-64 MiB for a 7B int4 prompt
_blocks = threading.local()


def block_buffer(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """This thread's buffer for converted blocks of weights, reused by every layer and prompt: a fresh allocation
    per block is faulted in (and zeroed) by the OS page by page each time, which cost as much as the conversion."""
    buffers = _blocks.__dict__.setdefault("buffers", {})
    buf = buffers.get((dtype, device))
    if buf is None or buf.numel() < numel:
        with torch.inference_mode(False):  # a normal tensor: written in place inside inference mode and outside it
            buf = buffers[dtype, device] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]


def blocked_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    dtype: torch.dtype,
    dequantize: Callable[[slice, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """x @ W.T computed in `dtype`, converting W a block of rows at a time: W is `weight` (any dtype) or, for a
    packed weight, what `dequantize(rows, into)` gives for each block of rows (written into `into`, a buffer of
    the block's shape and `dtype`, where it can).

    A whole converted copy of a large weight costs memory and page faults on every call, more than the GEMM itself
    for short prompts; one block of BLOCK_BYTES stays in the caches between its conversion and its product.
    """
    N = weight.shape[0]
    K = x.shape[-1]
    rows = max(1, BLOCK_BYTES // (K * dtype.itemsize))
    xd = x.reshape(-1, K).to(dtype)
    out = torch.empty(xd.shape[0], N, dtype=dtype, device=x.device)
    buf = block_buffer(min(N, rows) * K, dtype, x.device) if dequantize or weight.dtype != dtype else None
    for i in range(0, N, rows):
        n = min(N, i + rows) - i
        if buf is None:
            block = weight[i : i + n]
        else:
            block = buf[: n * K].view(n, K)
            got = weight[i : i + n] if dequantize is None else dequantize(slice(i, i + n), block)
            if got.data_ptr() != block.data_ptr():
                block.copy_(got)
        torch.mm(xd, block.T, out=out[:, i : i + n])
    return out.reshape(*x.shape[:-1], N)


class Linear(nn.Linear):
    """nn.Linear that can run products of several rows in float32 while its weight stays in bf16/fp16.

    `upcast` is set at load on CPUs without fast bf16 (placement.slow_half_matmul): there a bf16 GEMM costs as much
    per row as a whole decode step, so a prompt is several times faster converted to float32 block by block; a
    single row (a decode step) is a bandwidth-bound product where the half-size weight wins.
    """

    upcast = False

    def reset_parameters(self) -> None:
        pass  # weights always come from a checkpoint; random init on the meta device would import torch._dynamo

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.upcast and x.dtype != torch.float32 and x.numel() > x.shape[-1]:
            return blocked_linear(x, self.weight, torch.float32).to(x.dtype)
        return F.linear(x, self.weight)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.window = cfg.sliding_window
        q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        self.wqkv = Linear(cfg.dim, q + 2 * kv, bias=False)
        self.wo = Linear(q, cfg.dim, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache,
        layer: int,
        pos: int | torch.Tensor,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        H, KV, D = self.n_heads, self.n_kv_heads, self.head_dim
        qkv = self.wqkv(x).view(B, T, H + 2 * KV, D)
        qk = apply_rope(qkv[:, :, : H + KV], cos, sin)  # queries and keys rotated together: one set of ops
        q = qk[:, :, :H].transpose(1, 2)  # (B, H, T, D)
        k = qk[:, :, H:].transpose(1, 2)  # (B, KV, T, D)
        v = qkv[:, :, H + KV :].transpose(1, 2)
        k, v = cache.update(layer, pos, k, v)  # (B, KV, L, D): L = start + T, or the capacity of a static cache
        return self.wo(self.attend(q, k, v, mask, pos))

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, pos: int | torch.Tensor
    ) -> torch.Tensor:
        """Queries (B, H, T, D) at positions from `pos` on against the cache's keys/values (B, KV, L, D) -> (B, T, H*D)."""
        B, H, T, D = q.shape
        KV = k.shape[1]
        if T == 1:
            # One query per head: fold the query heads sharing a kv head into the query axis, so the kv heads are
            # read once, with no copy (query head h reads kv head h // (H / KV)).
            y = F.scaled_dot_product_attention(q.reshape(B, KV, H // KV, D), k, v, attn_mask=mask)
        elif _SDPA_HAS_GQA:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
        else:
            k, v = k.repeat_interleave(H // KV, dim=1), v.repeat_interleave(H // KV, dim=1)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return y.reshape(B, H, T, D).transpose(1, 2).reshape(B, T, H * D)


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.w13 = Linear(cfg.dim, 2 * cfg.hidden_dim, bias=False)  # gate (w1) and up (w3), fused
        self.w2 = Linear(cfg.hidden_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x, cos, sin, cache, layer, pos, mask):  # type: ignore[no-untyped-def]
        h = x + self.attention(self.attention_norm(x), cos, sin, cache, layer, pos, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = Linear(cfg.dim, cfg.vocab_size, bias=False)
        self._inv_freq_table: torch.Tensor | None = None  # RoPE frequencies, a plain attribute (not in the state)
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None  # cos/sin of positions [0, n), see rope_rows

    def new_cache(self, max_len: int | None = None, *, batch: int = 1, static: bool = False) -> KVCache:
        ref = self.tok_embeddings.weight  # never quantized: its dtype is the activations' dtype
        return KVCache(
            self.cfg.n_layers,
            self.cfg.n_kv_heads,
            self.cfg.head_dim,
            max_len or self.cfg.max_context,
            dtype=ref.dtype,
            device=ref.device,
            batch=batch,
            static=static,
        )

    def decode_bytes(self) -> int:
        """Bytes of weights one decode step reads: every parameter and buffer (quantized layers keep theirs as
        buffers) but the embedding table, of which a token reads one row."""
        tensors = [*self.named_parameters(), *self.named_buffers()]
        return sum(t.numel() * t.element_size() for name, t in tensors if not name.startswith("tok_embeddings."))

    def set_upcast(self, upcast: bool) -> None:
        """Run multi-row products in float32 (see Linear); chosen at load from the device and dtype."""
        for module in self.modules():
            if hasattr(module, "upcast"):
                module.upcast = upcast

    def forward(
        self,
        tokens: torch.Tensor,
        cache: KVCache,
        start: int | None = None,
        *,
        last_only: bool = False,
        keys: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tokens (B, T) at positions [start, start+T) -> float32 logits (B, T, V), or (B, 1, V) with last_only.

        `start` defaults to the cache's length (continue the sequence); a smaller one overwrites from there.
        `keys` (B, >= start+T) bool: the positions each row may attend to at all, on top of the causal mask: a batch
        of sequences of different lengths, left-padded to one, has False at its padding (RoPE depends only on the
        distance between positions, so a sequence shifted right computes what it computes unshifted).
        """
        B, T = tokens.shape
        start = cache.length if start is None else start
        if start > cache.length:
            raise ValueError(f"cannot write at position {start}: the cache holds only {cache.length}")
        end = start + T
        cache.reserve(end)
        if cache.static:
            positions = torch.arange(start, end, device=tokens.device)
            mask = self.position_mask(positions, cache.capacity)
            logits = self._run(tokens, cache, positions, *self._rope_at(positions), mask, last_only)
        else:
            cos, sin = (table[start:end] for table in self.rope_rows(end, tokens.device))
            mask = self._mask(start, T, end, tokens.device)
            if keys is not None:
                if mask is None:
                    mask = self.position_mask(torch.arange(start, end, device=tokens.device), end)
                mask = mask[None, None] & keys[:, None, None, :end]  # (B, 1, T, end)
            logits = self._run(tokens, cache, start, cos, sin, mask, last_only)
        cache.length = end
        return logits

    def decode_step(self, tokens: torch.Tensor, cache: KVCache, positions: torch.Tensor) -> torch.Tensor:
        """tokens (B, 1) at positions (1,) -> logits (B, 1, V), for a static cache whose length the caller keeps.

        Positions are a tensor and every shape is fixed, so `torch.compile` makes one graph for all steps.
        """
        mask = self.position_mask(positions, cache.capacity)
        return self._run(tokens, cache, positions, *self._rope_at(positions), mask, False)

    def _run(
        self,
        tokens: torch.Tensor,
        cache: KVCache,
        write_at: int | torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        last_only: bool,
    ) -> torch.Tensor:
        """write_at: where the cache takes the new keys/values, the start as an int (growing cache, written by
        slicing) or the positions tensor itself (static cache, written by index); cos/sin: the positions' RoPE."""
        x = self.tok_embeddings(tokens)  # (B, T, C)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache, i, write_at, mask)
        if last_only:
            x = x[:, -1:]
        return self.output(self.norm(x)).float()

    def rope_rows(self, end: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE cos/sin tables (n, 1, head_dim) in the activations' dtype for positions [0, n), n >= end.

        Made once and grown by doubling, so that a step looks its position up instead of computing it (eight small
        ops per token); every path over a growing cache reads the same table, prompt and decode steps alike.
        """
        dtype, have = self.tok_embeddings.weight.dtype, 0
        if self._rope is not None and self._rope[0].device == device and self._rope[0].dtype == dtype:
            have = self._rope[0].shape[0]
        if end > have:
            n = max(end, min(2 * have, self.cfg.max_context), 256)
            cos, sin = self._rope_at(torch.arange(have, n, device=device))
            if have:
                assert self._rope is not None
                cos, sin = torch.cat((self._rope[0], cos)), torch.cat((self._rope[1], sin))
            self._rope = cos, sin
        assert self._rope is not None
        return self._rope

    def _rope_at(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin (T, 1, head_dim) for a tensor of positions, computed (a compiled step's positions are a tensor)."""
        dtype, device = self.tok_embeddings.weight.dtype, positions.device
        return rope_tables(positions, self.cfg.head_dim, self.cfg.rope_theta, dtype, self._inv_freq(device))

    def _inv_freq(self, device: torch.device) -> torch.Tensor:
        # made on first use, not in __init__: the model is built on the meta device and only then filled
        if self._inv_freq_table is None or self._inv_freq_table.device != device:
            self._inv_freq_table = inv_frequencies(self.cfg.head_dim, self.cfg.rope_theta, device)
        return self._inv_freq_table

    def position_mask(self, positions: torch.Tensor, L: int) -> torch.Tensor:
        """Boolean (T, L) mask from query positions held in a tensor: True where a query may see key j."""
        q_pos = positions[:, None]
        k_pos = torch.arange(L, device=positions.device)[None, :]
        allowed = k_pos <= q_pos
        if self.cfg.sliding_window is not None:
            allowed &= q_pos - k_pos < self.cfg.sliding_window
        return allowed

    def _mask(self, start: int, T: int, L: int, device: torch.device) -> torch.Tensor | None:
        """Boolean (T, L) mask, True where query at start+i may see key j; None when plain causal attention suffices."""
        window = self.cfg.sliding_window
        end = start + T
        if end == L and (window is None or end <= window) and (T == 1 or start == 0):
            return None  # T == 1: every key is visible; start == 0: SDPA's is_causal covers it
        return self.position_mask(torch.arange(start, end, device=device), L)
