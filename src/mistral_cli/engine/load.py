"""Loading: a model folder and the load options in, a ready `Engine` out.

The order is the cheap checks first (config, tokenizer, context), then the device and dtype, chosen once, then the
weights, converted and quantized tensor by tensor as they are read.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from mistral_cli.engine.engine import Engine
from mistral_cli.errors import MistralError
from mistral_cli.model.checkpoint import load_model
from mistral_cli.model.config import ModelConfig
from mistral_cli.model.placement import pick
from mistral_cli.native import kernels
from mistral_cli.native.decode import use_kernels
from mistral_cli.options import LoadOptions
from mistral_cli.text.tokenizer import Tokenizer


def load_engine(folder: Path, options: LoadOptions) -> Engine:
    t0 = time.perf_counter()
    if options.threads is not None:
        torch.set_num_threads(options.threads)
    cfg = ModelConfig.from_folder(folder)
    tokenizer = Tokenizer(folder / "tokenizer.model")
    if tokenizer.vocab_size != cfg.vocab_size:
        raise MistralError(
            f"{folder / 'tokenizer.model'} has {tokenizer.vocab_size} tokens but the model expects "
            f"{cfg.vocab_size}: the tokenizer does not belong to this model."
        )
    if options.max_context is not None and options.max_context > cfg.max_context:
        raise MistralError(
            f"--max-context must be between 1 and the model's {cfg.max_context}, not {options.max_context}."
        )
    placement = pick(options.device, options.dtype, cfg.n_params)
    # our decode kernels on the CPU (compiled graphs keep torch's: dynamo cannot trace a ctypes call)
    ops = kernels.native() if placement.device.type == "cpu" and not options.compile else None
    # quantized tensor by tensor as it loads
    model = load_model(folder, placement, cfg, quantize=options.quantize, kernels=ops)
    fused = use_kernels(model, ops) if ops is not None else None
    context = options.max_context or cfg.max_context
    load_s = time.perf_counter() - t0
    return Engine(
        model, tokenizer, placement, context, load_s, quantize=options.quantize, compile=options.compile, fused=fused
    )
