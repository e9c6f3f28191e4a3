"""The quick path of `mistral complete`: a short prompt answered from prepared weights without importing torch.

A pipeline runs `mistral complete` once per call, and half of a warm call used to be starting torch (1.3-2 s on a
small machine) for a step that is one call to our C library anyway. Here the prepared file (engine/prepared.py) is
mapped with the C library's mmap, its tensors located from the safetensors header, and every token (prompt and
reply) runs through kernels.c's whole-step code, sampled by mc_sample: the same calls the full path makes for its
decode steps, so a reply is what the full path gives up to float rounding in the prompt (the full path multiplies a
prompt of several tokens as one batch), and the same where it too feeds the prompt a token at a time. The prompt goes
block by block (mc_decode_tokens: each token's arithmetic a decode step's, each block's weights read once), and the
file is read ahead in the order the pass uses it, so that on a cold call the disk keeps reading while the prompt's
tokens are computed.

`open_quick` says why not, in a phrase for --verbose, whenever anything is not as the quick path needs it (no
prepared file yet, a GPU, a dtype other than bf16, a layer our kernels do not take, a file it cannot read, ...);
the command then takes the full path, which reports real errors in its own words. Prompts longer than
QUICK_PROMPT tokens take the full path too: there a batch reads the weights once for many tokens.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mistral_cli.engine.events import Chunk, Done, Reply
from mistral_cli.engine.pacing import Pacer
from mistral_cli.engine.sampling import Sampler
from mistral_cli.errors import MistralError
from mistral_cli.hardware import (
    QUICK_ENV,
    adaptive_threads,
    default_threads,
    dtype_name,
    gpu_present,
    shared_threads,
    switched_off,
    torch_vector_halves,
)  # fmt: skip
from mistral_cli.model.config import ModelConfig
from mistral_cli.model.files import weight_paths
from mistral_cli.model.layout import INT4_GROUP, int4_superblock
from mistral_cli.model.prepared_files import (
    POPULATE,
    PREPARE_ENV,
    ROPE,
    describe,
    file_for,
    libc,
    map_shared,
    read_ahead,
    reading_order,
)
from mistral_cli.model.safetensors import Entry, read_header
from mistral_cli.native import library
from mistral_cli.options import GenerationOptions, LoadOptions
from mistral_cli.text.tokenizer import Tokenizer

# The longest prompt (in tokens) the quick path feeds one token at a time: past it the full path's batch, which reads
# the weights once for the whole prompt, more than makes up for starting torch (measured on the 7B shape,
# BENCHMARKS.md "Start-up").
QUICK_PROMPT = {"int4": 16, "int8": 10, "none": 4}
FIRST_ROOM = 512  # positions of key/value cache first reserved for a reply of no set length (then doubled)
LINEARS = ("attention.wqkv", "attention.wo", "feed_forward.w13", "feed_forward.w2")


class NotQuick(Exception):
    """Why the quick path does not take this run (a phrase for --verbose)."""


def torch_version() -> str:
    """The installed torch's version, as `torch.__version__` gives it, read from its package files without importing
    it: a prepared file's key holds it."""
    from importlib.util import find_spec

    spec = find_spec("torch")
    origin = Path(spec.origin) if spec is not None and spec.origin else None
    if origin is None:
        raise NotQuick("torch is not installed")
    try:
        for line in (origin.parent / "version.py").read_text(encoding="utf-8").splitlines():
            if line.startswith("__version__"):
                return str(line.split("=", 1)[1].strip().strip("'\""))
    except OSError:
        pass
    raise NotQuick("torch's version could not be read")


@dataclass
class _Tensors:
    """The mapped prepared file: its tensors' addresses and header entries."""

    base: int
    entries: dict[str, Entry]
    size: int  # the file's bytes

    def at(self, name: str, dtype: str, shape: tuple[int, ...]) -> int:
        e = self.entries.get(name)
        if e is None or e.dtype != dtype or e.shape != shape:
            got = "missing" if e is None else f"{e.dtype} {e.shape}"
            raise NotQuick(f"the prepared file's {name} is {got}, not {dtype} {shape}")
        return self.base + e.begin


