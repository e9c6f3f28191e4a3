"""Decode steps on a GPU: token ids read back without waiting for the next step, replays of captured CUDA graphs,
and the compiled step (`--compile`).

Greedy decoding queues the next step before it reads the token back, so the GPU is never idle while Python turns a
token into text. A decode step can also replay a captured CUDA graph (one launch instead of hundreds of kernel
launches from Python), but only where $MISTRAL_CUDA_GRAPHS asks for it: on the one GPU measured so far (an H200,
BENCHMARKS.md "On a GPU") the replayed masked step ran at 55 tokens/s on the 7B model where launching each kernel
from Python with queued steps ran at 80 (and `--compile` at 198), for reasons not yet found.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mistral_cli.hardware import GRAPHS_ENV, switched_on
from mistral_cli.model.cache import KVCache
from mistral_cli.model.transformer import Transformer


def graphs_wanted(device: torch.device, compile: bool) -> bool:
    """Whether decode steps replay CUDA graphs by default: on cuda, without --compile (which makes its own), where
    $MISTRAL_CUDA_GRAPHS switches them on."""
    return device.type == "cuda" and not compile and switched_on(GRAPHS_ENV)


class TokenReader:
    """Reads a token id back from the device without waiting for the work queued after it.

    `int(t)` on a CUDA tensor copies in stream order, after everything queued so far: after the next step, when
    that step is queued first. Instead, `start` queues the copy into pinned host memory and records an event
    after it; `result` waits for that event only. On the CPU the copy is done when `start` returns.
    """

    def __init__(self, device: torch.device) -> None:
        cuda = device.type == "cuda"
        self.host = torch.zeros((), dtype=torch.long, pin_memory=cuda)
        self.copied = torch.cuda.Event() if cuda else None  # one event, recorded again for every token

    def start(self, token: torch.Tensor) -> None:
        self.host.copy_(token, non_blocking=self.copied is not None)
        if self.copied is not None:
            self.copied.record()

    def result(self) -> int:
        if self.copied is not None:
            self.copied.synchronize()
        return int(self.host)


class GraphedDecode:
    """Decode steps replayed from a CUDA graph of `Transformer.decode_step`: one launch per token.

    The step reads the cache's whole buffers with a mask (fixed shapes); the cache grows by doubling, so it reads
    at most twice the live length, and each growth (new buffers) captures a new graph (a recording, no compiling). The
    token and position are copied into fixed input tensors, so a token still on the device needs no sync. If a
    capture fails, `problem` says why and the engine decodes without graphs.
    """

    def __init__(self, model: Transformer, cache: KVCache) -> None:
        self.model, self.cache = model, cache
        device = cache.device
        self.token = torch.zeros((1, 1), dtype=torch.long, device=device)
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        self.key: tuple[int, int] | None = None  # the cache buffers the graph was captured on
        self.problem: str | None = None
        self.pool = torch.cuda.graph_pool_handle()

    def __call__(self, token: int | torch.Tensor, pos: int) -> torch.Tensor:
        self.cache.reserve(pos + 1)
        if isinstance(token, torch.Tensor):
            self.token.copy_(token.view(1, 1))
        else:
            self.token.fill_(token)
        self.position.fill_(pos)
        if self.key != (self.cache.capacity, self.cache.k[0].data_ptr()):
            try:
                self._capture()
            except RuntimeError as e:  # from here on the engine decodes without graphs; its banner says why
                self.problem = f"capture failed: {str(e).splitlines()[0][:120]}"
                self.graph, self.logits, self.key = None, None, None
                logits = self.model.decode_step(self.token, self.cache, self.position)
                self.cache.length = pos + 1
                return logits[0, -1]
        self.graph.replay()  # type: ignore[union-attr]
        self.cache.length = pos + 1
        return self.logits[0, -1]  # type: ignore[index]

    def _capture(self) -> None:
        self.graph, self.logits = None, None  # the old graph's memory goes back to the pool first
        step = self.model.decode_step
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # a warm-up outside the capture (cuBLAS and SDPA pick their kernels)
            step(self.token, self.cache, self.position)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self.logits = step(self.token, self.cache, self.position)
        self.graph = graph
        self.key = (self.cache.capacity, self.cache.k[0].data_ptr())


def compile_decode(model: Transformer, cache: KVCache, device: torch.device) -> Callable[..., torch.Tensor]:
    """model.decode_step compiled for this static cache: fixed shapes, positions as a tensor, so one graph."""
    if device.type == "cuda":
        for t in cache.k + cache.v:
            torch._dynamo.mark_static_address(t)  # the cache is updated in place: keep it inside the CUDA graph
        return torch.compile(model.decode_step, mode="reduce-overhead", fullgraph=True, dynamic=False)
    return torch.compile(model.decode_step, fullgraph=True, dynamic=False)
