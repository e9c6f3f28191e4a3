"""Loading: a model folder and the load options in, a ready `Engine` out; `load_model` builds the network from a
checkpoint (formats: model/checkpoint.py), quantized as it loads, in our kernels' layouts where they run.

The order is the cheap checks first (config, tokenizer, context), then the device and dtype, chosen once, then the
weights, converted and quantized tensor by tensor as they are read.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from mistral_cli.engine import prepared
from mistral_cli.engine.engine import Engine
from mistral_cli.engine.pacing import Pacer
from mistral_cli.errors import MistralError
from mistral_cli.hardware import adaptive_threads, shared_threads
from mistral_cli.model import quant
from mistral_cli.model.checkpoint import check_size, find_weights, load_state
from mistral_cli.model.config import ModelConfig
from mistral_cli.model.placement import Placement, pick, slow_half_matmul
from mistral_cli.model.transformer import Transformer
from mistral_cli.native import kernels
from mistral_cli.native import quant as native_quant
from mistral_cli.native.decode import use_kernels
from mistral_cli.native.kernels import Kernels
from mistral_cli.options import LoadOptions
from mistral_cli.text.tokenizer import Tokenizer

Progress = Callable[[float], None]


def load_engine(folder: Path, options: LoadOptions, progress: Progress | None = None) -> Engine:
    """The engine for a model folder. `progress(fraction)` is called as the checkpoint is read (not when the
    prepared weights are mapped, which takes no time to speak of)."""
    t0 = time.perf_counter()
    if options.threads is not None:
        torch.set_num_threads(options.threads)
    elif (fewer := shared_threads(torch.get_num_threads())) != torch.get_num_threads():
        torch.set_num_threads(fewer)  # other programs are running: leave them their cores
    cfg = ModelConfig.from_folder(folder)
    tokenizer = Tokenizer(folder / "tokenizer.model")
    problem = cfg.vocab_problem(tokenizer.vocab_size, tokenizer.path) or cfg.context_problem(options.max_context)
    if problem:
        raise MistralError(problem)
    placement = pick(options.device, options.dtype, cfg.n_params)
    # our decode kernels on the CPU (compiled graphs keep torch's: dynamo cannot trace a ctypes call)
    ops = kernels.native() if placement.device.type == "cpu" and not options.compile else None
    weights = find_weights(folder)
    check_size(weights, cfg)
    # mapped from the prepared file, or built from the checkpoint (quantized tensor by tensor as it loads) and then
    # prepared for the next load
    outcome = prepared.load_or_prepare(
        weights.files, cfg, placement.device, placement.dtype, options.quantize, ops,
        partial(load_model, folder, placement, cfg, quantize=options.quantize, kernels=ops, progress=progress),
        enabled=options.prepare,
    )  # fmt: skip
    model = outcome.model
    fused = use_kernels(model, ops) if ops is not None else None
    context = options.max_context or cfg.max_context
    load_s = time.perf_counter() - t0
    engine = Engine(
        model, tokenizer, placement, context, load_s, quantize=options.quantize, compile=options.compile, fused=fused
    )
    engine.weights_note, engine.weights_warning = outcome.note, outcome.warning
    engine.reading = outcome.reading
    # only on our whole-step kernels, where the thread count changes no result (torch's may round differently)
    if fused is not None and (most := adaptive_threads(options.threads)) is not None:
        engine.pacer = Pacer(most, torch.get_num_threads())
    return engine


def load_model(
    folder: Path,
    placement: Placement,
    cfg: ModelConfig | None = None,
    *,
    quantize: str = "none",
    kernels: Kernels | None = None,
    progress: Progress | None = None,
) -> Transformer:
    """Build the network on the meta device and fill it straight from the checkpoint, one tensor at a time.

    With quantize ("int8", "int4") each linear weight is quantized as it arrives and its float tensor dropped, so
    the float model never exists in memory as a whole. `kernels`: our CPU kernels (native.kernels.native()), for
    which quantized layers then store their weights in the kernels' layout; native.decode.use_kernels wires the
    kernels into the loaded model.
    """
    cfg = cfg or ModelConfig.from_folder(folder)
    weights = find_weights(folder)
    check_size(weights, cfg)
    quantized = quant.quantized_linear if kernels is None else partial(native_quant.quantized_linear, kernels=kernels)
    with torch.device("meta"):
        model = Transformer(cfg)
    upcast = slow_half_matmul(placement)
    state = {}
    done = 0
    # quantizing: the parts of q/k/v and gate/up are quantized where they lie, with no float concatenation
    for name, tensor in load_state(weights, cfg, placement, fuse=quantize == "none"):
        if progress is not None:
            done += sum(t.numel() for t in (tensor if isinstance(tensor, list) else [tensor]))
            progress(min(done / cfg.n_params, 1.0))
        if quantize != "none" and quant.is_quantized_layer(name):
            layer = name.removesuffix(".weight")
            quant.replace_module(model, layer, quantized(layer, tensor, quantize, upcast=upcast))
        else:
            state[name] = tensor
    model.load_state_dict(state, strict=quantize == "none", assign=True)
    model.set_upcast(upcast)
    return model.eval().requires_grad_(False)