class QuickEngine:
    """What `mistral complete` needs of an engine (engine.Engine), on the mapped prepared weights and the C library:
    `tokenizer`, `max_context`, `load_s`, `weights_note`, `generate`."""

    def __init__(self, folder: Path, options: LoadOptions) -> None:
        t0 = time.perf_counter()
        if switched_off(QUICK_ENV):
            raise NotQuick(f"{QUICK_ENV}=off")
        if not options.prepare or switched_off(PREPARE_ENV):
            raise NotQuick("prepared weights are off")
        if options.compile or options.device not in ("auto", "cpu") or (options.device == "auto" and gpu_present()):
            raise NotQuick("not on the CPU alone")
        halves = torch_vector_halves()
        if halves is None:
            raise NotQuick("ATEN_CPU_CAPABILITY is set")
        cfg = ModelConfig.from_folder(folder)
        tokenizer = Tokenizer(folder / "tokenizer.model")
        if cfg.vocab_problem(tokenizer.vocab_size, tokenizer.path) or cfg.context_problem(options.max_context):
            raise NotQuick("the model does not load as it is")
        if dtype_name(options.dtype, "cpu", cfg.n_params) != "bf16":
            raise NotQuick("the dtype is not bf16")
        loaded = library.library()
        if loaded is None:
            raise NotQuick(f"our kernels: {library.status()}")
        self.lib, self.features = loaded[0], int(loaded[0].mc_features())
        made_of = describe(weight_paths(folder), cfg, "BF16", options.quantize, "ours-cpu", torch_version())
        self.path = file_for(made_of)
        if not self.path.is_file():
            raise NotQuick("no prepared weights yet")
        tensors, meta = _map(self.path)
        if meta.get("config") != cfg.to_dict() or meta.get("made_of") != made_of:
            raise NotQuick("the prepared file is not the one for this model")
        self.cfg, self.tokenizer, self.halves, self.folder = cfg, tokenizer, halves, folder
        self.model = _model(cfg, tensors, meta.get("modules", {}))
        self.context = options.max_context or cfg.max_context
        self.max_context = self.context
        self.rope = tuple(tensors.at(n, "BF16", (tensors.entries[ROPE[0]].shape[0], 1, cfg.head_dim)) for n in ROPE)
        if tensors.entries[ROPE[0]].shape[0] < self.context:
            raise NotQuick("the prepared RoPE tables are shorter than the context")
        self.weight_bytes = sum(
            e.nbytes for n, e in tensors.entries.items()
            if not n.startswith(("tok_embeddings.", "__padding_")) and n not in ROPE
        )  # fmt: skip
        self.threads = options.threads or shared_threads(default_threads())
        most = adaptive_threads(options.threads)
        self.pacer = Pacer(most, self.threads) if most is not None else None
        self.kernels_label = library.label(self.features)
        self._keep = tensors  # the mapping stays for the process's life
        self.reading = read_ahead(lambda offset, n: libc().madvise(tensors.base + offset, n, POPULATE),
                                  reading_order(tensors.entries.values()), tensors.size)  # fmt: skip
        self.load_s = time.perf_counter() - t0
        self.weights_note = f"mapped the prepared weights in {self.path}; quick path: no torch"

    def generate(self, prompt: list[int], options: GenerationOptions, *, leading_space: bool = False,
                 **unused: Any) -> Iterator[Chunk | Done]:  # fmt: skip
        """Engine.generate for a run with no grammar and no log-probabilities: a Chunk per token, then a Done."""
        if not prompt or len(prompt) >= self.context:
            raise MistralError(f"The prompt is {len(prompt)} tokens, more than the context of {self.context} tokens.")
        cfg, V = self.cfg, self.cfg.vocab_size
        limit = options.max_tokens
        cache = _Cache(cfg, min(self.context, len(prompt) + (limit if limit is not None else FIRST_ROOM)))
        logits = (ctypes.c_float * V)()
        D, row = cfg.head_dim, ctypes.addressof(logits)

        def known(token: int) -> int:
            if not 0 <= token < V:
                raise MistralError(f"token id {token} is not in the vocabulary of {V}")
            return token

        def step(token: int, pos: int) -> None:
            if pos >= cache.capacity:
                cache.grow(min(self.context, 2 * cache.capacity), pos)
            start = max(0, pos + 1 - cfg.sliding_window) if cfg.sliding_window else 0
            library.check(self.lib.mc_decode_token(
                ctypes.byref(self.model.struct), known(token), cache.keys, cache.values, cache.capacity * D,
                self.rope[0] + 2 * pos * D, self.rope[1] + 2 * pos * D, pos, start, self.halves, row, self.threads,
            ))  # fmt: skip

        sampler = Sampler(options)
        reply = Reply(options, self.tokenizer.stream(leading_space=leading_space), self.tokenizer.eos_id, self.context)
        if self.pacer is not None:
            self.threads = self.pacer.begin()  # a new reply starts with the load's count (engine/pacing.py)
        t0 = time.perf_counter()
        library.check(self.lib.mc_decode_tokens(  # the prompt block by block
            ctypes.byref(self.model.struct), (ctypes.c_int64 * len(prompt))(*map(known, prompt)), len(prompt), cache.keys,
            cache.values, cache.capacity * D, self.rope[0], self.rope[1], 0, cfg.sliding_window or 0, self.halves, row,
            self.threads,
        ))  # fmt: skip
        t1 = time.perf_counter()
        tokens = list(prompt)
        while reply.finish is None:
            token = sampler.pick(row, V, tokens)
            text = reply.take(token, len(tokens))
            if text is not None:
                yield Chunk(text, token)
            if reply.finish is None:
                began = time.perf_counter()
                step(token, len(tokens))
                if self.pacer is not None:
                    self.threads = self.pacer.note(time.perf_counter() - began)
                tokens.append(token)
        tail = reply.tail()
        if tail:
            yield Chunk(tail, -1)
        t2 = time.perf_counter()
        yield Done(
            text=reply.text, tokens=reply.tokens, finish_reason=reply.finish or "length", prompt_tokens=len(prompt),
            prefilled_tokens=len(prompt), prefill_s=t1 - t0, decode_s=t2 - t1,
        )  # fmt: skip


