"""What the CLI says about a loaded engine: the hardware line of `--verbose`, the chat banner and `/info`."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mistral_cli.engine.engine import Engine


def hardware(engine: Engine) -> str:
    """'cpu bf16 int4, AVX2 + AVX512-BF16 + AVX512-VNNI kernels, 2 threads' or 'cuda bf16' (', CUDA graphs' where on)."""
    import torch

    parts = [str(engine.placement) + ("" if engine.quantize == "none" else f" {engine.quantize}")]
    if engine.graph is not None:
        problem = engine.graph.problem
        parts.append("CUDA graphs" if problem is None else f"no CUDA graphs ({problem})")
    if engine.native:
        from mistral_cli.native import kernels

        parts.append(kernels.label())
    elif engine.native_problem:
        parts.append(f"torch kernels ({engine.native_problem})")
    if engine.placement.device.type == "cpu":
        from mistral_cli.hardware import SHARED_CPU

        n = torch.get_num_threads()
        parts.append(f"{n} thread{'s' if n != 1 else ''}" + (f" ({SHARED_CPU})" if SHARED_CPU else ""))
    return ", ".join(parts)
