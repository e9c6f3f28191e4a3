"""Benchmark: our decode and llama.cpp's in one process, taking turns, so that the machine's changing speed touches both.

    python benchmarks/sidebyside.py --shape 7b-8 --quantize none int8 int4 \
        --llama-cpp-convert PATH/convert_hf_to_gguf.py --model-dir DIR

On a shared virtual machine the memory bandwidth two cores get moves by 20-50% between runs minutes apart: more than
the difference between two engines that both read at the memory's pace. bench.py runs each engine in its own
process, one after the other, and can compare a fast minute of one with a slow minute of the other. Here both
engines are loaded in one process (ours from its prepared file, as `mistral` maps it; llama.cpp's GGUF read into
memory, as bench.py loads it) and take turns: each turn prefills the same prompt and decodes `--tokens` tokens
greedily with one engine, then with the other, the order swapped every turn, with a pause between them so that
neither engine's threads still spin while the other runs. Per precision: each engine's median decode tokens/s and
GB/s of weights read, and the median of the turns' ratios (ours / llama.cpp) with their range. One precision is in
memory at a time (its two sets of weights). The checkpoint and the GGUF files are made as bench.py makes them.

Needs the test extras, llama-cpp-python, and a llama.cpp checkout for its converter.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (sets THP_MEM_ALLOC_ENABLE before torch starts, as `mistral` does)

from checkpoints import SHAPES, write_checkpoint  # noqa: E402  (tests/, put on the path by bench)


def ours(folder: Path, quantize: str, context: int) -> tuple[Any, int]:
    """A decode function of ours, (prompt, n) -> tokens/s, and the bytes a step reads."""
    from mistral_cli.engine.engine import Done
    from mistral_cli.engine.load import load_engine
    from mistral_cli.options import GenerationOptions, LoadOptions

    engine = load_engine(folder, LoadOptions(device="cpu", dtype="bf16", quantize=quantize, max_context=context))

    def decode(prompt: list[int], n: int) -> float:
        engine.reset()
        for event in engine.generate(prompt, GenerationOptions(temperature=0, max_tokens=n + 1)):
            if isinstance(event, Done):
                return event.decode_tokens_per_s
        raise AssertionError("no Done")

    return decode, engine.model.decode_bytes()


def llama(gguf: Path, threads: int, context: int) -> Any:
    """llama.cpp's decode function, (prompt, n) -> tokens/s, with bench.py's settings."""
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(str(gguf), n_ctx=context, n_batch=512, n_threads=threads, n_threads_batch=threads,
                          use_mmap=False, verbose=False)  # fmt: skip

    def greedy() -> int:  # the argmax of the last logits (llama-cpp-python keeps only those without logits_all)
        return int(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),)).argmax())

    def decode(prompt: list[int], n: int) -> float:
        llm.reset()
        llm.eval(prompt)
        token = greedy()
        t = time.perf_counter()
        for _ in range(n):
            llm.eval([token])
            token = greedy()
        return n / (time.perf_counter() - t)

    return decode, llm


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="benchmarks/sidebyside.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=list(SHAPES), default="7b-8")
    ap.add_argument("--quantize", nargs="+", choices=["none", "int8", "int4"], default=["none", "int8", "int4"])
    ap.add_argument("--llama-cpp-convert", type=Path, required=True, help="llama.cpp's convert_hf_to_gguf.py")
    ap.add_argument("--model-dir", type=Path, required=True, help="the random checkpoint (written if absent)")
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens (default 64)")
    ap.add_argument("--tokens", type=int, default=16, help="tokens decoded per turn (default 16)")
    ap.add_argument("--turns", type=int, default=8, help="turns per precision, each engine once a turn (default 8)")
    ap.add_argument("--pause", type=float, default=0.5, help="seconds between two engines' turns (default 0.5)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)

    import torch

    folder = args.model_dir
    if not (folder / "config.json").is_file():
        write_checkpoint(folder, SHAPES[args.shape])
    threads = torch.get_num_threads()
    context = args.prompt + args.tokens + 8
    prompt = bench.prompt_ids(args.prompt)
    ggufs = bench.write_ggufs(folder, folder, args.llama_cpp_convert, [("bf16", q) for q in args.quantize])
    print(f"{bench.machine()}; shape {args.shape}, prompt {args.prompt}, {args.tokens} tokens a turn, "
          f"{args.turns} turns, {threads} threads", file=sys.stderr)  # fmt: skip
    rows = []
    for q in args.quantize:
        mine, our_bytes = ours(folder, q, context)
        theirs, llm = llama(ggufs["bf16", q], threads, context)
        their_bytes = bench.gguf_weight_bytes(ggufs["bf16", q], args.llama_cpp_convert)
        mine(prompt[:8], 2), theirs(prompt[:8], 2)  # warm-up: thread pools, and every page of both in memory
        speeds: dict[str, list[float]] = {"ours": [], "llama.cpp": []}
        for turn in range(args.turns):
            order = [("ours", mine), ("llama.cpp", theirs)]
            for name, decode in order if turn % 2 == 0 else order[::-1]:
                time.sleep(args.pause)
                speeds[name].append(decode(prompt, args.tokens))
        ratios = [a / b for a, b in zip(speeds["ours"], speeds["llama.cpp"], strict=True)]
        row = {
            "quantize": q,
            "ours_tok_s": statistics.median(speeds["ours"]),
            "llama_tok_s": statistics.median(speeds["llama.cpp"]),
            "ours_gb": our_bytes / 1e9,
            "llama_gb": their_bytes / 1e9,
            "ratio": statistics.median(ratios),
            "ratio_range": [min(ratios), max(ratios)],
            "turns": speeds,
        }
        rows.append(row)
        print(f"  {q}: ours {row['ours_tok_s']:.2f}, llama.cpp {row['llama_tok_s']:.2f} tok/s, ratio "
              f"{row['ratio']:.2f} ({min(ratios):.2f}-{max(ratios):.2f})", file=sys.stderr)  # fmt: skip
        del mine, theirs, llm
        gc.collect()
    print(f"| bf16 activations | ours tok/s (GB/s) | llama.cpp tok/s (GB/s) | ours / llama.cpp, median of {args.turns} "
          "turns (range) |")  # fmt: skip
    print("|---|---|---|---|")
    for r in rows:
        names = {"none": "bf16 / BF16", "int8": "int8 / Q8_0", "int4": "int4 / Q4_0"}
        print(f"| {names[r['quantize']]} | {r['ours_tok_s']:.2f} ({r['ours_tok_s'] * r['ours_gb']:.1f}) | "
              f"{r['llama_tok_s']:.2f} ({r['llama_tok_s'] * r['llama_gb']:.1f}) | **{r['ratio']:.2f}x** "
              f"({r['ratio_range'][0]:.2f}-{r['ratio_range'][1]:.2f}) |")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"machine": bench.machine(), "shape": args.shape, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
