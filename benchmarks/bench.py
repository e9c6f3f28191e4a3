"""Benchmark: our engine against transformers' `generate` on the same random-weight Mistral-shaped checkpoint.

    python benchmarks/bench.py --shape small --dtype fp32 bf16 --quantize none int8 int4
    python benchmarks/bench.py --shape 7b --dtype bf16 --prompt 128 --decode 16 --repeats 2
    python benchmarks/bench.py --device cuda --shape 7b --dtype bf16 --quantize none --decode 256 \
        --engines ours ours+graphs ours+sync transformers ours+compile

The checkpoint is written once, in bf16 safetensors with an HF config and the v1 tokenizer (from mistral-common),
into a temporary folder, by the tests' writer (tests/checkpoints.py). Each engine and setting then runs in its own
subprocess, one after another, so a peak memory figure belongs to one run and a 7B model is in memory only once at a
time. Per run: load time, peak resident memory (VmHWM) after loading and overall, time to first token, prefill and
decode tokens/s, and the bytes of weights one decode step reads, as GB/s and as a fraction of the read bandwidth
measured here (a float32 sum over a 1 GiB buffer). Quantization's accuracy cost is each quantized run's logits
against the unquantized run of the same dtype, teacher-forced over the first prompt tokens (our engine feeds them
one decode step at a time, the path and the kernels that generation takes). `ours+torch` is our engine on torch's
CPU kernels instead of our own, to show what they bring. Each run times `--repeats` generations and keeps the best
of each figure, since other work on the machine only ever slows a run down.

With `--device cuda` every engine runs on the GPU: the bandwidth is a sum over a buffer in GPU memory, the memory
columns are the GPU's (torch's peak allocation), and the random weights are drawn on the GPU (fast, and different
numbers from a CPU run's). `ours+graphs` is our engine with CUDA graphs, `ours+sync` without queuing the next
step before the token is read back: what each brings.

Needs the test extras (transformers, mistral-common). llama.cpp (`--engines llama.cpp`) needs llama-cpp-python and
a llama.cpp checkout for its converter (`--llama-cpp-convert .../convert_hf_to_gguf.py`); it runs F32/BF16 files
from that converter and Q8_0/Q4_0 files quantized from the BF16 one, for our fp32/bf16, int8 and int4 rows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# the random checkpoint: the tests' writer (the benchmark runs from a clone, where tests/ lies beside benchmarks/)
# before torch starts: its large buffers (weights, caches) on 2 MiB pages, as `mistral` runs (cli/app.py huge_pages)
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from checkpoints import SHAPES, VOCAB, n_params, write_checkpoint  # noqa: E402


@dataclass
class RunSpec:
    engine: str  # "ours" | "ours+torch" | "ours+compile" | "ours+graphs" | "ours+sync" | "transformers" | "llama.cpp"
    folder: str
    dtype: str  # "fp32" | "bf16"
    quantize: str = "none"
    prompt: int = 512
    decode: int = 32
    threads: int | None = None
    repeats: int = 1  # timed generations; the best of each figure is kept
    accuracy_tokens: int = 0  # teacher-forced logits over this many prompt tokens, saved to logits_path
    logits_path: str = ""
    gguf: str = ""  # llama.cpp runs: the GGUF file
    weight_bytes: int = 0  # llama.cpp runs: bytes of the GGUF's tensors but the embedding table
    device: str = "cpu"  # "cpu" | "cuda"


@dataclass
class RunResult:
    engine: str
    dtype: str
    quantize: str
    load_s: float
    load_peak_gb: float  # VmHWM right after loading
    peak_gb: float  # VmHWM at the end of the timed generation
    ttft_s: float
    prefill_tok_s: float
    decode_tok_s: float
    weight_gb: float  # bytes one decode step reads: every weight but the embedding table (one row of it per token)
    threads: int
    tokens: list[int] = field(default_factory=list)
    error: str = ""


# --- llama.cpp's files ---------------------------------------------------------------------------------------------

LLAMA_TYPES = {("fp32", "none"): "f32", ("bf16", "none"): "bf16", ("bf16", "int8"): "q8_0", ("bf16", "int4"): "q4_0"}


def write_ggufs(
    folder: Path, work: Path, converter: Path, wanted: list[tuple[str, str]]
) -> dict[tuple[str, str], Path]:
    """llama.cpp's own converter writes F32/BF16 GGUF files; Q8_0 and Q4_0 are quantized from the BF16 one.

    Files already in `work` are reused (with --model-dir they are kept beside the checkpoint)."""

    def convert(kind: str) -> Path:
        path = work / f"model-{kind}.gguf"
        if not path.is_file():
            cmd = [sys.executable, str(converter), str(folder), "--outtype", kind, "--outfile", str(path)]
            subprocess.run(cmd, check=True, capture_output=True)
        return path

    def quantize(kind: str) -> Path:
        path = work / f"model-{kind}.gguf"
        if not path.is_file():
            src = convert("bf16")
            # in a child process: llama.cpp logs every tensor on the C stderr, which a parent cannot silence
            code = (
                "import sys, llama_cpp as l; p = l.llama_model_quantize_default_params(); "
                f"p.ftype = l.LLAMA_FTYPE_MOSTLY_{kind.upper()}; "
                "sys.exit(l.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p))"
            )
            subprocess.run([sys.executable, "-c", code, str(src), str(path)], check=True, capture_output=True)
        return path

    return {
        (dtype, q): convert(kind) if q == "none" else quantize(kind)
        for dtype, q in wanted
        if (kind := LLAMA_TYPES.get((dtype, q)))
    }


def gguf_weight_bytes(path: Path, converter: Path) -> int:
    """Bytes of every tensor but the embedding table, read from the GGUF header with llama.cpp's gguf-py."""
    sys.path.insert(0, str(converter.parent / "gguf-py"))
    from gguf import GGUFReader

    return sum(int(t.n_bytes) for t in GGUFReader(path).tensors if t.name != "token_embd.weight")


