"""The network against transformers' MistralForCausalLM on the same random weights, and the cache against itself."""

from __future__ import annotations

import pytest
import torch

from mistral_cli.engine.load import load_model
from mistral_cli.model.config import ModelConfig
from mistral_cli.model.placement import Placement
from tiny import V01, TinySpec, hf_reference, random_state_dict, write_hf, write_native

FP32 = Placement(torch.device("cpu"), torch.float32)

SPECS = {
    "default": TinySpec(),
    "mha": TinySpec(n_heads=4, n_kv_heads=4),
    "mqa": TinySpec(n_heads=6, n_kv_heads=1, dim=48, head_dim=8),
    "head-dim-not-width-over-heads": TinySpec(dim=64, n_heads=4, n_kv_heads=2, head_dim=32),
    "v0.1-sliding-window": V01,
    "three-layers": TinySpec(n_layers=3, hidden_dim=96, rope_theta=5e5),
}


def _tokens(n: int, seed: int = 0, vocab: int = 32000) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.tensor([1]), torch.randint(3, vocab, (n - 1,), generator=g)])[None]


def _load(tmp_path, spec, sd, fmt="hf", **kw):
    if fmt == "hf":
        folder = write_hf(tmp_path / "hf", spec, sd, **kw)
    else:
        folder = write_native(tmp_path / f"native-{fmt}", spec, sd, fmt=fmt, **kw)
    return load_model(folder, FP32)


def _full_logits(model, tokens):
    cache = model.new_cache()
    with torch.inference_mode():
        return model(tokens, cache, 0)


@pytest.mark.parametrize("name", list(SPECS))
def test_logits_match_transformers(tmp_path, name):
    spec = SPECS[name]
    sd = random_state_dict(spec, seed=1)
    ours = _load(tmp_path, spec, sd)
    ref = hf_reference(spec, sd)
    tokens = _tokens(20, seed=2)  # longer than V01's window of 6
    with torch.inference_mode():
        expected = ref(tokens).logits
    got = _full_logits(ours, tokens)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_sliding_window_matters(tmp_path):
    # Guard against a test that passes because the window is ignored on both sides.
    sd = random_state_dict(V01, seed=1)
    windowed = _full_logits(_load(tmp_path / "a", V01, sd), _tokens(20))
    full = _full_logits(_load(tmp_path / "b", V01.but(sliding_window=None), sd), _tokens(20))
    assert not torch.allclose(windowed[:, 10:], full[:, 10:], atol=1e-3)
    torch.testing.assert_close(windowed[:, :6], full[:, :6])


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_native_and_hf_give_identical_logits(tmp_path, fmt, tiny_spec, tiny_sd):
    tokens = _tokens(12)
    hf = _full_logits(_load(tmp_path, tiny_spec, tiny_sd), tokens)
    native = _full_logits(_load(tmp_path, tiny_spec, tiny_sd, fmt=fmt), tokens)
    assert torch.equal(hf, native)


def test_sharded_and_rope_parameters_config(tmp_path, tiny_spec, tiny_sd):
    tokens = _tokens(12)
    single = _full_logits(_load(tmp_path / "a", tiny_spec, tiny_sd), tokens)
    sharded = _full_logits(_load(tmp_path / "b", tiny_spec, tiny_sd, shards=3, rope_parameters=True), tokens)
    assert torch.equal(single, sharded)


@pytest.mark.parametrize("spec", [TinySpec(), V01], ids=["v0.2", "v0.1-window"])
def test_cached_decoding_equals_full_forward(tmp_path, spec):
    model = _load(tmp_path, spec, random_state_dict(spec, seed=3))
    tokens = _tokens(24, seed=4)
    full = _full_logits(model, tokens)
    cache = model.new_cache()
    steps = []
    with torch.inference_mode():
        steps.append(model(tokens[:, :5], cache))  # a prefill of 5, then one token at a time
        for t in range(5, 24):
            steps.append(model(tokens[:, t : t + 1], cache))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-4)
    assert cache.length == 24


