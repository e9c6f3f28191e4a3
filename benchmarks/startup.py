"""Start-up benchmark: how long `mistral complete -n 4 -t 0 "Hello"` takes as a whole process, first call (which
prepares the weights), warm (the prepared file in the page cache), cold (page cache dropped, as root), and with
`--no-prepare` (the checkpoint read and converted on every call); decode speed from mapped prepared weights against
the copied ones; the memory (PSS) of two processes on one model against one. With `--warm-only`, warm calls alone:
on the quick path (no torch, engine/quick.py) and on the full path (MISTRAL_QUICK=off). With `--llama-cpp-convert`, llama.cpp
(llama-cpp-python, its GGUF file mapped) runs the same prompt in the same way, in the same run.

    python benchmarks/startup.py --model-dir /path/to/7b --quantize none int8 int4 \
        --llama-cpp-convert vendor/llama.cpp/convert_hf_to_gguf.py

The checkpoint is written by the tests' writer (tests/checkpoints.py) when the folder does not hold one. Every figure
is one process's wall time, the best of `--repeats`; other work on the machine only slows a run down.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

MISTRAL = [sys.executable, "-m", "mistral_cli"]
LLAMA_TYPES = {"none": "BF16", "int8": "Q8_0", "int4": "Q4_0"}


def wall(command: list[str], env: dict[str, str] | None = None) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    r = subprocess.run(command, capture_output=True, text=True, env=env)
    elapsed = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{r.stderr}")
    return elapsed, r


def read_time(path: str) -> float:
    """Seconds to read a file once, as `cat FILE > /dev/null`."""
    t0 = time.perf_counter()
    subprocess.run(["cat", path], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t0


def drop_caches() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def pss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


def concurrent_pss(command: list[str], n: int) -> float:
    """Total PSS (GB) of `n` processes running `command` at once, sampled while all of them decode: the median of the
    samples in the second half of that time. Not the largest: the processes' figures are read one after another, and
    a process that maps its pages between two readings is counted whole in one and shared in the other."""
    procs = [subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(n)]
    sums = []
    while all(p.poll() is None for p in procs):
        try:
            sums.append(sum(pss_kb(p.pid) for p in procs))
        except OSError:
            break
        time.sleep(0.2)
    for p in procs:
        p.wait()
    late = sorted(sums[len(sums) // 2 :]) or [0]
    return late[len(late) // 2] / 1e6


def ours(folder: Path, quantize: str, repeats: int, cold: bool, warm_only: bool = False) -> dict[str, object]:
    base = [*MISTRAL, "complete", "-m", str(folder), "-q", quantize, "--max-context", "512", "-t", "0"]
    hello = [*base, "-n", "4", "Hello"]
    row: dict[str, object] = {"engine": "ours", "quantize": quantize}
    print(f"# ours {quantize}", flush=True)
    if warm_only:  # the prepared file kept (made by the first call when there is none), the full path beside it
        wall(hello)
        row["warm_s"] = min(wall(hello)[0] for _ in range(repeats))
        row["warm_note"] = wall([*hello, "-v"])[1].stderr.splitlines()[0]
        full = {**os.environ, "MISTRAL_QUICK": "off"}
        row["warm_full_path_s"] = min(wall(hello, full)[0] for _ in range(repeats))
        return row
    subprocess.run([*MISTRAL, "info", "--prune", str(folder)], capture_output=True, check=True)
    wall([*hello, "--no-prepare"])  # the checkpoint into the page cache, as for "today's" second call
    row["no_prepare_s"] = min(wall([*hello, "--no-prepare"])[0] for _ in range(repeats))
    row["first_s"], r = wall([*hello, "-v"])
    row["first_note"] = r.stderr.splitlines()[0]
    row["warm_s"] = min(wall(hello)[0] for _ in range(repeats))
    _, r = wall([*hello, "-v"])
    row["warm_note"] = r.stderr.splitlines()[0]
    info = json.loads(wall([*MISTRAL, "info", "--json", "-q", quantize, str(folder)])[1].stdout)
    prepared = [p["path"] for p in info["prepared"] if p["quantize"] == quantize]
    if cold and prepared and drop_caches():
        row["cold_s"] = wall(hello)[0]
        drop_caches()
        row["cat_prepared_s"] = read_time(prepared[0])
        wall(hello)  # warm again
    decode = [*base, "-n", "32", "--json", "Hello"]
    mapped = max(json.loads(wall(decode)[1].stdout)["timings"]["decode_tokens_per_s"] for _ in range(repeats))
    copied = max(json.loads(wall([*decode, "--no-prepare"])[1].stdout)["timings"]["decode_tokens_per_s"]
                 for _ in range(repeats))  # fmt: skip
    row["decode_mapped"], row["decode_copied"] = mapped, copied
    long = [*base, "-n", "48", "Hello"]
    row["pss_one_gb"] = concurrent_pss(long, 1)
    row["pss_two_gb"] = concurrent_pss(long, 2)
    return row


def llama(folder: Path, quantize: str, convert: list[str], work: Path, repeats: int, cold: bool) -> dict[str, object]:
    bf16 = work / "model-bf16.gguf"
    if not bf16.exists():
        subprocess.run([*convert, str(folder), "--outtype", "bf16", "--outfile", str(bf16)], check=True)
    path = bf16
    if quantize != "none":
        path = work / f"model-{LLAMA_TYPES[quantize].lower()}.gguf"
        if not path.exists():
            code = (
                "import ctypes, llama_cpp, sys\n"
                "p = llama_cpp.llama_model_quantize_default_params()\n"
                f"p.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_{LLAMA_TYPES[quantize]}\n"
                f"llama_cpp.llama_model_quantize({str(bf16)!r}.encode(), {str(path)!r}.encode(), ctypes.byref(p))\n"
            )
            subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    hello = [
        sys.executable, "-c",
        "import sys; from llama_cpp import Llama\n"
        f"m = Llama({str(path)!r}, n_ctx=512, verbose=False)\n"
        "sys.stdout.write(m('Hello', max_tokens=4, temperature=0)['choices'][0]['text'])\n",
    ]  # fmt: skip
    row: dict[str, object] = {"engine": f"llama.cpp {LLAMA_TYPES[quantize]}", "quantize": quantize}
    row["first_s"] = wall(hello)[0]
    row["warm_s"] = min(wall(hello)[0] for _ in range(repeats))
    if cold and drop_caches():
        row["cold_s"] = wall(hello)[0]
        drop_caches()
        row["cat_prepared_s"] = read_time(str(path))
        wall(hello)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", type=Path, required=True, help="the random checkpoint (written if absent)")
    ap.add_argument("--shape", default="7b")
    ap.add_argument("--quantize", nargs="+", default=["none", "int8", "int4"])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--no-cold", action="store_true", help="skip the runs after dropping the page cache")
    ap.add_argument(
        "--warm-only",
        action="store_true",
        help="only warm calls: ours on the quick path and on the full path (MISTRAL_QUICK=off), llama.cpp",
    )
    ap.add_argument("--llama-cpp-convert", help="llama.cpp's convert_hf_to_gguf.py: also run llama.cpp")
    ap.add_argument("--convert-python", default=sys.executable, help="the Python that runs the converter (numpy, gguf)")
    ap.add_argument("--gguf-dir", type=Path, help="keep the GGUF files here (default: a temporary folder)")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args()
    if not (args.model_dir / "config.json").exists():
        from checkpoints import SHAPES, write_checkpoint

        write_checkpoint(args.model_dir, SHAPES[args.shape])
    flags = (
        sorted(
            {
                f
                for f in Path("/proc/cpuinfo").read_text().split()
                if f.startswith(("avx512_bf16", "avx512_vnni", "avx_vnni", "avx2", "amx"))
            }
        )
        if Path("/proc/cpuinfo").exists()
        else []
    )  # noqa: E501
    print(f"# {platform.machine()}, {os.cpu_count()} cores, flags: {' '.join(flags)}; load {os.getloadavg()[0]:.2f}")
    rows = []
    work = args.gguf_dir or Path(tempfile.mkdtemp(prefix="startup-gguf-", dir=args.model_dir.parent))
    work.mkdir(parents=True, exist_ok=True)
    convert = [args.convert_python, args.llama_cpp_convert]
    try:
        for q in args.quantize:
            rows.append(ours(args.model_dir, q, args.repeats, not args.no_cold, args.warm_only))
            print(json.dumps(rows[-1]), flush=True)
            if args.llama_cpp_convert:
                cold = not (args.no_cold or args.warm_only)
                rows.append(llama(args.model_dir, q, convert, work, args.repeats, cold))
                print(json.dumps(rows[-1]), flush=True)
    finally:
        if args.gguf_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