# --- measurements --------------------------------------------------------------------------------------------------


def read_bandwidth_gbs(gib: float = 1.0, repeats: int = 5, device: str = "cpu") -> float:
    """Best of a few float32 sums over a buffer far larger than the caches (all threads, or the GPU): GB/s read."""
    import torch

    buf = torch.ones(int(gib * 2**30) // 4, device=device)
    buf.sum()  # first touch of the pages out of the timing
    best = min(_timed(buf.sum, device) for _ in range(repeats))
    gbs = buf.numel() * 4 / best / 1e9
    del buf
    if device == "cuda":
        torch.cuda.empty_cache()  # the runs are child processes: leave them the GPU's memory
    return gbs


def _timed(fn: Any, device: str = "cpu") -> float:
    import torch

    sync = torch.cuda.synchronize if device == "cuda" else lambda: None
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t


def peak_memory_gb(device: str) -> float:
    """Host: the process's resident high-water mark; cuda: torch's peak allocation on the GPU."""
    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 1e9
    return peak_rss_gb()


def peak_rss_gb() -> float:
    """The process's resident-memory high-water mark (VmHWM)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / 1e9 if sys.platform == "darwin" else rss * 1024 / 1e9


def prompt_ids(n: int, seed: int = 1) -> list[int]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return [1, *torch.randint(3, VOCAB, (n - 1,), generator=g).tolist()]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30 if hasattr(os, "sysconf") else 0
    return f"{cpu}, {os.cpu_count()} logical CPUs, {mem:.0f} GiB RAM, {platform.system()} {platform.release()}"


def best_of(repeats: int, timed_run: Any) -> tuple[float, float, float, list[int]]:
    """Run `timed_run() -> (ttft_s, prefill tok/s, decode tok/s, tokens)` and keep the best of each figure: other
    work on a shared machine only ever makes a run slower."""
    runs = [timed_run() for _ in range(max(1, repeats))]
    return min(r[0] for r in runs), max(r[1] for r in runs), max(r[2] for r in runs), runs[-1][3]


# --- the runs (each in its own process) ----------------------------------------------------------------------------


def measured(
    spec: RunSpec, timed_run: Any, *, load_s: float, load_peak: float, weight_bytes: int, threads: int, **names: str
) -> RunResult:
    """Time the best of spec.repeats runs of `timed_run` and fill in a result; `names` overrides engine/quantize."""
    ttft, prefill, decode, tokens = best_of(spec.repeats, timed_run)
    return RunResult(
        engine=names.get("engine", spec.engine),
        dtype=spec.dtype,
        quantize=names.get("quantize", spec.quantize),
        load_s=load_s,
        load_peak_gb=load_peak,
        peak_gb=peak_memory_gb(spec.device),
        ttft_s=ttft,
        prefill_tok_s=prefill,
        decode_tok_s=decode,
        weight_gb=weight_bytes / 1e9,
        threads=threads,
        tokens=tokens,
    )


def run_ours(spec: RunSpec) -> RunResult:
    import torch

    from mistral_cli.engine.engine import Chunk, Done
    from mistral_cli.engine.load import load_engine
    from mistral_cli.options import GenerationOptions, LoadOptions

    t = time.perf_counter()
    options = LoadOptions(
        device=spec.device,
        dtype=spec.dtype,
        quantize=spec.quantize,
        max_context=spec.prompt + spec.decode + 8,
        compile=spec.engine == "ours+compile",
    )
    engine = load_engine(Path(spec.folder), options)
    if spec.engine == "ours+sync":
        engine.lookahead = False  # read each token back before queuing the next step
    load_s = time.perf_counter() - t
    load_peak = peak_memory_gb(spec.device)
    model = engine.model
    weight_bytes = model.decode_bytes()
    prompt = prompt_ids(spec.prompt)
    greedy = GenerationOptions(temperature=0, max_tokens=spec.decode)
    t = time.perf_counter()
    for _ in engine.generate(prompt[:8], GenerationOptions(temperature=0, max_tokens=2)):
        pass  # warm-up: thread pool and allocator, out of the timing
    if spec.engine == "ours+compile":
        load_s += time.perf_counter() - t  # compilation happens here, at the first decode step

    def timed_run() -> tuple[float, float, float, list[int]]:
        engine.reset()
        t0 = time.perf_counter()
        ttft = 0.0
        for event in engine.generate(prompt, greedy):
            if isinstance(event, Chunk) and not ttft:
                ttft = time.perf_counter() - t0
            elif isinstance(event, Done):
                done = event
        return ttft, done.prefill_tokens_per_s, done.decode_tokens_per_s, done.tokens

    result = measured(
        spec, timed_run, load_s=load_s, load_peak=load_peak, weight_bytes=weight_bytes, threads=torch.get_num_threads()
    )
    if spec.accuracy_tokens:  # one decode step per position: the path (and kernels) that generation takes
        x = torch.tensor([prompt[: spec.accuracy_tokens]], device=spec.device)
        cache = model.new_cache(spec.accuracy_tokens)
        with torch.inference_mode():
            logits = torch.cat([model(x[:, i : i + 1], cache)[0] for i in range(x.shape[1])])
        torch.save(logits.float().cpu(), spec.logits_path)
    return result


class _TokenTimes:
    """A transformers streamer that only notes when each generated token arrives."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.tokens: list[int] = []
        self._prompt_seen = False

    def put(self, value: Any) -> None:
        if not self._prompt_seen:  # generate() first puts the prompt
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())
        self.tokens.extend(int(v) for v in value.reshape(-1).tolist())

    def end(self) -> None:
        pass


