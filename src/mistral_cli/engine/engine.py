"""The generation engine: a loaded model, its tokenizer and the key/value cache of one sequence.

`Engine.generate` is a Python generator: it prefills the tokens the cache does not already hold, then decodes,
yielding each token's text as it becomes final, and finally a `Done` with the finish reason and timings.
It never prints. The cache is reused across calls: a new prompt that extends the previous sequence (the next turn
of a chat) prefills only its new tokens.

On a GPU, decode steps replay a captured CUDA graph (one launch instead of hundreds of kernel launches from
Python), and greedy decoding queues the next step before it reads the token back, so the GPU is never idle
while Python turns a token into text.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from mistral_cli.engine.sampling import Sampler
from mistral_cli.errors import MistralError
from mistral_cli.hardware import GRAPHS_ENV, switched_off
from mistral_cli.model.cache import KVCache
from mistral_cli.model.config import ModelConfig
from mistral_cli.model.placement import Placement
from mistral_cli.model.transformer import Transformer
from mistral_cli.native import kernels
from mistral_cli.options import GenerationOptions
from mistral_cli.text.tokenizer import Tokenizer


@dataclass
class Chunk:
    text: str  # may be "" while a multi-byte character or a possible stop string is pending
    token: int


@dataclass
class Done:
    text: str
    tokens: list[int]
    finish_reason: str  # "stop" | "length" | "stop_sequence" | "context"
    prompt_tokens: int
    prefilled_tokens: int  # prompt tokens that were not already in the cache
    prefill_s: float
    decode_s: float

    @property
    def completion_tokens(self) -> int:
        return len(self.tokens)

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prefilled_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        # the first token comes out of the prefill; the decode steps produce the rest
        steps = max(len(self.tokens) - 1, 0)
        return steps / self.decode_s if self.decode_s > 0 else 0.0


@dataclass
class StopMatcher:
    """Holds back text that might be the start of a stop string, so a stop string is never printed."""

    stops: list[str]
    pending: str = ""
    text: list[str] = field(default_factory=list)

    def feed(self, piece: str) -> tuple[str, bool]:
        """Returns (text safe to emit now, whether a stop string was found)."""
        buf = self.pending + piece
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.pending = ""
            return self._emit(buf[: min(hits)]), True
        keep = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(buf)), keep, -1):
                if buf.endswith(s[:n]):
                    keep = n
                    break
        self.pending = buf[len(buf) - keep :]
        return self._emit(buf[: len(buf) - keep]), False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return self._emit(out)

    def _emit(self, s: str) -> str:
        self.text.append(s)
        return s


class Engine:
    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        placement: Placement,
        max_context: int,
        load_s: float = 0.0,
        *,
        quantize: str = "none",
        compile: bool = False,
        graphs: bool | None = None,
        lookahead: bool | None = None,
    ) -> None:
        """graphs: replay decode steps from CUDA graphs (default: on cuda, unless $MISTRAL_CUDA_GRAPHS is off);
        lookahead: greedy decoding queues each step before reading its token back (default: on cuda)."""
        self.model, self.tokenizer, self.placement = model, tokenizer, placement
        self.quantize = quantize
        self.kernels = any(getattr(m, "kernels", None) or getattr(m, "ops", None) for m in model.modules())
        # on a CPU that could run our kernels but does not (no compiler, a failed build): why, for the banner
        cpu = placement.device.type == "cpu" and not compile
        self.kernel_problem = None if self.kernels or not cpu else kernels.problem()
        self.cfg: ModelConfig = model.cfg
        self.max_context = max_context
        self.load_s = load_s
        # --compile: a static cache of the whole context and one compiled graph for every decode step
        self.cache: KVCache = model.new_cache(max_context, static=compile)
        self._decode = compile_decode(model, self.cache, placement.device) if compile else None
        cuda = placement.device.type == "cuda"
        if graphs is None:
            graphs = cuda and not compile and not switched_off(GRAPHS_ENV)
        self._graph = GraphedDecode(model, self.cache) if graphs else None
        self.lookahead = cuda if lookahead is None else lookahead
        self._reader = TokenReader(placement.device)
        self.tokens: list[int] = []  # the token ids whose keys/values the cache holds, in order

    @property
    def hardware(self) -> str:
        """'cpu bf16 int8, AVX2 kernels, 2 threads' or 'cuda bf16': what --verbose and the chat banner show."""
        parts = [str(self.placement) + ("" if self.quantize == "none" else f" {self.quantize}")]
        if self._graph is not None:
            parts.append("CUDA graphs" if self._graph.problem is None else f"no CUDA graphs ({self._graph.problem})")
        if self.kernels:
            parts.append("AVX2 kernels")
        elif self.kernel_problem:
            parts.append(f"torch kernels ({self.kernel_problem})")
        if self.placement.device.type == "cpu":
            n = torch.get_num_threads()
            parts.append(f"{n} thread{'s' if n != 1 else ''}")
        return ", ".join(parts)

    def reset(self) -> None:
        self.cache.reset()
        self.tokens = []

    def _sync(self) -> None:
        if self.placement.device.type == "cuda":
            torch.cuda.synchronize()

    @torch.inference_mode()
    def prefill(self, prompt: list[int]) -> tuple[torch.Tensor, int]:
        """Bring the cache to exactly `prompt`, feeding only what it lacks; returns last logits and tokens fed."""
        if not prompt:
            raise MistralError("The prompt is empty.")
        if len(prompt) > self.max_context:
            raise MistralError(
                f"The prompt is {len(prompt)} tokens, more than the context of {self.max_context} tokens."
            )
        common = 0
        for a, b in zip(self.tokens, prompt, strict=False):
            if a != b:
                break
            common += 1
        common = min(common, len(prompt) - 1)  # the last prompt token is always fed: its logits are needed
        self.cache.truncate(common)
        self.tokens = self.tokens[:common]
        new = prompt[common:]
        x = torch.tensor([new], dtype=torch.long, device=self.placement.device)
        logits = self.model(x, self.cache, common, last_only=True)[0, -1]
        self.tokens = list(prompt)
        return logits, len(new)

    @torch.inference_mode()
    def _step(self, token: int | torch.Tensor) -> torch.Tensor:
        """Feed one token (an id, or a 0-d tensor on the device) at the end of the sequence; returns its logits
        (V,). Nothing here waits for the device."""
        pos = len(self.tokens)
        if self._graph is not None and self._graph.problem is None:
            return self._graph(token, pos)
        device = self.placement.device
        # made on the device (a fill, not a copy from host memory, which would wait for the device)
        x = token.view(1, 1) if isinstance(token, torch.Tensor) else torch.full((1, 1), token, device=device)
        if self._decode is None:
            return self.model(x, self.cache, pos)[0, -1]
        self.cache.reserve(pos + 1)  # a static cache allocates nothing: this only checks the bound
        logits = self._decode(x, self.cache, torch.full((1,), pos, device=device))
        self.cache.length = pos + 1
        return logits[0, -1]

    def generate(
        self,
        prompt: list[int],
        options: GenerationOptions,
        *,
        leading_space: bool = False,
        on_prefill: Callable[[int], None] | None = None,
    ) -> Iterator[Chunk | Done]:
        """Yield a Chunk per generated token, then one Done. Ctrl-C (KeyboardInterrupt) leaves the cache consistent."""
        sampler = Sampler(options)
        stops = StopMatcher(options.stop)
        stream = self.tokenizer.stream(leading_space=leading_space)
        eos = self.tokenizer.eos_id
        t0 = time.perf_counter()
        logits, fed = self.prefill(prompt)
        if on_prefill:
            on_prefill(fed)
        self._sync()
        t1 = time.perf_counter()
        generated: list[int] = []
        finish = "length"
        limit = options.max_tokens
        # greedy with no penalty: the next step is queued on the argmax's tensor before the token is read back
        ahead = self.lookahead and options.temperature == 0 and options.repeat_penalty == 1.0
        queued: torch.Tensor | None = None
        try:
            while limit is None or len(generated) < limit:
                if ahead:
                    best = logits.argmax()
                    self._reader.start(best)  # its copy to the host is queued before the step
                    # queue the step unless the loop ends after this token whatever it is
                    if len(self.tokens) < self.max_context and (limit is None or len(generated) + 1 < limit):
                        queued = self._step(best)
                    token = self._reader.result()  # waits for the argmax and the copy, not for the queued step
                else:
                    token = sampler(logits, self.tokens)
                if token == eos:
                    finish = "stop"
                    break
                generated.append(token)
                text, hit = stops.feed(stream.push(token))
                yield Chunk(text, token)
                if hit:
                    finish = "stop_sequence"
                    break
                if len(self.tokens) >= self.max_context:
                    finish = "context"
                    break
                if limit is not None and len(generated) >= limit:
                    break
                logits = self._step(token) if queued is None else queued
                queued = None
                self.tokens.append(token)
        finally:
            # a step queued for a token that ended the text (or before Ctrl-C) wrote past the sequence: drop it
            self.cache.truncate(len(self.tokens))
        if finish != "stop_sequence":
            tail = stops.feed(stream.flush())[0] + stops.flush()
            if tail:
                yield Chunk(tail, -1)
        self._sync()
        t2 = time.perf_counter()
        yield Done(
            text="".join(stops.text),
            tokens=generated,
            finish_reason=finish,
            prompt_tokens=len(prompt),
            prefilled_tokens=fed,
            prefill_s=t1 - t0,
            decode_s=t2 - t1,
        )


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
