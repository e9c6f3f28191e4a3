"""Where a decode step's and a prompt's time goes on a CUDA GPU, and what the alternatives to each product cost.

    python benchmarks/cuda_step.py [--shape 7b-8] [--prompt 512]

A random model (drawn on the GPU, bf16; no files) with 7B's layer shapes. Reported, as markdown:

- a decode step: GPU milliseconds per step queued back to back (what greedy decoding with queued steps can reach)
  and the host's milliseconds to issue one, for the eager step over a growing cache, the eager masked step and the
  replayed CUDA graph (bf16, int8, int4); the prompt likewise;
- each step's and the prompt's kernels by GPU time (torch.profiler);
- every single-row product of the step, alone in a CUDA graph (GPU time only), in each formulation: F.linear,
  torch.mv, cuBLASLt, 8 rows; int8 on torch's kernel and dequantized; int4 dequantized and on torch's tinygemm.

Figures are GB/s of weights read. Nothing here is a test: it prints what it measured.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from checkpoints import SHAPES, VOCAB  # noqa: E402
from mistral_cli.engine.engine import Engine  # noqa: E402
from mistral_cli.model import quant  # noqa: E402
from mistral_cli.model.config import ModelConfig  # noqa: E402
from mistral_cli.model.placement import Placement  # noqa: E402
from mistral_cli.model.transformer import Linear, Transformer  # noqa: E402


def random_model(shape: str, device: torch.device) -> Transformer:
    cfg = ModelConfig(**SHAPES[shape], vocab_size=VOCAB)
    with torch.device(device):
        model = Transformer(cfg).to(torch.bfloat16)
    g = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0)
            else:
                std = 1.0 if name.startswith("tok_") else p.shape[1] ** -0.5
                p.copy_(torch.randn(p.shape, generator=g, device=device) * std)
    return model.eval().requires_grad_(False)


def timed(fn: Callable[[], object], n: int, device: torch.device, reps: int = 3) -> tuple[float, float]:
    """(device ms per call, host ms per call): n calls queued back to back, best of reps."""
    fn()
    sync(device)
    best_dev, best_host = float("inf"), float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        for _ in range(n):
            fn()
        host = (time.perf_counter() - t) * 1e3 / n
        if device.type == "cuda":
            end.record()
            end.synchronize()
            dev = start.elapsed_time(end) / n
        else:
            dev = (time.perf_counter() - t) * 1e3 / n
        best_dev, best_host = min(best_dev, dev), min(best_host, host)
    return best_dev, best_host


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def graphed_ms(fn: Callable[[], object], device: torch.device, n: int = 20) -> float:
    """GPU ms per call of fn, n calls captured in one CUDA graph (no launch cost); eager timing off a GPU."""
    if device.type != "cuda":
        return timed(fn, n, device)[0]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(n):
            fn()
    return timed(graph.replay, 1, device, reps=5)[0] / n


def top_kernels(fn: Callable[[], object], device: torch.device, title: str, rows: int = 12) -> None:
    from torch.profiler import ProfilerActivity, profile

    fn()
    sync(device)
    activity = ProfilerActivity.CUDA if device.type == "cuda" else ProfilerActivity.CPU
    with profile(activities=[activity]) as prof:
        fn()
        sync(device)
    events = prof.key_averages()

    attrs = ("device_time_total", "cuda_time_total") if device.type == "cuda" else ("self_cpu_time_total",)

    def device_us(e: object) -> float:
        return next((float(getattr(e, a)) for a in attrs if hasattr(e, a)), 0.0)

    events = sorted(events, key=device_us, reverse=True)
    total = sum(device_us(e) for e in events if device_us(e) > 0)
    print(f"\n#### {title}: kernels by GPU time (total {total / 1e3:.2f} ms)\n")
    print("| kernel | calls | ms | share |\n|---|---|---|---|")
    for e in events[:rows]:
        us = device_us(e)
        print(f"| `{e.key[:90]}` | {e.count} | {us / 1e3:.3f} | {us / max(total, 1e-9):.0%} |")


def decode_steps(model: Transformer, device: torch.device, prompt: list[int], graphs: bool, masked: bool) -> Engine:
    engine = Engine(model, None, Placement(device, torch.bfloat16), len(prompt) + 400, graphs=graphs)  # type: ignore[arg-type]
    engine.prefill(prompt)
    if masked:  # the eager masked step a graph replays: whole buffers, positions as a tensor
        cache = engine.cache

        def masked_step(token: int | torch.Tensor, _engine: Engine = engine) -> torch.Tensor:
            pos = len(_engine.tokens)
            cache.reserve(pos + 1)
            x = token.view(1, 1) if isinstance(token, torch.Tensor) else torch.full((1, 1), token, device=device)
            logits = model.decode_step(x, cache, torch.full((1,), pos, device=device))
            cache.length = pos + 1
            return logits[0, -1]

        engine._one_step = masked_step  # type: ignore[method-assign]
    return engine


def step_row(name: str, engine: Engine, device: torch.device, weight_gb: float, profile: bool) -> None:
    state = {"token": torch.tensor(5, device=device)}

    @torch.inference_mode()
    def one() -> None:
        logits = engine._one_step(state["token"])
        engine.tokens.append(0)
        state["token"] = logits.argmax()

    dev, host = timed(one, 20, device)
    print(f"| {name} | {dev:.2f} | {host:.2f} | {1e3 / dev:.0f} | {weight_gb / dev * 1e3:.0f} |")
    if profile:
        top_kernels(one, device, name)


def products(model: Transformer, device: torch.device) -> None:
    layer = model.layers[0]
    shapes = {
        "wqkv": layer.attention.wqkv.weight,
        "wo": layer.attention.wo.weight,
        "w13": layer.feed_forward.w13.weight,
        "w2": layer.feed_forward.w2.weight,
        "output": model.output.weight,
    }
    print("\n### One row times each weight, alone in a CUDA graph: GB/s of weights read\n")
    head = [
        "F.linear",
        "torch.mv",
        "cuBLASLt",
        "8 rows",
        "int8 kernel",
        "int8 dequant",
        "int4 dequant",
        "int4 tinygemm",
    ]
    print("| weight | " + " | ".join(head) + " |\n|---|" + "---|" * len(head))
    for name, w in shapes.items():
        product_row(name, w, device)


def product_row(name: str, w: torch.Tensor, device: torch.device) -> None:
    N, K = w.shape
    x = torch.randn(1, 1, K, device=device, dtype=torch.bfloat16)
    x8 = torch.randn(8, K, device=device, dtype=torch.bfloat16)
    cells = []

    def gbs(fn: Callable[[], object], nbytes: int) -> str:
        try:
            with torch.inference_mode():
                return f"{nbytes / graphed_ms(fn, device) / 1e6:.0f}"
        except Exception as e:  # noqa: BLE001 - a formulation this torch or GPU lacks
            return f"({type(e).__name__})"

    cells.append(gbs(lambda: F.linear(x, w), w.nbytes))
    cells.append(gbs(lambda: torch.mv(w, x.view(-1)), w.nbytes))
    old = torch.backends.cuda.preferred_blas_library() if device.type == "cuda" else None

    def with_lt() -> torch.Tensor:
        return F.linear(x, w)

    if device.type == "cuda":
        torch.backends.cuda.preferred_blas_library("cublaslt")
        cells.append(gbs(with_lt, w.nbytes))
        torch.backends.cuda.preferred_blas_library(old)
    else:
        cells.append("-")
    cells.append(gbs(lambda: F.linear(x8, w), w.nbytes))
    q8 = quant.WeightOnlyInt8Linear(w)
    cells.append(
        gbs(lambda: torch.ops.aten._weight_int8pack_mm(x.view(1, K), q8.weight, q8.scales.to(torch.bfloat16)),
            q8.weight.nbytes)
    )  # fmt: skip
    w8 = q8.weight
    s8 = q8.scales.to(torch.bfloat16)
    cells.append(gbs(lambda: F.linear(x, w8.to(torch.bfloat16)) * s8, w8.nbytes))
    q4 = quant.WeightOnlyInt4Linear(w)
    q4_bytes = q4.weight.nbytes + q4.scales_and_zeros.nbytes
    cells.append(gbs(lambda: q4(x), q4_bytes))
    try:
        codes = torch.stack([q4.weight & 15, q4.weight >> 4], dim=-1).reshape(N, K)
        packed = torch.ops.aten._convert_weight_to_int4pack((codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8), 8)
        sz = q4.scales_and_zeros.to(torch.bfloat16)
        ref = q4(x.view(1, K)).float()
        got = torch.ops.aten._weight_int4pack_mm(x.view(1, K), packed, q4.group, sz).float()
        err = float((got - ref).norm() / ref.norm())
        cells.append(gbs(lambda: torch.ops.aten._weight_int4pack_mm(x.view(1, K), packed, q4.group, sz),
                         q4_bytes) + f" (err {err:.3f})")  # fmt: skip
    except Exception as e:  # noqa: BLE001
        cells.append(f"({type(e).__name__}: {str(e)[:60]})")
    print(f"| {name} {N}x{K} | " + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=list(SHAPES), default="7b-8")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    model = random_model(args.shape, device)
    weight_gb = model.decode_bytes() / 1e9
    prompt = [1, *torch.randint(3, VOCAB, (args.prompt - 1,), generator=torch.Generator().manual_seed(1)).tolist()]
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"## {args.shape} ({weight_gb:.2f} GB read per step), bf16, on {name}, torch {torch.__version__}\n")

    print("### The prompt\n")
    engine = Engine(model, None, Placement(device, torch.bfloat16), args.prompt + 8)  # type: ignore[arg-type]

    def prefill() -> None:
        engine.reset()
        engine.prefill(prompt)

    with torch.inference_mode():
        dev, host = timed(prefill, 3, device)
        print(
            f"{args.prompt} tokens: {dev:.1f} ms on the GPU ({args.prompt / dev * 1e3:.0f} tokens/s), host {host:.1f} ms"
        )
        top_kernels(prefill, device, f"prompt of {args.prompt}")
        if device.type == "cuda":
            old = torch.backends.cuda.preferred_blas_library()
            torch.backends.cuda.preferred_blas_library("cublaslt")
            dev, host = timed(prefill, 3, device)
            torch.backends.cuda.preferred_blas_library(old)
            print(f"\nwith cuBLASLt: {dev:.1f} ms on the GPU ({args.prompt / dev * 1e3:.0f} tokens/s)")

    print("\n### Decode steps queued back to back\n")
    print("| step | GPU ms | host ms to issue | tokens/s | GB/s |\n|---|---|---|---|---|")
    cuda = device.type == "cuda"
    variants = [("eager, growing cache", False, False), ("eager, masked (what a graph holds)", False, True)]
    if cuda:
        variants.append(("CUDA graph", True, False))
    for label, graphs, masked in variants:
        step_row(label, decode_steps(model, device, prompt, graphs, masked), device, weight_gb, profile=True)
    if cuda:
        old = torch.backends.cuda.preferred_blas_library()
        torch.backends.cuda.preferred_blas_library("cublaslt")
        step_row("CUDA graph, cuBLASLt", decode_steps(model, device, prompt, True, False), device, weight_gb, False)
        torch.backends.cuda.preferred_blas_library(old)
        forward = Linear.forward

        def mv_forward(self: Linear, x: torch.Tensor) -> torch.Tensor:
            if x.numel() == x.shape[-1]:
                return torch.mv(self.weight, x.reshape(-1)).view(*x.shape[:-1], -1)
            return forward(self, x)

        Linear.forward = mv_forward  # type: ignore[method-assign]
        step_row("CUDA graph, torch.mv", decode_steps(model, device, prompt, True, False), device, weight_gb, False)
        step_row("eager, torch.mv", decode_steps(model, device, prompt, False, False), device, weight_gb, False)
        Linear.forward = forward  # type: ignore[method-assign]
    # the two step compositions, each captured ten times in one graph: is the masked step's own work slow under a
    # graph, or any step's? (GPU time only: no launches)
    engine = decode_steps(model, device, prompt, False, False)
    pos, x = len(engine.tokens), torch.full((1, 1), 5, device=device)
    engine.cache.reserve(pos + 1)
    at = torch.full((1,), pos, device=device)
    with torch.inference_mode():
        plain = graphed_ms(lambda: model(x, engine.cache, pos), device, n=10)
        masked = graphed_ms(lambda: model.decode_step(x, engine.cache, at), device, n=10)
    print(f"\nOne step in a graph (GPU ms): the eager composition {plain:.2f}, the masked one {masked:.2f}")
    products(model, device)

    for mode in ("int8", "int4"):
        qmodel = random_model(args.shape, device)
        quant.quantize_model(qmodel, mode)
        gb = qmodel.decode_bytes() / 1e9
        print(f"\n### {mode} ({gb:.2f} GB per step)\n")
        print("| step | GPU ms | host ms to issue | tokens/s | GB/s |\n|---|---|---|---|---|")
        step_row(f"{mode} eager", decode_steps(qmodel, device, prompt, False, False), device, gb, profile=True)
        if cuda:
            step_row(f"{mode} CUDA graph", decode_steps(qmodel, device, prompt, True, False), device, gb, False)
        del qmodel
        if cuda:
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