def run_transformers(spec: RunSpec) -> RunResult:
    import torch
    from transformers import MistralForCausalLM

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[spec.dtype]
    t = time.perf_counter()
    placed = {"device_map": spec.device} if spec.device != "cpu" else {}  # straight onto the GPU
    model = MistralForCausalLM.from_pretrained(spec.folder, dtype=dtype, **placed).eval()
    if spec.device == "cuda":
        torch.cuda.synchronize()
    load_s = time.perf_counter() - t
    load_peak = peak_memory_gb(spec.device)
    prompt = torch.tensor([prompt_ids(spec.prompt)], device=spec.device)
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None, temperature=None, top_p=None, top_k=None)
    with torch.inference_mode():
        model.generate(prompt[:, :8], max_new_tokens=2, **kw)  # warm-up, as for ours

    def timed_run() -> tuple[float, float, float, list[int]]:
        timer = _TokenTimes()
        with torch.inference_mode():
            t0 = time.perf_counter()
            model.generate(prompt, max_new_tokens=spec.decode, streamer=timer, **kw)
        ttft = timer.times[0] - t0
        steps = len(timer.times) - 1
        decode = steps / (timer.times[-1] - timer.times[0]) if steps > 0 else 0.0
        return ttft, spec.prompt / ttft, decode, timer.tokens  # the first token's time is mostly the prefill

    weights = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "embed_tokens" not in n)
    result = measured(
        spec,
        timed_run,
        load_s=load_s,
        load_peak=load_peak,
        weight_bytes=weights,
        threads=torch.get_num_threads(),
        engine="transformers",
        quantize="none",
    )
    if spec.accuracy_tokens:
        with torch.inference_mode():
            logits = model(prompt[:, : spec.accuracy_tokens]).logits[0]
        torch.save(logits.float().cpu(), spec.logits_path)
    return result