class _Cache:
    """The keys and values of every layer, (KV heads, capacity, D) bf16 each, as mc_decode_token reads them, in
    anonymous memory; grown by doubling (the positions so far copied), so a short reply reserves no whole context."""

    def __init__(self, cfg: ModelConfig, capacity: int) -> None:
        self.cfg, self.capacity, self.base = cfg, 0, 0
        self.grow(capacity, 0)

    def grow(self, capacity: int, length: int) -> None:
        """Room for `capacity` positions, keeping the first `length`."""
        cfg, row = self.cfg, self.cfg.head_dim * 2
        span = cfg.n_kv_heads * capacity * row  # bytes of one layer's keys (or values)
        try:
            buffer = mmap.mmap(-1, 2 * cfg.n_layers * span, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        except OSError as e:
            raise MistralError(
                f"There is not enough memory for a key/value cache of {capacity:,} positions ({e.strerror}); "
                "lower --max-context or --max-tokens."
            ) from None
        anchor = ctypes.c_char.from_buffer(buffer)
        base = ctypes.addressof(anchor)
        old = cfg.n_kv_heads * self.capacity * row
        for i in range(2 * cfg.n_layers if length else 0):  # each head's positions so far, where they now go
            for h in range(cfg.n_kv_heads):
                ctypes.memmove(base + i * span + h * capacity * row, self.base + i * old + h * self.capacity * row,
                               length * row)  # fmt: skip
        pointers = ctypes.c_void_p * cfg.n_layers
        self.keys = pointers(*(base + 2 * layer * span for layer in range(cfg.n_layers)))
        self.values = pointers(*(base + (2 * layer + 1) * span for layer in range(cfg.n_layers)))
        # the old buffer goes (unmapped) with its anchor, once nothing points into it
        self.buffer, self.anchor, self.base, self.capacity = buffer, anchor, base, capacity


def open_quick(folder: Path, options: LoadOptions) -> QuickEngine | str:
    """The quick engine for a model folder, or why the full path takes this run."""
    try:
        return QuickEngine(folder, options)
    except NotQuick as e:
        return str(e)
    except Exception as e:  # noqa: BLE001  (a file or folder it cannot read: the full path checks it and says so)
        return f"{type(e).__name__}: {e}"


def _map(path: Path) -> tuple[_Tensors, dict[str, Any]]:
    """The prepared file mapped read-only and shared (the page cache's copy, as the full path maps it), its header
    checked against the file."""
    with open(path, "rb") as f:
        entries = read_header(f, path)
        f.seek(0)
        length = int.from_bytes(f.read(8), "little")
        meta = json.loads(json.loads(f.read(length))["__metadata__"]["mistral-cli"])
        size = os.fstat(f.fileno()).st_size
        base = map_shared(f.fileno(), size)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        libc().madvise(base, size, mmap.MADV_HUGEPAGE)  # 2 MiB pages where the filesystem can: fewer TLB misses
    return _Tensors(base, {e.name: e for e in entries}, size), meta


@dataclass
class _Model:
    struct: library.Model
    table: Any  # the layers' array, which struct points to


def _model(cfg: ModelConfig, t: _Tensors, modules: dict[str, Any]) -> _Model:
    """kernels.c's mc_model over the mapped tensors, each checked for the dtype and shape the C code reads."""
    dim, hidden, H, KV, D = cfg.dim, cfg.hidden_dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    shapes = {"attention.wqkv": ((H + 2 * KV) * D, dim), "attention.wo": (dim, H * D),
              "feed_forward.w13": (2 * hidden, dim), "feed_forward.w2": (dim, hidden)}  # fmt: skip
    if not library.step_fits(dim, hidden, H, KV, D, [{n.split(".")[1]: s for n, s in shapes.items()}]):
        raise NotQuick("our whole-step kernel does not take this model's shape")

    def linear(name: str, N: int, K: int) -> library.Linear:
        cls = modules.get(name, {}).get("class")
        if cls is None:
            return library.Linear(0, N, K, 0, t.at(f"{name}.weight", "BF16", (N, K)), None)
        if cls == "NativeInt8Linear" and K % 32 == 0:
            w = t.at(f"{name}.weight", "I8", (N, K))
            return library.Linear(1, N, K, 0, w, t.at(f"{name}.scales", "F32", (N,)))
        if cls == "NativeInt4Linear" and K % INT4_GROUP == 0 and N % 4 == 0:
            S = int4_superblock(K)
            w = t.at(f"{name}.weight", "U8", (N, K // 2))
            s = t.at(f"{name}.scales_and_lows", "U8", (N // 4, K // S, 16 + 16 * S // INT4_GROUP))
            return library.Linear(2, N, K, S, w, s)
        raise NotQuick(f"the layer {name} ({cls}) is not one our kernels take")

    table = (library.Layer * cfg.n_layers)()
    for i, row in enumerate(table):
        row.attention_norm = t.at(f"layers.{i}.attention_norm.weight", "BF16", (dim,))
        row.ffn_norm = t.at(f"layers.{i}.ffn_norm.weight", "BF16", (dim,))
        for full, (N, K) in shapes.items():
            setattr(row, full.split(".")[1], linear(f"layers.{i}.{full}", N, K))
    struct = library.Model(
        t.at("tok_embeddings.weight", "BF16", (cfg.vocab_size, dim)), table, cfg.n_layers, dim, H, KV, D, hidden,
        cfg.norm_eps, D**-0.5, t.at("norm.weight", "BF16", (dim,)), linear("output", cfg.vocab_size, dim),
    )  # fmt: skip
    return _Model(struct, table)
