"""Batch decoding: B sequences decoded together (one forward over B rows per step, each weight read once for all of
them) against the same B sequences decoded one after another (B single-row steps on our fused CPU kernels), on the
small shape's whole model, per precision.

    python benchmarks/batch.py --rows 1 2 4 8 --precisions bf16 int8 int4 fp32

Two measurements per precision and batch size B:
- step: the time of one decode step for all B sequences, in lockstep at the same positions after a `--prompt`-token
  prefill: the model's multi-row path (`model(tokens (B, 1), cache of batch B, pos)`, what Engine.generate_many
  runs) against B single-row steps (native.decode.FusedStep where our kernels take the weights, else the model's
  own single-row forward: what Engine.generate runs). The best of `--steps` steps, the two sides interleaved, after
  two warm-up steps (the first multi-row products of a process fault in buffers).
- engine (`--generate N`): B prompts of `--prompt` tokens, N greedy tokens each, through Engine.generate_many
  against Engine.generate one prompt after another; tokens/s over the whole run, prefills included, the best of
  two runs.

Best-of figures, since other work on a shared machine only ever slows a run down.

The random checkpoint is written once by the tests' writer (tests/checkpoints.py, as benchmarks/bench.py does) into
a temporary folder, or kept in `--model-dir`. For one 7B block's linear products at B rows, see
benchmarks/short_prompt.py --rows 1 2 4 8. Needs our kernels (a C compiler).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

# before torch starts: its large buffers (weights, caches) on 2 MiB pages, as `mistral` runs (cli/app.py huge_pages)
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from checkpoints import SHAPES, VOCAB, write_checkpoint  # noqa: E402

PRECISIONS = {"bf16": ("bf16", "none"), "fp32": ("fp32", "none"), "int8": ("bf16", "int8"), "int4": ("bf16", "int4")}


def flags() -> str:
    try:
        words = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return "unknown"
    return " ".join(sorted(w for w in words if w in ("avx2", "avx512_bf16", "avx512_vnni", "avx_vnni")))


def random_ids(B: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (B, n), generator=g)


def step_times(model, single, B: int, prompt: int, steps: int) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """Best seconds of one decode step for B sequences: together (multi-row forward), and one after another."""
    warm = 2
    ids = random_ids(B, prompt, 1)
    feed = random_ids(B, warm + steps, 2)  # the values do not change the time; sampling is left out of both
    together = model.new_cache(prompt + warm + steps, batch=B)
    model(ids, together, 0, last_only=True)
    alone = [model.new_cache(prompt + warm + steps) for _ in range(B)]
    for b in range(B):
        model(ids[b : b + 1], alone[b], 0, last_only=True)
    batch, rows = [], []
    for s in range(warm + steps):
        pos = prompt + s
        t0 = time.perf_counter()
        model(feed[:, s : s + 1], together, pos)
        t1 = time.perf_counter()
        for b in range(B):
            single(feed[b : b + 1, s : s + 1], alone[b], pos)
        t2 = time.perf_counter()
        if s >= warm:
            batch.append(t1 - t0)
            rows.append(t2 - t1)
    return min(batch), min(rows)


def generate_rates(engine, B: int, prompt: int, tokens: int) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """Tokens/s of B greedy generations: together (generate_many), and one after another (generate)."""
    from mistral_cli.options import GenerationOptions

    prompts = [[1, *row] for row in random_ids(B, prompt - 1, 3).tolist()]
    opts = [GenerationOptions(max_tokens=tokens, temperature=0) for _ in range(B)]
    engine.generate_many(prompts[:1], opts[:1], leading_space=[True])  # warm-up: buffers, rope tables
    best = [float("inf"), float("inf")]
    for _ in range(2):
        t0 = time.perf_counter()
        together = engine.generate_many(prompts, opts, leading_space=[True] * B)
        t1 = time.perf_counter()
        alone = []
        for p, o in zip(prompts, opts, strict=True):
            engine.reset()  # no prefix shared with the previous prompt: a fair prefill
            alone.append(list(engine.generate(p, o, leading_space=True))[-1])
        t2 = time.perf_counter()
        best = [min(best[0], t1 - t0), min(best[1], t2 - t1)]
    made = sum(d.completion_tokens for d in together)
    assert made == sum(d.completion_tokens for d in alone)  # the same work on both sides
    return made / best[0], made / best[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8], help="batch sizes B")
    ap.add_argument("--precisions", nargs="+", choices=list(PRECISIONS), default=["bf16", "int8", "int4"])
    ap.add_argument("--shape", choices=list(SHAPES), default="small")
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens per sequence (default 64)")
    ap.add_argument("--steps", type=int, default=8, help="timed decode steps per B (default 8)")
    ap.add_argument("--generate", type=int, default=0, help="also time the engine over N generated tokens")
    ap.add_argument("--model-dir", type=Path, help="reuse (or keep) the random checkpoint in this folder")
    args = ap.parse_args()

    from mistral_cli.engine.load import load_engine
    from mistral_cli.native import kernels
    from mistral_cli.native.decode import use_kernels
    from mistral_cli.options import LoadOptions

    ops = kernels.native()
    if ops is None:
        raise SystemExit(f"our kernels: {kernels.status()}")
    work = Path(tempfile.mkdtemp(prefix="mistral-batch-"))
    folder = args.model_dir or work / "model"
    try:
        if not (folder / "config.json").exists():
            write_checkpoint(folder, SHAPES[args.shape])
        print(f"# {args.shape} shape, {os.cpu_count()} cores, {torch.get_num_threads()} threads, flags: {flags()}; "
              f"load {os.getloadavg()[0]:.2f}; torch {torch.__version__}; prompt {args.prompt}")  # fmt: skip
        header = " | ".join(f"B = {B}" for B in args.rows)
        print(f"| weights | what | {header} |\n|---|---|" + "---|" * len(args.rows))
        for name in args.precisions:
            dtype, quantize = PRECISIONS[name]
            engine = load_engine(folder, LoadOptions(device="cpu", dtype=dtype, quantize=quantize, prepare=False))
            fused = use_kernels(engine.model, ops)
            if fused is not None:
                single = lambda x, cache, pos, fused=fused: fused(int(x), cache, pos)  # noqa: E731
            else:
                single = engine.model
            ms, rates = [], []
            with torch.inference_mode():
                for B in args.rows:
                    batch, rows = step_times(engine.model, single, B, args.prompt, args.steps)
                    mark = ("**", "") if batch < rows else ("", "**")
                    ms.append(f"{mark[0]}{batch * 1e3:.0f}{mark[0]} / {mark[1]}{rows * 1e3:.0f}{mark[1]}")
                    rates.append(f"{B / batch:.1f} / {B / rows:.1f}")
            print(f"| {name} | step, together / one after another (ms) | " + " | ".join(ms) + " |")
            print(f"| {name} | decode tokens/s, together / one after another | " + " | ".join(rates) + " |")
            if args.generate:
                cells = [
                    "{:.1f} / {:.1f}".format(*generate_rates(engine, B, args.prompt, args.generate)) for B in args.rows
                ]
                print(f"| {name} | engine tokens/s over {args.generate} tokens, generate_many / generate | "
                      + " | ".join(cells) + " |")  # fmt: skip
            sys.stdout.flush()
            del engine, fused, single
        print(f"# load after: {os.getloadavg()[0]:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
