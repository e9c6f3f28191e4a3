"""Benchmark: decode speed on an idle CPU and with busy processes beside it, per precision.

    python benchmarks/sharing.py                          # small shape, bf16 int8 int4, one busy process
    python benchmarks/sharing.py --quantize int4 --rounds 3 --env MISTRAL_KERNELS=avx2
    python benchmarks/sharing.py --later --decode 512        # the busy process starts after the model has loaded

Each measurement is a fresh process that loads the random checkpoint (written once, as benchmarks/bench.py does)
the way `mistral` does: `hardware.share_the_cpu()` runs before torch is imported, so with busy processes beside it
the idle OpenMP threads sleep, as they would for a user. It then decodes `--decode` tokens greedily `--repeats`
times and reports the median decode tokens/s. Idle and busy runs alternate, `--rounds` times, so that a change in
the machine's other load touches both; "kept" is busy / idle of the medians. The busy processes are
`python3 -c 'while True: pass'`, started before the measuring process and stopped after it. With `--later` they
start once the process has loaded the model on the idle machine and decoded once, as when a program starts during
a chat: the load-time decision saw nothing, and what keeps the speed is the decode threads adapting
(engine/pacing.py; `--env MISTRAL_ADAPT_THREADS=off` for the steps without it).
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

# before torch starts: its large buffers (weights, caches) on 2 MiB pages, as `mistral` runs (cli/app.py huge_pages)
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def child(folder: str, quantize: str, decode: int, repeats: int, later: bool) -> None:
    from mistral_cli.hardware import share_the_cpu

    shared = share_the_cpu()
    from mistral_cli.engine.engine import Done
    from mistral_cli.engine.load import load_engine
    from mistral_cli.native import kernels
    from mistral_cli.options import GenerationOptions, LoadOptions

    engine = load_engine(Path(folder), LoadOptions(device="cpu", dtype="bf16", quantize=quantize, max_context=512))
    greedy = GenerationOptions(temperature=0, max_tokens=decode)
    for _ in engine.generate([1, 2, 3, 4], GenerationOptions(temperature=0, max_tokens=4)):
        pass  # warm-up
    if later:  # decode once on the idle machine (the pace the steps had so far), then wait for the busy programs
        for _ in engine.generate([1, 22, 333, 4444], greedy):
            pass
        print("ready", flush=True)
        sys.stdin.readline()
    speeds = []
    for _ in range(repeats):
        engine.reset()
        for event in engine.generate([1, 22, 333, 4444], greedy):
            if isinstance(event, Done):
                speeds.append(event.decode_tokens_per_s)
    pacer = engine.pacer.summary() if engine.pacer is not None else None
    print(json.dumps({"speeds": speeds, "shared": shared, "label": kernels.label(), "pacer": pacer}))


def measure(folder: Path, quantize: str, busy: int, args: argparse.Namespace) -> dict:
    def hog() -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", "while True: pass"])

    later = busy and args.later
    hogs = [] if later else [hog() for _ in range(busy)]
    try:
        time.sleep(0.3 if hogs else 0)  # the busy processes are running when the model loads
        cmd = [sys.executable, __file__, "--child", str(folder), quantize, str(args.decode), str(args.repeats)]
        with subprocess.Popen(
            [*cmd, str(int(later))], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env={**os.environ, **dict(e.split("=", 1) for e in args.env)},
        ) as proc:  # fmt: skip
            assert proc.stdin is not None and proc.stdout is not None
            if later:  # loaded and decoding on an idle machine: now the busy programs start
                assert proc.stdout.readline().strip() == "ready"
                hogs = [hog() for _ in range(busy)]
                time.sleep(0.3)
                proc.stdin.write("go\n")
                proc.stdin.flush()
            out = proc.communicate()[0]
            if proc.returncode:
                raise SystemExit(f"the measuring process failed ({proc.returncode})")
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6] == "1")
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="small")
    ap.add_argument("--quantize", nargs="+", default=["none", "int8", "int4"])
    ap.add_argument("--busy", type=int, default=1, help="busy processes beside the decode")
    ap.add_argument(
        "--later", action="store_true", help="the busy processes start once the model is loaded and has decoded once"
    )
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--decode", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--env", nargs="*", default=[], help="NAME=VALUE for the measuring processes")
    ap.add_argument("--model-dir", type=Path, help="reuse (or keep) the random checkpoint in this folder")
    args = ap.parse_args()
    from checkpoints import SHAPES, write_checkpoint

    folder = args.model_dir or Path(tempfile.mkdtemp(prefix="mistral-sharing-"))
    if not (folder / "config.json").exists():
        write_checkpoint(folder, SHAPES[args.shape])
    flags = sorted(
        {
            f
            for f in Path("/proc/cpuinfo").read_text().split()
            if f.startswith(("avx2", "avx512_bf16", "avx512_vnni", "avx_vnni"))
        }
    )
    print(f"flags: {' '.join(flags)}; env: {' '.join(args.env) or '-'}; {args.busy} busy process(es)")
    print("| precision | idle tok/s | busy tok/s | kept | load avg before |")
    print("|---|---|---|---|---|")
    for quantize in args.quantize:
        idle, busy, noisy = [], [], 0
        for _ in range(args.rounds):
            load = os.getloadavg()[0]
            quiet = measure(folder, quantize, 0, args)
            idle.append(statistics.median(quiet["speeds"]))
            noisy += quiet["shared"] is not None  # other programs ran during the idle run
            result = measure(folder, quantize, args.busy, args)
            busy.append(statistics.median(result["speeds"]))
        i, b = statistics.median(idle), statistics.median(busy)
        print(
            f"| {quantize} | {i:.1f} ({' '.join(f'{v:.0f}' for v in idle)}) "
            f"| {b:.1f} ({' '.join(f'{v:.0f}' for v in busy)}) | {b / i:.0%} | {load:.2f}"
            f"{f', {noisy} idle run(s) not idle' if noisy else ''} |",
            flush=True,
        )
    print(f"kernels: {result['label']}; busy run: {result['shared']}; pacer: {result['pacer']}")


if __name__ == "__main__":
    main()
