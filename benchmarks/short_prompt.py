"""Short prompts: a batch of T rows through one 7B-shaped layer (the prefill path: the layer's own forward, which
dequantizes int8/int4 weights a block at a time into a float GEMM, or on a CPU with AVX512-VNNI multiplies them as
integers, int8 up to 48 rows) against T single-row products on our decode kernels (what a decode step does).
Where the rows win is where Engine.prefill feeds a prompt one token at a time (engine.ROW_BY_ROW).

    python benchmarks/short_prompt.py --rows 1 2 4 8 16 32 64

Random weights of the 7B layers' shapes (fused q/k/v, output, fused gate/up, down); each figure is the best of
`--repeats`, summed over the four layers (one block of 32). Needs our kernels (a C compiler).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

# before torch starts: its large buffers (weights, caches) on 2 MiB pages, as `mistral` runs (cli/app.py huge_pages)
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch  # noqa: E402

SHAPES = {"wqkv": (6144, 4096), "wo": (4096, 4096), "w13": (28672, 4096), "w2": (4096, 14336)}


def best(f: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    ap.add_argument("--quantize", nargs="+", default=["none", "int8", "int4"])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from mistral_cli.model.transformer import Linear
    from mistral_cli.native import kernels
    from mistral_cli.native.quant import NativeInt4Linear, NativeInt8Linear

    ops = kernels.native()
    if ops is None:
        raise SystemExit(f"our kernels: {kernels.status()}")
    flags = sorted({f for f in Path("/proc/cpuinfo").read_text().split() if f.startswith(("avx512_bf16", "avx512_vnni",
                    "avx_vnni", "avx2", "amx"))}) if Path("/proc/cpuinfo").exists() else []  # fmt: skip
    print(f"# {os.cpu_count()} cores, {torch.get_num_threads()} threads, flags: {' '.join(flags)}; "
          f"load {os.getloadavg()[0]:.2f}; torch {torch.__version__}")  # fmt: skip
    print("| weights | " + " | ".join(f"{t} rows: batch / rows (ms)" for t in args.rows) + " |")
    print("|---" * (len(args.rows) + 1) + "|")
    gen = torch.Generator().manual_seed(0)
    for mode in args.quantize:
        layers = []
        for N, K in SHAPES.values():
            w = (torch.randn(N, K, generator=gen) * 0.02).to(torch.bfloat16)
            if mode == "int4":
                q = NativeInt4Linear(w, ops)
                layers.append((q, lambda x, q=q: ops.linear_int4(x, q.weight, q.scales_and_lows)))
            elif mode == "int8":
                q = NativeInt8Linear(w, ops)
                layers.append((q, lambda x, q=q: ops.linear_int8(x, q.weight, q.scales)))
            else:
                lin = Linear(K, N, bias=False, dtype=torch.bfloat16)
                lin.weight.data = w
                layers.append((lin, lambda x, w=w: ops.linear_bf16(x, w)))
        cells = []
        with torch.inference_mode():
            for T in args.rows:
                batch = rows = 0.0
                for layer, row in layers:
                    x = torch.randn(1, T, layer.in_features, generator=gen).to(torch.bfloat16)
                    batch += best(lambda layer=layer, x=x: layer(x), args.repeats)
                    rows += best(lambda row=row, x=x, T=T: [row(x[0, i : i + 1]) for i in range(T)], args.repeats)
                mark = "**" if rows < batch else ""
                cells.append(f"{batch * 1e3:.0f} / {mark}{rows * 1e3:.0f}{mark}")
        print(f"| {mode if mode != 'none' else 'bf16'} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