def test_truncate_then_continue(tmp_path, tiny_spec, tiny_sd):
    model = _load(tmp_path, tiny_spec, tiny_sd)
    a, b = _tokens(30, seed=5), _tokens(30, seed=6)
    cache = model.new_cache()
    with torch.inference_mode():
        model(a, cache)
        cache.truncate(10)  # keep a's first 10 tokens, continue with a different suffix
        got = model(b[:, 10:], cache)
    expected = _full_logits(model, torch.cat([a[:, :10], b[:, 10:]], dim=1))[:, 10:]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_cache_grows_in_chunks_and_static_cache_agrees(tmp_path, tiny_spec, tiny_sd):
    model = _load(tmp_path, tiny_spec, tiny_sd)
    grown = model.new_cache()
    assert grown.capacity == 0  # nothing allocated before the first token
    static = model.new_cache(max_len=512, static=True)
    assert static.capacity == 512
    tokens = _tokens(300, seed=7)
    with torch.inference_mode():
        a = model(tokens[:, :290], grown)
        b = model(tokens[:, :290], static)
        a2 = [model(tokens[:, t : t + 1], grown) for t in range(290, 300)]
        b2 = [model(tokens[:, t : t + 1], static) for t in range(290, 300)]
    assert 300 <= grown.capacity < tiny_spec.max_context
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat(a2, 1), torch.cat(b2, 1), rtol=1e-5, atol=1e-5)


def test_rope_table_grows_and_holds_each_positions_values(tmp_path, tiny_spec, tiny_sd):
    """Prompts and steps over a growing cache look RoPE up in one table: it must hold what rope_tables computes for
    each position, keep its rows as it grows, and not grow for positions it already covers."""
    from mistral_cli.model.transformer import rope_tables

    model = _load(tmp_path, tiny_spec, tiny_sd)
    cpu = torch.device("cpu")
    cos, sin = model.rope_rows(10, cpu)
    assert cos.shape[0] >= 10 and model.rope_rows(cos.shape[0], cpu)[0] is cos  # covered: the same table
    bigger, _ = model.rope_rows(cos.shape[0] + 1, cpu)
    assert bigger.shape[0] >= 2 * cos.shape[0] and torch.equal(bigger[: cos.shape[0]], cos)
    cos, sin = model.rope_rows(3000, cpu)
    D, theta = tiny_spec.head_dim, tiny_spec.rope_theta
    for pos in (0, 1, 255, 256, 511, 512, 2999):
        one_cos, one_sin = rope_tables(torch.tensor([pos]), D, theta, cos.dtype)
        torch.testing.assert_close(cos[pos : pos + 1], one_cos, rtol=0, atol=1e-6)
        torch.testing.assert_close(sin[pos : pos + 1], one_sin, rtol=0, atol=1e-6)


def test_greedy_generation_matches_transformers_generate(tmp_path, tiny_spec, tiny_sd):
    model = _load(tmp_path, tiny_spec, tiny_sd)
    ref = hf_reference(tiny_spec, tiny_sd)
    prompt = _tokens(7, seed=8)
    with torch.inference_mode():
        expected = ref.generate(prompt, max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0)
    expected = expected[0, 7:].tolist()
    cache = model.new_cache()
    got = []
    with torch.inference_mode():
        logits = model(prompt, cache, last_only=True)
        for _ in range(32):
            nxt = int(logits[0, -1].argmax())
            got.append(nxt)
            logits = model(torch.tensor([[nxt]]), cache)
    assert got == expected


def test_config_rules():
    base = {"dim": 64, "n_layers": 2, "n_heads": 4, "hidden_dim": 128, "vocab_size": 32000, "norm_eps": 1e-5}
    v01 = ModelConfig.from_params_json({**base, "sliding_window": 4096})
    assert (v01.rope_theta, v01.sliding_window, v01.max_context, v01.head_dim, v01.n_kv_heads) == (
        1e4,
        4096,
        8192,
        16,
        4,
    )
    v02 = ModelConfig.from_params_json({**base, "rope_theta": 1e6, "sliding_window": 4096, "n_kv_heads": 2})
    assert (v02.sliding_window, v02.max_context) == (None, 32768)
    hf = {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 128,
        "vocab_size": 32000,
        "max_position_embeddings": 32768,
        "sliding_window": 32768,
    }
    assert ModelConfig.from_hf_config({**hf, "rope_theta": 1e6}).sliding_window is None
    new_style = ModelConfig.from_hf_config({**hf, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}})
    assert new_style.rope_theta == 1e6
    assert ModelConfig.from_hf_config({**hf, "head_dim": None}).head_dim == 16
