"""The key/value cache: one object, written at explicit positions, truncatable back to a prefix.

It grows in chunks up to `max_len` instead of allocating the whole context up front: a 32K context is 4 GiB in
bf16 for the 7B model, while most conversations use a few thousand tokens. `reserve(max_len)` (or static=True)
allocates everything at once, which a compiled decode step needs for fixed shapes.
"""

from __future__ import annotations

import torch

from mistral_cli.errors import MistralError

CHUNK = 256  # growth granularity in positions


class ContextFullError(MistralError):
    pass


class KVCache:
    def __init__(
        self,
        n_layers: int,
        n_kv_heads: int,
        head_dim: int,
        max_len: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        batch: int = 1,
        static: bool = False,
    ) -> None:
        self.n_layers, self.n_kv_heads, self.head_dim = n_layers, n_kv_heads, head_dim
        self.max_len, self.batch = max_len, batch
        self.dtype, self.device = dtype, torch.device(device)
        self.length = 0  # positions [0, length) hold valid keys/values
        self.capacity = 0
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.static = static
        if static:
            self.reserve(max_len)

    def reserve(self, n: int) -> None:
        """Make room for positions [0, n)."""
        if n > self.max_len:
            raise ContextFullError(f"The context is full: {n} tokens needed, {self.max_len} available.")
        if n <= self.capacity:
            return
        new_cap = min(self.max_len, max(n, 2 * self.capacity, CHUNK))
        new_cap = min(self.max_len, -(-new_cap // CHUNK) * CHUNK)
        shape = (self.batch, self.n_kv_heads, new_cap, self.head_dim)
        for store in (self.k, self.v):
            for i in range(self.n_layers):
                # zeros where a decode step reads the whole buffer past the length (a static cache, or a GPU's graphed
                # step): masked out, but garbage could be NaN, and 0 * NaN is NaN in an attention that multiplies
                zeros = self.static or self.device.type != "cpu"
                fresh = (torch.zeros if zeros else torch.empty)(shape, dtype=self.dtype, device=self.device)
                if i < len(store):
                    fresh[:, :, : self.length] = store[i][:, :, : self.length]
                    store[i] = fresh  # the old buffer is freed here, one layer at a time
                else:
                    store.append(fresh)
        self.capacity = new_cap

    def update(
        self, layer: int, pos: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, KV, T, D) at positions [pos, pos+T), or at a (T,) tensor of positions (static caches).

        Returns the keys/values of [0, pos+T), views with no copy; a static cache returns its whole buffers (the
        caller masks the unused tail), so the shapes never change and a compiled step needs no Python int.
        """
        if isinstance(pos, torch.Tensor):
            self.k[layer].index_copy_(2, pos, k)
            self.v[layer].index_copy_(2, pos, v)
            return self.k[layer], self.v[layer]
        end = pos + k.shape[2]
        self.k[layer][:, :, pos:end] = k
        self.v[layer][:, :, pos:end] = v
        if self.static:
            return self.k[layer], self.v[layer]
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def truncate(self, n: int) -> None:
        """Keep only positions [0, n): the next write starts at n."""
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} positions to {n}")
        self.length = n

    def reset(self) -> None:
        self.length = 0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)
