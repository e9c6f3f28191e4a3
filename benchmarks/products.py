"""Benchmark: one decode product at a time on our kernels, this CPU's build against the AVX2 build, in GB/s of weights.

    python benchmarks/products.py                     # the 7B shapes, every precision, 2 threads
    python benchmarks/products.py --kinds int4 --repeats 50
    python benchmarks/products.py --kinds attention --keys 512 4096 32768

Both builds of kernels.c (the one for this CPU and the one `MISTRAL_KERNELS=avx2` makes) are loaded into one process
and called in turn on the same random weights and a bf16 activation row, as in a decode step, so that a comparison
shares the machine's state of the moment. Each figure is the best of `--repeats` calls, alternating between builds
(other work on the machine only ever slows a call down). Also prints the CPU flags that pick the paths.
`attention` is one decode step's attention of the 7B heads (32 query heads over 8 key/value heads of 128) over
`--keys` positions, in GB/s of keys and values read, each call on the next of four caches (so that only the shortest
stay in the CPU's caches).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import time
from pathlib import Path
from typing import Any

# before torch starts: its large buffers (weights, caches) on 2 MiB pages, as `mistral` runs (cli/app.py huge_pages)
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch  # noqa: E402

from mistral_cli.native import kernels

# the 7B shapes, and "cached": a weight that stays in the L2 caches (2-8 MB over 2 cores), to compare arithmetic apart from memory
SHAPES = {"qkv": (6144, 4096), "wo": (4096, 4096), "w13": (28672, 4096), "w2": (4096, 14336), "cached": (1024, 4096)}


def build(variant: str) -> kernels.Kernels:
    """The build for this CPU ("native") or the AVX2 one ("avx2"), as kernels.native() would load it."""
    before = os.environ.get(kernels.KERNELS_ENV)
    os.environ[kernels.KERNELS_ENV] = "avx2" if variant == "avx2" else "on"
    try:
        path = kernels._build(kernels.c_compiler())  # type: ignore[arg-type]
    finally:
        if before is None:
            del os.environ[kernels.KERNELS_ENV]
        else:
            os.environ[kernels.KERNELS_ENV] = before
    return kernels.Kernels(ctypes.CDLL(str(path)), Path(path))


def operands(kind: str, N: int, K: int) -> tuple[Any, ...]:
    g = torch.Generator().manual_seed(N + K)
    if kind == "bf16":
        return (torch.randn(N, K, generator=g).to(torch.bfloat16),)
    if kind == "int8":
        return torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8), torch.rand(N, generator=g) / 100
    codes = torch.randint(0, 16, (N, K), generator=g, dtype=torch.uint8)
    scales, lows = torch.rand(N, K // 64, generator=g) / 50, torch.randn(N, K // 64, generator=g) / 5
    return kernels.pack_int4(codes), kernels.pack_int4_scales(scales, lows)


def call(k: kernels.Kernels, kind: str) -> Any:
    return {"bf16": k.linear_bf16, "int8": k.linear_int8, "int4": k.linear_int4}[kind]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--kinds", nargs="+", default=["bf16", "int8", "int4"], choices=["bf16", "int8", "int4", "attention"]
    )
    ap.add_argument("--keys", nargs="+", type=int, default=[512, 4096, 32768], help="positions, for attention")
    ap.add_argument("--shapes", nargs="+", default=[s for s in SHAPES if s != "cached"], choices=list(SHAPES))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    builds = {"native": build("native"), "avx2": build("avx2")}
    flags = sorted(
        f for f in Path("/proc/cpuinfo").read_text().split() if f.startswith(("avx2", "avx512", "avx_vnni", "amx"))
    )
    print(f"flags: {' '.join(dict.fromkeys(flags))}")
    print(f"load average: {os.getloadavg()[0]:.2f}, threads {args.threads}, best of {args.repeats}")
    print(f"this CPU's build: {kernels.label(builds['native'])}")
    print("| kind | N x K | this CPU's build GB/s | AVX2 build GB/s | ratio | same bits |")
    print("|---|---|---|---|---|---|")
    for kind in args.kinds:
        if kind == "attention":
            for L in args.keys:
                attention_row(builds, L, args.repeats)
            continue
        for name in args.shapes:
            N, K = SHAPES[name]
            ops = operands(kind, N, K)
            nbytes = sum(t.numel() * t.element_size() for t in ops)
            x = torch.randn(1, K).to(torch.bfloat16)
            best = {v: float("inf") for v in builds}
            outs = {v: call(b, kind)(x, *ops) for v, b in builds.items()}  # also warms the pages up
            for _ in range(args.repeats):
                for v, b in builds.items():
                    t = time.perf_counter()
                    call(b, kind)(x, *ops)
                    best[v] = min(best[v], time.perf_counter() - t)
            gbs = {v: nbytes / best[v] / 1e9 for v in builds}
            same = torch.equal(outs["native"], outs["avx2"])
            print(
                f"| {kind} | {N} x {K} ({name}) | {gbs['native']:.1f} | {gbs['avx2']:.1f} "
                f"| {gbs['native'] / gbs['avx2']:.2f} | {'yes' if same else 'no'} |"
            )


def attention_row(builds: dict[str, kernels.Kernels], L: int, repeats: int) -> None:
    H, KV, D = 32, 8, 128
    g = torch.Generator().manual_seed(L)
    caches = [tuple(torch.randn(1, KV, L, D, generator=g).to(torch.bfloat16) for _ in "kv") for _ in range(4)]
    q = torch.randn(1, H, 1, D, generator=g).to(torch.bfloat16)
    best = {v: float("inf") for v in builds}
    for i in range(repeats):
        for v, b in builds.items():
            k, vv = caches[i % 4]
            t = time.perf_counter()
            b.attention(q, k, vv)
            best[v] = min(best[v], time.perf_counter() - t)
    nbytes = 2 * KV * L * D * 2
    gbs = {v: nbytes / best[v] / 1e9 for v in builds}
    print(
        f"| attention | {L} keys ({nbytes / 2**20:.0f} MiB) | {gbs['native']:.1f} | {gbs['avx2']:.1f} "
        f"| {gbs['native'] / gbs['avx2']:.2f} | no (weights rounded to bf16) |"
    )


if __name__ == "__main__":
    main()
