"""Weight-only quantization and the compiled decode step, each against its float/eager reference."""

from __future__ import annotations

import os
import weakref

import pytest
import torch

from mistral_cli.engine import load
from mistral_cli.engine.load import load_model
from mistral_cli.model import quant, transformer
from mistral_cli.model.placement import Placement
from mistral_cli.model.quant import WeightOnlyInt4Linear, WeightOnlyInt8Linear, int4_weights, int8_weights
from mistral_cli.native import kernels
from mistral_cli.native.quant import NativeInt4Linear, NativeInt8Linear
from tiny import TinySpec, random_state_dict, write_hf

FP32 = Placement(torch.device("cpu"), torch.float32)
BF16_ULP = 2.0**-8  # relative rounding error of one bf16 value


def _weight(n: int = 96, k: int = 256, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) / k**0.5
    w[3, 7] = 0.5  # an outlier: its row's scale must not clip it
    return w


def _x(rows: int, k: int = 256, seed: int = 1) -> torch.Tensor:
    return torch.randn(rows, k, generator=torch.Generator().manual_seed(seed))


def test_int8_weights_within_half_a_step():
    w = _weight()
    q, scales = int8_weights(w)
    assert q.dtype == torch.int8 and scales.shape == (w.shape[0],)
    err = (q.float() * scales[:, None] - w).abs()
    assert (err <= scales[:, None] / 2 * (1 + 1e-5)).all()