def run_llama_cpp(spec: RunSpec) -> RunResult:
    import llama_cpp
    import numpy as np

    threads = spec.threads or len(os.sched_getaffinity(0))
    t = time.perf_counter()
    # no mmap: the weights are read into memory at load, as the other engines do, so load time and memory compare
    llm = llama_cpp.Llama(
        spec.gguf,
        n_ctx=spec.prompt + spec.decode + 8,
        n_batch=512,
        n_threads=threads,
        n_threads_batch=threads,
        use_mmap=False,
        verbose=False,
    )
    load_s = time.perf_counter() - t
    load_peak = peak_rss_gb()
    prompt = prompt_ids(spec.prompt)

    def last_logits() -> np.ndarray:  # llama-cpp-python keeps logits only with logits_all: read the context's
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))

    llm.eval(prompt[:8])  # warm-up, as for the others

    def timed_run() -> tuple[float, float, float, list[int]]:
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        tokens = [int(last_logits().argmax())]
        ttft = time.perf_counter() - t0
        t1 = time.perf_counter()
        while len(tokens) < spec.decode:
            llm.eval([tokens[-1]])
            tokens.append(int(last_logits().argmax()))
        decode_s = time.perf_counter() - t1
        return ttft, spec.prompt / ttft, (len(tokens) - 1) / decode_s if decode_s > 0 else 0.0, tokens

    result = measured(
        spec, timed_run, load_s=load_s, load_peak=load_peak, weight_bytes=spec.weight_bytes, threads=threads
    )
    if spec.accuracy_tokens:
        llm.reset()
        rows = []
        for tok in prompt[: spec.accuracy_tokens]:  # one position at a time: logits_all would need a second model
            llm.eval([tok])
            rows.append(last_logits().copy())
        import torch

        torch.save(torch.from_numpy(np.stack(rows)).float(), spec.logits_path)
    return result


def worker(spec: RunSpec) -> None:
    if spec.engine == "ours+torch":
        os.environ["MISTRAL_KERNELS"] = "off"  # our engine on torch's CPU kernels
    if spec.engine == "ours+graphs":
        os.environ["MISTRAL_CUDA_GRAPHS"] = "on"  # our engine replaying decode steps from CUDA graphs
    if spec.threads:
        import torch

        torch.set_num_threads(spec.threads)
    run = {"transformers": run_transformers, "llama.cpp": run_llama_cpp}.get(spec.engine, run_ours)
    print("RESULT " + json.dumps(asdict(run(spec))), flush=True)


