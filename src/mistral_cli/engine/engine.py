"""The generation engine: a loaded model, its tokenizer and the key/value cache of one sequence.

`Engine.generate` is a Python generator: it prefills the tokens the cache does not already hold, then decodes,
yielding each token's text as it becomes final, and finally a `Done` with the finish reason and timings.
It never prints. The cache is reused across calls: a new prompt that extends the previous sequence (the next turn
of a chat) prefills only its new tokens.

How a step runs is decided once, at construction: on a CPU with our kernels, one call to them for the whole step
(native/decode.py's FusedStep); on a GPU, a replay of a captured CUDA graph, with greedy decoding queuing the next
step before it reads the token back (engine/cuda.py); with --compile, a compiled step over a static cache; else the
model's own forward.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Protocol

import torch

from mistral_cli.engine.cuda import GraphedDecode, TokenReader, compile_decode, graphs_wanted
from mistral_cli.engine.events import Chunk, Done, Reply, TokenLogprob
from mistral_cli.engine.pacing import Pacer
from mistral_cli.engine.sampling import Sampler, check_finite
from mistral_cli.errors import MistralError
from mistral_cli.model.cache import KVCache
from mistral_cli.model.config import ModelConfig
from mistral_cli.model.placement import Placement
from mistral_cli.model.prepared_files import ReadAhead
from mistral_cli.model.transformer import Transformer
from mistral_cli.native import kernels
from mistral_cli.native.decode import FusedStep
from mistral_cli.options import GenerationOptions
from mistral_cli.text.tokenizer import Tokenizer


class Constraint(Protocol):
    """What generation needs of a grammar (engine/grammar.py): which tokens may come next, as a mask on the logits,
    and the tokens that came. End of sequence is allowed by the mask only where the grammar may end."""

    def mask_(self, logits: torch.Tensor) -> None:
        """Set the logits (V,) of every token the grammar does not allow next to -inf, in place."""

    def accept(self, token: int) -> None:
        """Advance past a token the mask allowed."""

    def is_stopped(self) -> bool:
        """Whether nothing may follow: the text is a complete sentence that no token can extend."""

    def is_accepting(self) -> bool:
        """Whether the text so far is a complete sentence of the grammar (it may still go on)."""


# Prompt positions scored at once by `Engine.score`: their float32 logits over the vocabulary (128 KB each) are what
# the pass holds, 64 MB at 512, not 4 GB for a whole 32K prompt.
SCORE_CHUNK = 512

# The most new prompt tokens fed one at a time through the whole-step kernels (FusedStep) rather than as one batch.
# A batch dequantizes every int8/int4 weight into a float GEMM, a fixed cost of several decode steps (more in a fresh
# process, which faults in the buffers): measured per 7B layer (BENCHMARKS.md, "Short prompts"), row by row is
# ahead up to about 32 rows for int4 and 8 for int8. A pipeline's `complete "Hello"` is 2 tokens. int4 and int8 with
# AVX512-VNNI multiply a batch as integers with no dequantizing (int8 up to 48 rows, native/quant.py), and bf16 (the
# only dtype of the whole-step call) reads the weights once for up to 32 rows (our several-rows product, AVX512-BF16
# or AVX2: native/decode.py, BF16_ROWS): all ahead of row by row from 2 rows on.
ROW_BY_ROW = {"int4": 16, "int8": 6, "none": 1, "int4-vnni": 1, "int8-vnni": 1}


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
        fused: FusedStep | None = None,
    ) -> None:
        """graphs: replay decode steps from CUDA graphs (default: cuda.graphs_wanted);
        lookahead: greedy decoding queues each step before reading its token back (default: on cuda);
        fused: a whole decode step in one call to our CPU kernels (native.decode.use_kernels)."""
        self.model, self.tokenizer, self.placement = model, tokenizer, placement
        self.quantize = quantize
        # whether decode steps run on our CPU kernels (some layers at least), and if not on a CPU that could, why
        ops = [k for m in model.modules() if (k := getattr(m, "kernels", None)) is not None]
        self.native = bool(ops)
        self._row_by_row = quantize  # the key of ROW_BY_ROW for short prompts
        if quantize == "int4" and ops and all(k.int4_rows for k in ops):
            self._row_by_row = "int4-vnni"
        elif quantize == "int8" and ops and all(k.int8_rows for k in ops):
            self._row_by_row = "int8-vnni"
        cpu = placement.device.type == "cpu" and not compile
        self.native_problem = None if self.native or not cpu else kernels.problem()
        self._fused = fused
        self.cfg: ModelConfig = model.cfg
        self.max_context = max_context
        self.load_s = load_s
        self.weights_note = "read the checkpoint"  # how load_engine got the weights (--verbose says it)
        self.weights_warning: str | None = None  # why the prepared weights could not be written, if so
        self.reading: ReadAhead | None = None  # the mapped prepared file read into memory ahead, if so
        self.pacer: Pacer | None = None  # on a CPU: the decode threads adapted to the CPU time the steps get
        # --compile: a static cache of the whole context and one compiled graph for every decode step
        self.cache: KVCache = model.new_cache(max_context, static=compile)
        self._decode = compile_decode(model, self.cache, placement.device) if compile else None
        if graphs is None:
            graphs = graphs_wanted(placement.device, compile)
        self.graph = GraphedDecode(model, self.cache) if graphs else None
        self.lookahead = placement.device.type == "cuda" if lookahead is None else lookahead
        self._reader = TokenReader(placement.device)
        self.tokens: list[int] = []  # the token ids whose keys/values the cache holds, in order
        # the last prompt prefilled: its length, whether token by token, and its last position's logits
        self._prompt_logits: tuple[int, bool, torch.Tensor] | None = None

    @property
    def weight_bytes(self) -> int:
        """Bytes of weights a decode step reads (--verbose's GB/s)."""
        return self.model.decode_bytes()

    def reset(self) -> None:
        self.cache.reset()
        self.tokens = []
        self._prompt_logits = None

    def _sync(self) -> None:
        if self.placement.device.type == "cuda":
            torch.cuda.synchronize()

    def cached_prefix(self, prompt: list[int]) -> int:
        """How many leading tokens of `prompt` the cache already holds."""
        common = 0
        for a, b in zip(self.tokens, prompt, strict=False):
            if a != b:
                break
            common += 1
        return common

    @torch.inference_mode()
    def prefill(self, prompt: list[int], token_by_token: bool = False) -> tuple[torch.Tensor, int]:
        """Bring the cache to exactly `prompt`, feeding only what it lacks; returns last logits and tokens fed (none
        when it is the prompt prefilled last, whose logits are kept: the same prompt again gives the same logits).
        token_by_token: through the whole-step kernels whatever its length, each token's arithmetic a decode step's
        (block by block), as the quick path (engine/quick.py) does."""
        if not prompt:
            raise MistralError("The prompt is empty.")
        if len(prompt) > self.max_context:
            raise MistralError(
                f"The prompt is {len(prompt)} tokens, more than the context of {self.max_context} tokens."
            )
        cached = self.cached_prefix(prompt)
        last = self._prompt_logits
        if last is not None and last[:2] == (len(prompt), token_by_token) and cached == len(prompt):
            # the same prompt again (a retry, a repeated request): the logits it had, not those of its last token fed
            # alone, a product path that rounds otherwise than the prompt's and could change a greedy reply
            self.cache.truncate(cached)
            self.tokens = list(prompt)
            return last[2].clone(), 0
        common = min(cached, len(prompt) - 1)  # the last token is always fed: its logits are needed
        self.cache.truncate(common)
        self.tokens = self.tokens[:common]
        new = prompt[common:]
        if self._fused is not None and (token_by_token or len(new) <= ROW_BY_ROW.get(self._row_by_row, 1)):
            logits = self._fused.feed(new, self.cache, common)  # a few rows: decode steps, block by block
        else:
            x = torch.tensor([new], dtype=torch.long, device=self.placement.device)
            logits = self.model(x, self.cache, common, last_only=True)[0, -1]
        self.tokens = list(prompt)
        self._prompt_logits = (len(prompt), token_by_token, logits.clone())
        return logits, len(new)

    @torch.inference_mode()
    def score(self, prompt: list[int], top: int) -> list[TokenLogprob | None]:
        """Each prompt token's log-probability given the tokens before it (None for the first, which has none), with
        the `top` likeliest alternatives; leaves the cache holding the prompt. What `--echo --logprobs` reports."""
        if len(prompt) > self.max_context:
            raise MistralError(
                f"The prompt is {len(prompt)} tokens, more than the context of {self.max_context} tokens."
            )
        self.reset()
        scored: list[TokenLogprob | None] = [None]
        for start in range(0, len(prompt), SCORE_CHUNK):
            chunk = prompt[start : start + SCORE_CHUNK]
            x = torch.tensor([chunk], dtype=torch.long, device=self.placement.device)
            logits = self.model(x, self.cache, start)[0]
            for j, row in enumerate(logits):
                if start + j + 1 < len(prompt):
                    scored.append(self.logprob(row, prompt[start + j + 1], top))
        self.tokens = list(prompt)
        return scored

    def logprob(self, logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
        """`token`'s log-probability under the raw logits (V,) of its position, with the `top` likeliest tokens."""
        lp = torch.log_softmax(logits.float(), dim=-1)
        text = self.tokenizer.token_bytes
        alternatives = []
        if top > 0:
            values, ids = torch.topk(lp, top)
            alternatives = [
                (int(i), text(int(i)), float(v)) for v, i in zip(values.tolist(), ids.tolist(), strict=True)
            ]
        return TokenLogprob(token, text(token), float(lp[token]), alternatives)

    def batches(self) -> bool:
        """Whether several sequences decode faster together than one after another here: one product over all rows
        reads each weight once. Not for int8/int4 on a CPU without AVX512-VNNI, whose multi-row path expands every
        weight to float32 first, nor with --compile's single-row graph (BENCHMARKS.md, "Batch decoding"); with it,
        our kernels multiply the rows as integers and together wins from two sequences on."""
        return not self.expands_quantized_rows and self._decode is None

    @property
    def expands_quantized_rows(self) -> bool:
        """Whether several rows through int8/int4 weights on a CPU go through weights expanded to float (no integer
        multi-row kernel for them here), where a single row never does."""
        cpu_quantized = self.placement.device.type == "cpu" and self.quantize != "none"
        return cpu_quantized and self._row_by_row not in ("int8-vnni", "int4-vnni")

    @torch.inference_mode()
    def generate_many(self, prompts: list[list[int]], options: list[GenerationOptions], *,
                      leading_space: list[bool]) -> list[Done]:  # fmt: skip
        """Several sequences decoded together, each with its own options (seed, sampling, stop strings, limit), as
        `generate` would decode each alone up to float rounding; returns their Done in order. The prompts are
        left-padded to one length in a cache of their own (the padding masked out), then every step feeds one token
        per row, until every row has finished; the engine's own cache and sequence are left as they were. A row's
        padding does not count against its context: a short prompt beside a long one reaches its own end."""
        B, width = len(prompts), max(len(p) for p in prompts)
        # row b's k-th token is sampled once its first k - 1 are in the cache (positions up to width + k - 2), and
        # its last is at most the one that fills its context
        last = [self.max_context - len(p) + 1 for p in prompts]
        last = [n if o.max_tokens is None else min(n, o.max_tokens) for n, o in zip(last, options, strict=True)]
        end = width + max(max(last) - 1, 0)
        if width >= self.max_context:
            raise MistralError(f"A prompt is {width} tokens, more than the context of {self.max_context} tokens.")
        device = self.placement.device
        cache = self.model.new_cache(end, batch=B)
        keys = torch.zeros(B, end, dtype=torch.bool, device=device)
        ids = torch.zeros(B, width, dtype=torch.long, device=device)
        for b, p in enumerate(prompts):
            ids[b, width - len(p) :] = torch.tensor(p, device=device)
            keys[b, width - len(p) : width] = True
            keys[b, : width - len(p)] = False
        # a padding query sees only itself, so no row of the attention is all masked (that would be NaN, and
        # 0 * NaN in the weighted sum would reach the real rows)
        pad = ~keys[:, :width]
        samplers = [Sampler(o) for o in options]
        eos = self.tokenizer.eos_id
        replies = [
            Reply(o, self.tokenizer.stream(leading_space=s), eos, self.max_context)
            for o, s in zip(options, leading_space, strict=True)
        ]
        t0 = time.perf_counter()
        mask = (
            self.model.position_mask(torch.arange(width, device=device), width)[None, None]
            & keys[:, None, None, :width]
        )
        mask |= torch.diag_embed(pad)[:, None]
        logits = self._forward_masked(ids, cache, mask)
        t1 = time.perf_counter()
        pos = width
        while True:
            nxt = []
            for b, reply in enumerate(replies):
                token = 0
                if reply.finish is None:
                    sequence = prompts[b] + reply.tokens
                    token = samplers[b](logits[b], sequence)
                    reply.take(token, len(sequence))
                nxt.append(token)
            if all(reply.finish is not None for reply in replies) or pos >= end:
                break
            keys[:, pos] = True
            step = torch.tensor(nxt, device=device).view(B, 1)
            logits = self.model(step, cache, pos, keys=keys)[:, -1]
            pos += 1
        for reply in replies:
            reply.tail()
        self._sync()
        t2 = time.perf_counter()
        return [
            Done(
                text=reply.text,
                tokens=reply.tokens,
                finish_reason=reply.finish or "length",
                prompt_tokens=len(prompts[b]),
                prefilled_tokens=len(prompts[b]),
                prefill_s=t1 - t0,
                decode_s=t2 - t1,
            )  # fmt: skip
            for b, reply in enumerate(replies)
        ]

    def _forward_masked(self, ids: torch.Tensor, cache: KVCache, mask: torch.Tensor) -> torch.Tensor:
        """The prompts' last logits (B, V) under an explicit (B, 1, T, T) mask, from position 0."""
        B, T = ids.shape
        cache.reserve(T)
        cos, sin = (table[:T] for table in self.model.rope_rows(T, ids.device))
        logits = self.model._run(ids, cache, 0, cos, sin, mask, True)
        cache.length = T
        return logits[:, -1]

    def _step(self, token: int | torch.Tensor) -> torch.Tensor:
        """Feed one token (an id, or a 0-d tensor on the device) at the end of the sequence; returns its logits
        (V,). Nothing here waits for the device. On a CPU the step is timed for the pacer, which may change the
        thread count of the next steps."""
        if self.pacer is None:
            return self._one_step(token)
        began = time.perf_counter()
        logits = self._one_step(token)
        if (threads := self.pacer.note(time.perf_counter() - began)) != torch.get_num_threads():
            torch.set_num_threads(threads)
        return logits

    @torch.inference_mode()
    def _one_step(self, token: int | torch.Tensor) -> torch.Tensor:
        pos = len(self.tokens)
        if self._fused is not None:
            return self._fused(int(token), self.cache, pos)
        if self.graph is not None and self.graph.problem is None:
            return self.graph(token, pos)
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
        constraint: Constraint | None = None,
        logprobs: int | None = None,
        prompt_logprobs: bool = False,
        token_by_token: bool = False,
    ) -> Iterator[Chunk | Done]:
        """Yield a Chunk per generated token, then one Done. Ctrl-C (KeyboardInterrupt) leaves the cache consistent.

        constraint: only tokens the grammar allows are sampled, and the text ends where the grammar says it is
        complete; logprobs: each Chunk carries its token's log-probability and this many alternatives (0-20);
        prompt_logprobs: the Done also scores the prompt's tokens (the whole prompt is fed again);
        token_by_token: the prompt goes through the whole-step kernels a token at a time, as `mistral complete`'s
        quick path feeds it, so that a short prompt gives the same reply on both paths."""
        sampler = Sampler(options)
        reply = Reply(
            options, self.tokenizer.stream(leading_space=leading_space), self.tokenizer.eos_id, self.max_context
        )
        if self.pacer is not None and (threads := self.pacer.begin()) != torch.get_num_threads():
            torch.set_num_threads(threads)  # a new reply starts with the load's count (engine/pacing.py)
        t0 = time.perf_counter()
        scored = self.score(prompt, logprobs or 0) if prompt_logprobs else None
        logits, fed = self.prefill(prompt, token_by_token)
        if scored is not None:
            fed = len(prompt)
        check_finite(logits)  # once: the greedy steps queued ahead do not go through the sampler
        if on_prefill:
            on_prefill(fed)
        self._sync()
        t1 = time.perf_counter()
        limit = options.max_tokens
        # greedy with no penalty: the next step is queued on the argmax's tensor before the token is read back (which
        # a mask or log-probabilities, computed on these logits before the next step overwrites them, rule out)
        ahead = self.lookahead and options.temperature == 0 and options.repeat_penalty == 1.0
        ahead = ahead and constraint is None and logprobs is None
        queued: torch.Tensor | None = None
        scores: list[TokenLogprob] | None = [] if logprobs is not None else None
        scored_token: TokenLogprob | None = None
        try:
            while reply.finish is None:
                if ahead:
                    best = logits.argmax()
                    self._reader.start(best)  # its copy to the host is queued before the step
                    # queue the step unless the loop ends after this token whatever it is
                    if len(self.tokens) < self.max_context and (limit is None or len(reply.tokens) + 1 < limit):
                        queued = self._step(best)
                    token = self._reader.result()  # waits for the argmax and the copy, not for the queued step
                else:
                    raw = logits
                    if constraint is not None:
                        check_finite(raw)
                        logits = raw.float().clone()
                        constraint.mask_(logits)
                    token = sampler(logits, self.tokens, masked=constraint is not None)
                    if scores is not None:
                        scored_token = self.logprob(raw, token, logprobs or 0)
                text = reply.take(token, len(self.tokens))
                if text is None:
                    break
                if scored_token is not None and scores is not None:
                    scores.append(scored_token)
                yield Chunk(text, token, scored_token)
                if constraint is not None:
                    constraint.accept(token)
                    if constraint.is_stopped():  # the grammar's sentence is complete: that ends it, whatever else
                        reply.finish = "stop"
                if reply.finish is not None:
                    break
                logits = self._step(token) if queued is None else queued
                queued = None
                self.tokens.append(token)
        finally:
            # a step queued for a token that ended the text (or before Ctrl-C) wrote past the sequence: drop it
            self.cache.truncate(len(self.tokens))
        tail = reply.tail()
        if tail:
            yield Chunk(tail, -1)
        self._sync()
        t2 = time.perf_counter()
        yield Done(
            text=reply.text,
            tokens=reply.tokens,
            finish_reason=reply.finish or "length",
            prompt_tokens=len(prompt),
            prefilled_tokens=fed,
            prefill_s=t1 - t0,
            decode_s=t2 - t1,
            logprobs=scores,
            prompt_logprobs=scored,
            grammar_complete=None if constraint is None else constraint.is_accepting(),
        )
