"""Our engine at two versions of the code, on one checkpoint, in processes that take turns: is a change a regression?

    git worktree add /tmp/old REV
    python benchmarks/versions.py --old /tmp/old/src --new src --model-dir /work/bench7b8 --rounds 3

Each round runs every precision once per version, the order swapped each round, in fresh processes (each imports
its version's package from the folder given, with its own cache folder, so neither reuses the other's kernels or
prepared files), each one after the machine has been idle for a moment. A process loads the model from the
checkpoint (no prepared file: both versions read the weights into memory the same way), decodes a short greedy
warm-up, then a prompt of `--prompt` tokens and `--decode` tokens, and reports prefill and decode tokens/s. The
medians over the rounds are printed, with new/old. `MISTRAL_KERNELS` and the like pass through to both (e.g.
`MISTRAL_KERNELS=avx2` compares the AVX2 paths on a CPU with AVX-512; a version older than that switch builds
with AVX-512 where the compiler vectorizes plain loops, unless `CC` names a wrapper that adds `-mno-avx512f`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORKER = r"""
import json, sys, time
import torch
from pathlib import Path
from mistral_cli.engine.engine import Done
from mistral_cli.engine.load import load_engine
from mistral_cli.options import GenerationOptions, LoadOptions

folder, dtype, quantize, prompt_n, decode_n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
engine = load_engine(Path(folder), LoadOptions(device="cpu", dtype=dtype, quantize=quantize, prepare=False))
g = torch.Generator().manual_seed(0)
prompt = [1, *torch.randint(3, 32000, (prompt_n - 1,), generator=g).tolist()]
greedy = lambda n: GenerationOptions(max_tokens=n, temperature=0)
for _ in engine.generate(prompt[:8], greedy(4)):
    pass
engine.reset()
done = [e for e in engine.generate(prompt, greedy(decode_n)) if isinstance(e, Done)][0]
print("RESULT " + json.dumps({"prefill": done.prefill_tokens_per_s, "decode": done.decode_tokens_per_s,
                              "tokens": done.tokens, "threads": torch.get_num_threads()}))
"""


def idle(seconds: float = 5.0, below: float = 0.3, most: float = 60.0) -> None:
    """Wait until the 1-minute load average is low, or at most `most` seconds, then `seconds` more."""
    end = time.monotonic() + most
    while time.monotonic() < end and os.getloadavg()[0] > below:
        time.sleep(2)
    time.sleep(seconds)


def run(src: Path, cache: Path, folder: Path, dtype: str, quantize: str, prompt: int, decode: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src.resolve()), "XDG_CACHE_HOME": str(cache), "THP_MEM_ALLOC_ENABLE": "1"}
    args = [sys.executable, "-c", WORKER, str(folder), dtype, quantize, str(prompt), str(decode)]
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=1800)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"{src} {dtype} {quantize} failed:\n{proc.stderr[-2000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="benchmarks/versions.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--old", type=Path, required=True, help="the older version's src folder (holding mistral_cli)")
    ap.add_argument("--new", type=Path, required=True, help="the newer version's src folder")
    ap.add_argument("--model-dir", type=Path, required=True, help="an HF checkpoint folder (benchmarks/bench.py)")
    ap.add_argument("--quantize", nargs="+", default=["none", "int8", "int4"], choices=["none", "int8", "int4"])
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    caches = {name: Path(tempfile.mkdtemp(prefix=f"versions-{name}-")) for name in ("old", "new")}
    results: dict[tuple[str, str], list[dict]] = {}
    for r in range(args.rounds):
        order = ("old", "new") if r % 2 == 0 else ("new", "old")
        for q in args.quantize:
            for name in order:
                idle()
                got = run(getattr(args, name), caches[name], args.model_dir, args.dtype, q, args.prompt, args.decode)
                results.setdefault((name, q), []).append(got)
                print(f"round {r + 1} {name} {q}: prefill {got['prefill']:.1f} decode {got['decode']:.2f} tok/s "
                      f"({got['threads']} threads)", file=sys.stderr, flush=True)  # fmt: skip
    print(f"\n{args.dtype}, prompt {args.prompt}, {args.decode} decoded, median of {args.rounds} rounds\n")
    print("| quant | old prefill | new prefill | new/old | old decode | new decode | new/old | same tokens |")
    print("|---|---|---|---|---|---|---|---|")
    for q in args.quantize:
        old, new = results["old", q], results["new", q]
        med = {k: {n: statistics.median(x[k] for x in v) for n, v in (("old", old), ("new", new))}
               for k in ("prefill", "decode")}  # fmt: skip
        same = all(x["tokens"] == old[0]["tokens"] for x in old + new)
        print(f"| {q} | {med['prefill']['old']:.1f} | {med['prefill']['new']:.1f} | "
              f"{med['prefill']['new'] / med['prefill']['old']:.2f}x | {med['decode']['old']:.2f} | "
              f"{med['decode']['new']:.2f} | {med['decode']['new'] / med['decode']['old']:.2f}x | {same} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