def test_int4_weights_within_half_a_step():
    w, group = _weight(), 32
    q, sz = int4_weights(w, group)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15 and sz.shape == (256 // group, 96, 2)
    scales, zeros = sz.transpose(0, 1).unbind(-1)  # (N, K/group)
    deq = (q.float().view(96, -1, group) - 8) * scales[..., None] + zeros[..., None]
    assert ((deq.view(96, 256) - w).abs().view(96, -1, group) <= scales[..., None] / 2 * (1 + 1e-4)).all()


def _bound(x: torch.Tensor, w: torch.Tensor, step: torch.Tensor, kernel: bool) -> torch.Tensor:
    """|y - x @ w.T| allowed: half a quantization step per weight, plus bf16 rounding where the kernel runs."""
    bound = x.abs() @ (step / 2).T
    if kernel:  # activations, scales and the output rounded to bf16
        bound = bound + 3 * BF16_ULP * (x.abs() @ w.abs().T + (x @ w.T).abs())
    return bound + 1e-5


def activation_step(x: torch.Tensor, block: int) -> torch.Tensor:
    """Per element of x, the step of our kernels' int8 quantization of it (max |x| / 127 over its block)."""
    amax = x.float().abs().reshape(*x.shape[:-1], -1, block).amax(-1, keepdim=True)
    return (amax / 127).expand(*x.shape[:-1], x.shape[-1] // block, block).reshape(x.shape)


def ours() -> kernels.Kernels:
    ops = kernels.native()
    if ops is None:
        pytest.skip(f"our kernels: {kernels.status()}")
    return ops


KINDS = ["ours", "torch", "fallback"]  # our CPU kernels, torch's, or dequantize-and-matmul


def _kind(monkeypatch, kind: str) -> kernels.Kernels | None:
    """Our kernels for a layer of this kind (else None); torch's kernels switched on or off to match."""
    ops = ours() if kind == "ours" else None
    monkeypatch.setattr(quant, "_HAS_INT8_KERNEL", kind == "torch")
    monkeypatch.setattr(quant, "_HAS_INT4_KERNEL", kind == "torch")
    return ops


def int8_layer(w, ops=None, **kw) -> WeightOnlyInt8Linear:
    """An int8 layer in our kernels' layout with `ops`, else the one torch runs."""
    return NativeInt8Linear(w, ops, **kw) if ops is not None else WeightOnlyInt8Linear(w, **kw)


def int4_layer(w, ops=None, group: int = 64, **kw) -> WeightOnlyInt4Linear:
    """An int4 layer in our kernels' layout with `ops`, else in torch's packing where it has the kernel, else plain."""
    if ops is not None:
        return NativeInt4Linear(w, ops, **kw)
    N, K = sum(p.shape[0] for p in quant.as_parts(w)), quant.as_parts(w)[0].shape[1]
    fits = quant.TorchInt4Linear.fits(N, quant.int4_group(K, group), torch.device("cpu"))
    return (quant.TorchInt4Linear if fits else WeightOnlyInt4Linear)(w, group=group, **kw)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rows", [1, 40], ids=["decode", "prefill"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_int8_layer_matches_float_within_bound(monkeypatch, kind, rows, dtype):
    ops = _kind(monkeypatch, kind)
    w, x = _weight(), _x(rows)
    layer = int8_layer(w.to(dtype), ops, upcast=dtype == torch.bfloat16)
    assert layer.kernel == (None if kind == "fallback" else kind)
    y = layer(x.to(dtype)[None]).float()[0]  # (1, rows, K): batch dims are kept
    _, scales = int8_weights(w.to(dtype))
    step = scales[:, None].expand_as(w)
    bound = _bound(x, w, step, kind == "torch" or dtype == torch.bfloat16)
    if kind == "ours" and rows == 1:  # x quantized to int8 in blocks of 32
        bound += activation_step(x.to(dtype), 32) / 2 @ (w.abs() + step / 2).T
    assert ((y - x @ w.T).abs() <= bound).all()


def test_the_load_time_check_of_torchs_int8_kernel(monkeypatch):
    """The check that decides whether a GPU's int8 kernel is used, run here on torch's CPU kernel (right)."""
    _kind(monkeypatch, "torch")
    layer = WeightOnlyInt8Linear(_weight(n=320, k=4096))  # checked in blocks of 256 rows: two
    assert layer.kernel == "torch"
    assert layer.kernel_agrees()
    assert not layer.kernel_agrees(tolerance=0.0)  # it measures an error: bf16 rounding is more than none
    assert quant.has_kernel("_weight_int8pack_mm", torch.device("cpu"))
    assert not quant.has_kernel("no_such_op", torch.device("cpu"))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rows", [1, 40], ids=["decode", "prefill"])
@pytest.mark.parametrize("k", [256, 512], ids=["k256", "k512"])  # 512: our int4 kernel's vectorized path
def test_int4_layer_matches_float_within_bound(monkeypatch, kind, rows, k):
    ops = _kind(monkeypatch, kind)
    group = 64 if kind == "ours" else 32  # ours needs groups of a multiple of 64
    w, x = _weight(k=k), _x(rows, k=k)
    layer = int4_layer(w, ops, group=group)
    assert layer.kernel == (None if kind == "fallback" else kind) and layer.group == group
    y = layer(x)
    _, sz = int4_weights(w, group)
    step = sz[..., 0].T.repeat_interleave(group, dim=1)  # (N, K): each weight's group scale
    bound = _bound(x, w, step, kind != "fallback")  # ours keeps scales and lows in bf16
    if kind == "ours" and (rows == 1 or ops.int4_rows):  # x quantized to int8 in blocks of a superblock
        bound += activation_step(x, kernels.int4_superblock(k)) / 2 @ (w.abs() + step / 2).T
    assert ((y - x @ w.T).abs() <= bound).all()


def test_int4_kernels_and_fallback_agree(monkeypatch):
    w, x = _weight(), _x(5)
    fast = int4_layer(w, group=64)
    monkeypatch.setattr(quant, "_HAS_INT4_KERNEL", False)
    slow = int4_layer(w, group=64)
    mine = int4_layer(w, ours(), group=64)
    assert (fast.kernel, slow.kernel, mine.kernel) == ("torch", None, "ours")
    ref = slow(x)
    tol = 4 * BF16_ULP * float(ref.abs().max())
    torch.testing.assert_close(fast(x), ref, rtol=0, atol=tol)
    torch.testing.assert_close(mine(x), ref, rtol=0, atol=tol)  # a prompt: dequantized, then a float product
    # the same codes and scales in all three layouts
    torch.testing.assert_close(mine.dequantize(torch.float32), slow.dequantize(torch.float32), rtol=0, atol=tol)


@pytest.mark.parametrize("kind", KINDS)
def test_quantizing_in_row_blocks_changes_nothing(monkeypatch, kind):
    """Layers are quantized a block of rows at a time (small temporaries); the CPU int4 kernel's packing of
    separate blocks must equal one packing of the whole weight."""
    ops = _kind(monkeypatch, kind)
    w, x = _weight(n=208, k=256), _x(3)  # 208 rows: blocks of 64, 64, 64 and 16
    whole4, whole8 = int4_layer(w, ops), int8_layer(w, ops)
    monkeypatch.setattr(quant, "QUANT_BLOCK", 64 * 256)
    assert len(quant.row_blocks(208, 256)) == 4
    blocked4, blocked8 = int4_layer(w, ops), int8_layer(w, ops)
    for whole, blocked in ((whole4, blocked4), (whole8, blocked8)):
        for name, buf in whole.named_buffers():
            assert torch.equal(buf, dict(blocked.named_buffers())[name]), name
    torch.testing.assert_close(blocked4(x), whole4(x), rtol=0, atol=0)
    torch.testing.assert_close(blocked4(x[:1]), whole4(x[:1]), rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["ours", "fallback"])
def test_a_prompt_converted_in_blocks_equals_one_block(monkeypatch, kind):
    """A prompt's product converts the weight a block of rows at a time into one reused buffer: several blocks (the
    last one partial) give what one block gives, for int8, int4 and a bf16 weight multiplied in float32, and one
    layer's blocks never leak into the next layer's product."""
    ops = _kind(monkeypatch, kind)
    x = _x(7).to(torch.bfloat16)
    layers = [int8_layer(_weight(n=208, seed=s), ops) for s in (2, 3)]
    layers += [int4_layer(_weight(n=208, seed=s), ops, group=64) for s in (4, 5)]
    bf16 = transformer.Linear(256, 208, bias=False)
    bf16.weight = torch.nn.Parameter(_weight(n=208, seed=6).to(torch.bfloat16), requires_grad=False)
    bf16.upcast = True
    layers.append(bf16)
    whole = [layer(x) for layer in layers]
    monkeypatch.setattr(transformer, "BLOCK_BYTES", 48 * 256 * 2)  # 48 rows of bf16 (24 of float32): 5 blocks
    for layer, expected in zip(layers * 2, whole * 2, strict=True):
        assert torch.equal(layer(x), expected)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("sizes", [(128, 64, 64), (64, 32, 32)], ids=["aligned", "unaligned"])
def test_a_layer_from_row_parts_equals_one_from_the_whole(monkeypatch, kind, sizes):
    """q/k/v and gate/up are quantized from their parts as loaded, never concatenated in float."""
    ops = _kind(monkeypatch, kind)
    monkeypatch.setattr(quant, "QUANT_BLOCK", 32 * 256)  # several blocks per part
    w = _weight(n=sum(sizes), k=256)
    parts = list(w.split(list(sizes)))
    for make in (lambda t: int8_layer(t, ops), lambda t: int4_layer(t, ops)):
        whole, split = make(w), make(parts)
        assert (split.out_features, split.in_features) == (w.shape[0], 256)
        for name, buf in whole.named_buffers():
            assert torch.equal(buf, dict(split.named_buffers())[name]), name
    assert len(quant.as_parts(parts, align=64)) == (3 if sizes[0] % 64 == 0 and sizes[1] % 64 == 0 else 1)


def test_int4_group_fits_narrow_layers():
    assert quant.int4_group(4096) == 64 and quant.int4_group(96) == 32 and quant.int4_group(48, 64) == 16


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_spec, tiny_sd):
    return write_hf(tmp_path_factory.mktemp("quant") / "tiny", tiny_spec, tiny_sd)


def _teacher_forced_logits(model, tokens):
    with torch.inference_mode():
        return model(tokens, model.new_cache())


# Top-1 agreement with the float model on a random tiny model, over 96 teacher-forced positions. Random weights
# are the hardest case for int4 (no structure, and 32000 near-tied logits), so its floor is low; int8 is close.
AGREEMENT = {"int8": 0.9, "int4": 0.6}


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_model_agrees_with_float(model_dir, mode):
    tokens = torch.randint(3, 32000, (1, 96), generator=torch.Generator().manual_seed(3))
    ref = _teacher_forced_logits(load_model(model_dir, FP32), tokens)
    model = load_model(model_dir, FP32, quantize=mode)
    layers = [m for m in model.modules() if isinstance(m, (WeightOnlyInt8Linear, WeightOnlyInt4Linear))]
    assert len(layers) == 2 * 4 + 1  # wqkv, wo, w13, w2 per layer, and the output head
    assert isinstance(model.output, WeightOnlyInt8Linear)  # the head stays int8 in int4 mode too
    assert model.tok_embeddings.weight.dtype == torch.float32
    got = _teacher_forced_logits(model, tokens)
    agreement = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert agreement >= AGREEMENT[mode]
    rel = ((got - ref).norm() / ref.norm()).item()
    assert rel < {"int8": 0.05, "int4": 0.3}[mode]


def test_int8_greedy_generation_follows_float(model_dir):
    def greedy(model, n=12):
        tokens = torch.tensor([[1, 851, 349, 264]])
        cache, out = model.new_cache(), []
        with torch.inference_mode():
            logits = model(tokens, cache, last_only=True)
            for _ in range(n):
                out.append(int(logits[0, -1].argmax()))
                logits = model(torch.tensor([[out[-1]]]), cache)
        return out

    ref = greedy(load_model(model_dir, FP32))
    got = greedy(load_model(model_dir, FP32, quantize="int8"))
    assert got[:4] == ref[:4]  # later tokens may drift after a near-tie
    assert sum(a == b for a, b in zip(got, ref, strict=True)) >= 8


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_load_never_holds_the_float_model(monkeypatch, model_dir, tiny_spec, mode):
    """Each float linear weight is gone before the next one is read, so at most one is alive at a time."""
    alive: list[list[weakref.ref]] = []  # per quantized layer, its float tensor or the parts it is made of
    worst = 0

    def spy(weights, cfg, placement, **kw):
        nonlocal worst
        for name, tensor in real(weights, cfg, placement, **kw):
            worst = max(worst, sum(any(r() is not None for r in refs) for refs in alive))
            if quant.is_quantized_layer(name):
                assert not isinstance(tensor, torch.Tensor) or not name.endswith(("wqkv.weight", "w13.weight"))
                alive.append([weakref.ref(t) for t in ([tensor] if isinstance(tensor, torch.Tensor) else tensor)])
            yield name, tensor

    real = load.load_state
    monkeypatch.setattr(load, "load_state", spy)
    model = load_model(model_dir, FP32, quantize=mode)
    assert len(alive) == 4 * tiny_spec.n_layers + 1
    assert worst <= 1  # the loop variable still holds the previous tensor while the next one is read
    assert all(r() is None for refs in alive for r in refs)
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="int3"):
        quant.quantized_linear("output", _weight(), "int3")


