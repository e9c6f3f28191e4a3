"""Serving benchmark: time to first token and requests per second through `mistral serve` (the official `openai`
client, streamed completions over loopback HTTP), against the same prompts run on an engine in this process.

    python benchmarks/serve.py --model-dir /path/to/7b --quantize int8 --prompt-tokens 128 --max-tokens 32

The difference is what the server adds: HTTP, JSON, server-sent events, the queue and the hand-over between the
event loop and the engine's thread. Each request's prompt starts with its own number, so only BOS is reused from
the cache, in both runs. The checkpoint is written by the tests' writer (tests/checkpoints.py) when the folder does
not hold one. The engine in this process is freed before the server starts: the two never share the cores.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def prompts(n: int, tokens: int) -> list[str]:
    return [f"Request {i}: " + " ".join(["word"] * tokens) for i in range(n)]


def direct(folder: Path, args: argparse.Namespace, texts: list[str]) -> list[tuple[float, float]]:
    """(time to first token, whole request) for each prompt on an engine in this process, as the server runs it."""
    from mistral_cli.engine.events import Chunk
    from mistral_cli.engine.load import load_engine
    from mistral_cli.options import GenerationOptions, LoadOptions

    engine = load_engine(folder, LoadOptions(dtype=args.dtype, quantize=args.quantize, max_context=args.max_context))
    options = GenerationOptions(max_tokens=args.max_tokens, temperature=0)
    tok = engine.tokenizer
    times = []
    for text in [texts[0], *texts]:  # the first one again, unmeasured: the kernels' first call
        t0 = time.perf_counter()
        first = None
        for event in engine.generate([tok.bos_id, *tok.encode(text)], options, leading_space=True):
            if first is None and isinstance(event, Chunk):
                first = time.perf_counter() - t0
        times.append((first or 0.0, time.perf_counter() - t0))
    del engine
    gc.collect()
    return times[1:]


class Server:
    """`mistral serve` in a subprocess on a free loopback port."""

    def __init__(self, folder: Path, args: argparse.Namespace) -> None:
        command = [sys.executable, "-m", "mistral_cli", "serve", str(folder), "--port", "0", "--dtype", args.dtype,
                   "-q", args.quantize, "--max-context", str(args.max_context), "--queue", "64"]  # fmt: skip
        self.proc = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            if m := re.search(r"serving \S+ on (\S+) ", line):
                self.url = m[1]
                break
        else:
            raise SystemExit(f"mistral serve did not start (exit {self.proc.wait()})")
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        for _ in self.proc.stderr or ():  # its log of each request, read so that the pipe never fills
            pass

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)


def served(
    url: str, args: argparse.Namespace, texts: list[str], clients: int
) -> tuple[list[tuple[float, float]], float]:
    """(time to first token, whole request) for each prompt sent by `clients` threads at once; and the wall time."""
    import openai

    api = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
    api.completions.create(model="m", prompt=texts[0], max_tokens=args.max_tokens, temperature=0)  # warm up
    times: list[tuple[float, float]] = []
    queue = list(texts)
    lock = threading.Lock()

    def client() -> None:
        while True:
            with lock:
                if not queue:
                    return
                text = queue.pop(0)
            t0 = time.perf_counter()
            first = None
            stream = api.completions.create(model="m", prompt=text, max_tokens=args.max_tokens, temperature=0,
                                            stream=True)  # fmt: skip
            for chunk in stream:
                if first is None and chunk.choices and chunk.choices[0].text:
                    first = time.perf_counter() - t0
            with lock:
                times.append((first or 0.0, time.perf_counter() - t0))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return times, time.perf_counter() - t0


def row(name: str, times: list[tuple[float, float]], wall: float) -> dict[str, Any]:
    ttft = sorted(t[0] for t in times)
    return {
        "run": name,
        "requests": len(times),
        "ttft_median_ms": round(statistics.median(ttft) * 1e3, 1),
        "ttft_p90_ms": round(ttft[min(len(ttft) - 1, int(0.9 * len(ttft)))] * 1e3, 1),
        "request_median_s": round(statistics.median(t[1] for t in times), 3),
        "requests_per_s": round(len(times) / wall, 2),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", type=Path, required=True, help="the random checkpoint (written if absent)")
    ap.add_argument("--shape", default="7b", help="of the checkpoint written when the folder has none")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--quantize", default="none")
    ap.add_argument("--max-context", type=int, default=4096)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4], help="concurrent clients of each served run")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args(argv)
    if not (args.model_dir / "config.json").exists():
        from checkpoints import SHAPES, write_checkpoint

        write_checkpoint(args.model_dir, SHAPES[args.shape])
    texts = prompts(args.requests, args.prompt_tokens)
    print(f"# {platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}; {args.model_dir.name}, "
          f"{args.dtype} {args.quantize}, prompts of ~{args.prompt_tokens} tokens, {args.max_tokens} generated")  # fmt: skip

    times = direct(args.model_dir, args, texts)
    rows = [row("direct (engine in this process)", times, sum(t[1] for t in times))]
    server = Server(args.model_dir, args)
    try:
        for clients in args.clients:
            times, wall = served(server.url, args, texts, clients)
            rows.append(row(f"mistral serve, {clients} client{'s' * (clients != 1)}", times, wall))
    finally:
        server.stop()

    print("| run | requests | TTFT median (ms) | TTFT p90 (ms) | request median (s) | requests/s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(str(v) for v in r.values()) + " |")
    base = rows[0]["ttft_median_ms"]
    for r in rows[1:]:
        print(f"# {r['run']}: time to first token {r['ttft_median_ms'] - base:+.1f} ms against direct")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