def spawn(spec: RunSpec, timeout: float | None) -> RunResult:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(asdict(spec))]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return _failed(spec, f"timed out after {timeout:.0f} s")
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return RunResult(**json.loads(line[len("RESULT ") :]))
    tail = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
    return _failed(spec, tail[:300])


def _failed(spec: RunSpec, error: str) -> RunResult:
    return RunResult(spec.engine, spec.dtype, spec.quantize, 0, 0, 0, 0, 0, 0, 0, spec.threads or 0, error=error)


# --- the report ----------------------------------------------------------------------------------------------------


def accuracy(ref_path: Path, path: Path) -> dict[str, float]:
    """Logit error and top-1 agreement of one run's teacher-forced logits against a reference run's."""
    import torch

    ref, got = torch.load(ref_path), torch.load(path)
    diff = got - ref
    return {
        "max_abs_logit_err": float(diff.abs().max()),
        "rel_rms_logit_err": float(diff.norm() / ref.norm()),
        "top1_agreement": float((got.argmax(-1) == ref.argmax(-1)).float().mean()),
        "positions": int(ref.shape[0]),
    }


def markdown(report: dict[str, Any]) -> str:
    bw = report["read_bandwidth_gbs"]
    gpu = report.get("device") == "cuda"
    where = f"on {report['gpu']}; GPU memory read" if gpu else "read"
    lines = [
        f"Shape `{report['shape']}` ({report['params'] / 1e6:.0f}M parameters), prompt {report['prompt']} tokens, "
        f"{report['decode']} decoded; {where} bandwidth measured {bw:.1f} GB/s.",
        "",
        f"| engine | dtype | quant | load s | load peak GB{' (GPU)' if gpu else ''} | peak GB | TTFT s "
        "| prefill tok/s | decode tok/s "
        "| weights GB | GB/s | of bandwidth |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["runs"]:
        if r["error"]:
            lines.append(f"| {r['engine']} | {r['dtype']} | {r['quantize']} | failed: {r['error']} |")
            continue
        gbs = r["decode_tok_s"] * r["weight_gb"]
        lines.append(
            f"| {r['engine']} | {r['dtype']} | {r['quantize']} | {r['load_s']:.1f} | {r['load_peak_gb']:.2f} "
            f"| {r['peak_gb']:.2f} | {r['ttft_s']:.2f} | {r['prefill_tok_s']:.1f} | {r['decode_tok_s']:.2f} "
            f"| {r['weight_gb']:.3f} | {gbs:.1f} | {gbs / bw:.0%} |"
        )
    if report["accuracy"]:
        lines += [
            "",
            "| run | against | max abs logit error | relative RMS error | top-1 agreement |",
            "|---|---|---|---|---|",
        ]
        for a in report["accuracy"]:
            lines.append(
                f"| {a['run']} | {a['reference']} | {a['max_abs_logit_err']:.3f} | {a['rel_rms_logit_err']:.4f} "
                f"| {a['top1_agreement']:.1%} of {a['positions']} |"
            )
    if report["ratios"]:
        lines += ["", *(f"- {k}: {v:.2f}x" for k, v in report["ratios"].items())]
    return "\n".join(lines)


def summary(run: dict[str, Any]) -> str:
    """One run in a line, printed as it finishes (a long benchmark that is cut short still shows its runs)."""
    if run["error"]:
        return f"failed: {run['error']}"
    return (
        f"decode {run['decode_tok_s']:.2f} tok/s, prefill {run['prefill_tok_s']:.1f} tok/s, "
        f"TTFT {run['ttft_s']:.3f} s, load {run['load_s']:.1f} s, peak {run['peak_gb']:.2f} GB"
    )


def ratios(runs: list[dict[str, Any]]) -> dict[str, float]:
    ok = {(r["engine"], r["dtype"], r["quantize"]): r for r in runs if not r["error"]}
    out: dict[str, float] = {}

    def ratio(label: str, key: str, a: tuple[str, str, str], b: tuple[str, str, str]) -> None:
        if a in ok and b in ok and ok[b][key] > 0:
            out[label] = ok[a][key] / ok[b][key]

    for d in ("fp32", "bf16"):
        ratio(f"decode ours/transformers {d}", "decode_tok_s", ("ours", d, "none"), ("transformers", d, "none"))
        ratio(f"prefill ours/transformers {d}", "prefill_tok_s", ("ours", d, "none"), ("transformers", d, "none"))
        hf = ("transformers", d, "none")
        ratio(f"decode ours+compile/transformers {d}", "decode_tok_s", ("ours+compile", d, "none"), hf)
        ratio(f"decode int8/{d} (ours)", "decode_tok_s", ("ours", d, "int8"), ("ours", d, "none"))
        ratio(f"decode int4/int8 ({d} activations)", "decode_tok_s", ("ours", d, "int4"), ("ours", d, "int8"))
        for q in ("none", "int8", "int4"):  # what our kernels bring over torch's
            ratio(f"decode ours/ours+torch {d} {q}", "decode_tok_s", ("ours", d, q), ("ours+torch", d, q))
        for q in ("none", "int8", "int4"):
            ratio(f"decode ours/llama.cpp {d} {q}", "decode_tok_s", ("ours", d, q), ("llama.cpp", d, q))
        for other in ("ours+graphs", "ours+sync"):  # what CUDA graphs and queuing ahead bring
            ratio(f"decode ours/{other} {d}", "decode_tok_s", ("ours", d, "none"), (other, d, "none"))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="benchmarks/bench.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=list(SHAPES), default="small")
    ap.add_argument("--dtype", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    ap.add_argument("--quantize", nargs="+", choices=["none", "int8", "int4"], default=["none", "int8", "int4"])
    ap.add_argument(
        "--engines",
        nargs="+",
        choices=["ours", "ours+torch", "ours+compile", "ours+graphs", "ours+sync", "transformers", "llama.cpp"],
        default=["ours", "transformers"],
        help="ours+torch: our engine on torch's CPU kernels instead of ours (MISTRAL_KERNELS=off); ours+compile: "
        "with --compile (load time includes the compilation); cuda: ours+graphs with CUDA graphs, ours+sync "
        "reading each token back before queuing the next step",
    )
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where every engine runs")
    ap.add_argument(
        "--llama-cpp-convert",
        type=Path,
        help="llama.cpp's convert_hf_to_gguf.py (from a llama.cpp checkout), for --engines llama.cpp",
    )
    ap.add_argument("--prompt", type=int, default=512, help="prompt tokens (default 512)")
    ap.add_argument("--decode", type=int, default=32, help="tokens to generate (default 32)")
    ap.add_argument("--accuracy-tokens", type=int, default=128, help="teacher-forced positions for logit errors")
    ap.add_argument("--threads", type=int, default=None, help="threads in every run (default: torch's, all cores)")
    ap.add_argument("--repeats", type=int, default=3, help="timed generations per run; the best is reported")
    ap.add_argument("--model-dir", type=Path, help="reuse (or keep) the random checkpoint in this folder")
    ap.add_argument("--timeout", type=float, default=None, help="seconds allowed per run")
    ap.add_argument(
        "--bandwidth-gib", type=float, help="buffer for the bandwidth measurement (default 1, or 4 on cuda)"
    )
    ap.add_argument("--json", type=Path, help="also write the full report here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(RunSpec(**json.loads(args.worker)))
        return 0

    shape = SHAPES[args.shape]
    work = Path(tempfile.mkdtemp(prefix="mistral-bench-"))
    folder = args.model_dir or work / "model"
    try:
        if not (folder / "config.json").is_file():
            t = time.perf_counter()
            try:
                write_checkpoint(folder, shape, device=args.device)
            except ModuleNotFoundError as exc:  # mistral-common, for the tokenizer
                raise SystemExit(
                    f"The benchmark needs the test extras ({exc.name}): pip install -e '.[test]'"
                ) from None
            if args.device == "cuda":
                import torch

                torch.cuda.empty_cache()
            print(f"wrote a random {args.shape} checkpoint in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        gib = args.bandwidth_gib or (4.0 if args.device == "cuda" else 1.0)
        bandwidth = read_bandwidth_gbs(gib, device=args.device)
        ggufs: dict[tuple[str, str], Path] = {}
        if "llama.cpp" in args.engines:
            if not args.llama_cpp_convert:
                raise SystemExit("--engines llama.cpp needs --llama-cpp-convert PATH/convert_hf_to_gguf.py")
            wanted = [(d, q) for d in args.dtype for q in args.quantize]
            ggufs = write_ggufs(folder, folder if args.model_dir else work, args.llama_cpp_convert, wanted)
        runs: list[dict[str, Any]] = []
        logits: dict[str, Path] = {}
        acc_tokens = min(args.accuracy_tokens, args.prompt)
        for dtype in args.dtype:
            for engine in args.engines:
                for q in args.quantize if engine != "transformers" else ["none"]:
                    name = f"{engine}-{dtype}-{q}"
                    spec = RunSpec(engine, str(folder), dtype, q, args.prompt, args.decode, args.threads, args.repeats)
                    spec.device = args.device
                    if engine == "llama.cpp":
                        if (dtype, q) not in ggufs:
                            continue  # no llama.cpp type for it (Q8_0/Q4_0 come from the BF16 file)
                        spec.gguf = str(ggufs[dtype, q])
                        spec.weight_bytes = gguf_weight_bytes(ggufs[dtype, q], args.llama_cpp_convert)
                    if acc_tokens:
                        spec.accuracy_tokens, spec.logits_path = acc_tokens, str(work / f"{name}.pt")
                    need = n_params(shape) * (4 if dtype == "fp32" else 2)
                    if q == "none" and need > 0.9 * _available(args.device):
                        runs.append(asdict(_failed(spec, f"skipped: {need / 1e9:.1f} GB of weights do not fit")))
                        continue
                    print(f"running {name} ...", file=sys.stderr, flush=True)
                    runs.append(asdict(spawn(spec, args.timeout)))
                    print(f"  {summary(runs[-1])}", file=sys.stderr, flush=True)
                    if not runs[-1]["error"] and spec.logits_path:
                        logits[name] = Path(spec.logits_path)
        # every run against ours unquantized at the same dtype: transformers' row shows both compute one network
        acc = [
            {"run": name, "reference": ref, **accuracy(logits[ref], path)}
            for name, path in logits.items()
            if (ref := "ours-" + name.split("-")[1] + "-none") in logits and name != ref
        ]
        report = {
            "shape": args.shape,
            "params": n_params(shape),
            "prompt": args.prompt,
            "decode": args.decode,
            "machine": machine(),
            "device": args.device,
            "gpu": gpu_name() if args.device == "cuda" else "",
            "torch_threads": args.threads,
            "read_bandwidth_gbs": bandwidth,
            "runs": runs,
            "accuracy": acc,
            "ratios": ratios(runs),
        }
        if args.json:
            args.json.write_text(json.dumps(report, indent=2))
        print(markdown(report))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _available(device: str = "cpu") -> int:
    if device == "cuda":
        import torch

        return torch.cuda.mem_get_info()[0]
    from mistral_cli.hardware import available_memory

    return available_memory() or 1 << 62


def gpu_name() -> str:
    import torch

    props = torch.cuda.get_device_properties(0)
    return f"{props.name} ({props.total_memory / 2**30:.0f} GiB, torch {torch.__version__})"


if __name__ == "__main__":
    sys.exit(main())