def test_quantize_model_swaps_an_already_loaded_model(model_dir):
    model = quant.quantize_model(load_model(model_dir, FP32), "int8")
    assert isinstance(model.layers[1].feed_forward.w2, WeightOnlyInt8Linear)
    tokens = torch.tensor([[1, 2, 3, 4, 5]])
    torch.testing.assert_close(
        _teacher_forced_logits(model, tokens),
        _teacher_forced_logits(load_model(model_dir, FP32, quantize="int8"), tokens),
    )


# The compiled decode step. aot_eager traces the whole step with dynamo and AOT autograd (the part that breaks on
# Python ints, data-dependent branches and in-place cache writes) in about a second; inductor adds C++ code
# generation, about 25 s for the tiny model on 2 cores, so it runs only when asked.
SLOW = pytest.mark.skipif(
    not os.environ.get("MISTRAL_SLOW_TESTS"),
    reason="inductor compiles C++ for ~25 s on the tiny model; set MISTRAL_SLOW_TESTS=1 to run it",
)


# inductor once, on the float model: the int8 kernel is an opaque call that aot_eager already traces
@pytest.mark.parametrize(
    "backend, mode", [("aot_eager", "none"), ("aot_eager", "int8"), pytest.param("inductor", "none", marks=SLOW)]
)
def test_compiled_decode_step_matches_eager(model_dir, backend, mode):
    model = load_model(model_dir, FP32, quantize=mode)
    static, grown = model.new_cache(32, static=True), model.new_cache()
    step = torch.compile(model.decode_step, backend=backend, fullgraph=True, dynamic=False)
    tokens = torch.randint(3, 32000, (1, 12), generator=torch.Generator().manual_seed(4))
    # the int8 kernel's trace may round to bf16 in another order: allow that much
    tol = {"rtol": 1e-5, "atol": 1e-5} if mode == "none" else {"rtol": 1e-2, "atol": 0.25}
    with torch.inference_mode():
        model(tokens[:, :4], static)
        model(tokens[:, :4], grown)
        for t in range(4, 12):
            got = step(tokens[:, t : t + 1], static, torch.tensor([t]))
            static.length = t + 1
            torch.testing.assert_close(got, model(tokens[:, t : t + 1], grown), **tol)


