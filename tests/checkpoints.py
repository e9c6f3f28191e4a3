"""Random bf16 checkpoints with Mistral's shapes, up to the full 7B, in HF layout, written a shard at a time.

The one writer for checkpoints too large to build in memory first: tests/test_load_memory.py uses it, and so does
the benchmark (benchmarks/bench.py puts this folder on sys.path). The tensors are drawn one at a time, in file order,
and each shard is saved as soon as it is full, so about one shard is in memory at once (5 GB, as in the published
checkpoint). For small models held in memory and written in every format, see tiny.py, whose config, tokenizer and
shard layout this file shares.

Weights: normal with standard deviation 1/sqrt(fan-in) (the embedding table 1), norms of ones, and an output row of
zeros for EOS so that greedy decoding never stops early. They are drawn differently from tiny.random_state_dict and
must stay as they are: the benchmark's published results were measured on them.

Nothing but the standard library is imported at module level: the benchmark imports this file in every run and
leaves it to each run to import torch.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

SHAPES: dict[str, dict[str, Any]] = {
    # tiny: for smoke tests only
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=128),
    # ~175M parameters with Mistral's proportions (GQA 4:1, MLP 3.5x); 349 MB in bf16, far larger than the caches
    "small": dict(dim=1024, n_layers=8, n_heads=16, n_kv_heads=4, head_dim=64, hidden_dim=3584),
    "7b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128, hidden_dim=14336),
    # 7B's blocks, 8 of them: a decode step's products as in 7B, in 4 GB of bf16, so that two engines' files fit in
    # the memory of a 24 GB machine together and can be timed alternately (benchmarks only)
    "7b-8": dict(dim=4096, n_layers=8, n_heads=32, n_kv_heads=8, head_dim=128, hidden_dim=14336),
}
VOCAB = 32000
EOS = 2
SHARD_BYTES = 5 * 10**9  # like the published checkpoint: shards of about 5 GB


def n_params(shape: dict[str, Any]) -> int:
    d, h, kv, hd, f, n = (shape[k] for k in ("dim", "n_heads", "n_kv_heads", "head_dim", "hidden_dim", "n_layers"))
    return n * (d * hd * (2 * h + 2 * kv) + 3 * d * f + 2 * d) + 2 * VOCAB * d + d


def write_checkpoint(
    folder: Path, shape: dict[str, Any], seed: int = 0, device: str = "cpu", shard_bytes: int = SHARD_BYTES
) -> Path:
    """Random bf16 weights in HF layout (always sharded, with an index), drawn on `device`, written a shard at a time;
    config.json and the v1 tokenizer beside them."""
    import torch

    from tiny import TinySpec, hf_config, save_shards, tokenizer_path

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator(device).manual_seed(seed)
    d, hd, f = shape["dim"], shape["head_dim"], shape["hidden_dim"]
    q, kv = shape["n_heads"] * hd, shape["n_kv_heads"] * hd

    def randn(*size: int, std: float) -> torch.Tensor:
        return (torch.randn(*size, generator=g, device=device) * std).to(torch.bfloat16).cpu()

    def tensors():
        yield "model.embed_tokens.weight", randn(VOCAB, d, std=1.0)
        for i in range(shape["n_layers"]):
            p = f"model.layers.{i}."
            yield p + "input_layernorm.weight", torch.ones(d, dtype=torch.bfloat16)
            for name, rows, cols in (
                ("self_attn.q_proj", q, d),
                ("self_attn.k_proj", kv, d),
                ("self_attn.v_proj", kv, d),
                ("self_attn.o_proj", d, q),
                ("mlp.gate_proj", f, d),
                ("mlp.up_proj", f, d),
                ("mlp.down_proj", d, f),
            ):
                yield p + name + ".weight", randn(rows, cols, std=cols**-0.5)
            yield p + "post_attention_layernorm.weight", torch.ones(d, dtype=torch.bfloat16)
        yield "model.norm.weight", torch.ones(d, dtype=torch.bfloat16)
        head = randn(VOCAB, d, std=d**-0.5)
        head[EOS] = 0  # an EOS logit of 0 is never the largest of 32000: greedy decoding never stops early
        yield "lm_head.weight", head

    def shards():
        """The tensors in file order, cut into shards of at most shard_bytes (a larger tensor gets one to itself)."""
        shard: dict[str, torch.Tensor] = {}
        size = 0
        for name, t in tensors():
            if shard and size + t.numel() * 2 > shard_bytes:
                yield shard
                shard, size = {}, 0  # let the saved shard go
            shard[name], size = t, size + t.numel() * 2
        if shard:
            yield shard

    save_shards(folder, shards())
    spec = TinySpec(**shape, vocab_size=VOCAB)  # v0.2's rope_theta, no sliding window, 32K context
    (folder / "config.json").write_text(json.dumps(hf_config(spec), indent=2))
    shutil.copy(tokenizer_path(), folder / "tokenizer.model")
    return folder