def test_engine_compile_uses_a_static_cache_and_agrees(monkeypatch, model_dir):
    import functools

    from mistral_cli.engine import engine as engine_mod
    from mistral_cli.engine.engine import Done
    from mistral_cli.engine.load import load_engine
    from mistral_cli.options import GenerationOptions, LoadOptions

    monkeypatch.setattr(engine_mod.torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    opts = GenerationOptions(temperature=0, max_tokens=8)
    runs = {}
    for compiled in (False, True):
        eng = load_engine(model_dir, LoadOptions(device="cpu", dtype="fp32", max_context=64, compile=compiled))
        assert eng.cache.static == compiled
        done = [e for e in eng.generate([1, 851, 349], opts) if isinstance(e, Done)][0]
        runs[compiled] = done.tokens
    assert runs[True] == runs[False]


def test_bf16_prefill_runs_in_float32_on_slow_cpus(model_dir):
    bf16 = Placement(torch.device("cpu"), torch.bfloat16)
    model = load_model(model_dir, bf16)
    model.set_upcast(True)
    tokens = torch.randint(3, 32000, (1, 20), generator=torch.Generator().manual_seed(5))
    up = _teacher_forced_logits(model, tokens)
    model.set_upcast(False)
    plain = _teacher_forced_logits(model, tokens)
    ref = _teacher_forced_logits(load_model(model_dir, FP32), tokens)
    # the same network: the float32 products are at least as close to the fp32 model as bf16 ones
    assert (up - ref).norm() <= (plain - ref).norm() * 1.1
    assert (up.argmax(-1) == plain.argmax(-1)).float().mean() >= 0.9


def test_tiny_spec_is_what_these_bounds_were_set_on(tiny_spec):
    assert tiny_spec == TinySpec()


@pytest.mark.parametrize("mode", ["none", "int8", "int4"])
@pytest.mark.parametrize("ours", [False, True], ids=["torch-layouts", "our-layouts"])
def test_info_memory_estimate_is_the_loaded_size(monkeypatch, tmp_path, mode, ours):
    """`mistral info` estimates the weights without torch; it must equal what a load really holds. hidden 320:
    int4 superblocks of 256 (dim) and 64 columns (hidden) in our layout."""
    from mistral_cli.cli.info import memory_needed
    from mistral_cli.model.config import ModelConfig

    ops = _kind(monkeypatch, "ours" if ours else "torch")
    spec = TinySpec(dim=256, hidden_dim=320, head_dim=32, n_heads=4, n_kv_heads=2)
    folder = write_hf(tmp_path, spec, random_state_dict(spec), dtype=torch.bfloat16)
    model = load_model(folder, Placement(torch.device("cpu"), torch.bfloat16), quantize=mode, kernels=ops)
    held = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    estimate = memory_needed(ModelConfig.from_folder(folder), "bf16", mode, 0, ours=ours)["weights_bytes"]
    assert estimate == held
    # what --verbose and the benchmark divide by: all of it but the embedding table, quantized buffers included
    assert model.decode_bytes() == estimate - spec.vocab_size * spec.dim * 2
