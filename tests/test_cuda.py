"""The GPU paths: greedy steps queued before the token is read back, decode steps replayed from CUDA graphs (on with
MISTRAL_CUDA_GRAPHS=on), and --compile. The logic they rest on is checked on the CPU too; the rest runs only where
torch sees a CUDA GPU.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch

from mistral_cli.cli import banner
from mistral_cli.engine.cuda import TokenReader, graphs_wanted
from mistral_cli.engine.engine import Done, Engine
from mistral_cli.engine.load import load_engine, load_model
from mistral_cli.hardware import GRAPHS_ENV
from mistral_cli.model.placement import Placement
from mistral_cli.model.quant import quantized_linear
from mistral_cli.options import GenerationOptions, LoadOptions
from tiny import TinySpec, hf_reference, random_state_dict, write_hf

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


def greedy(n: int, stop: list[str] | None = None) -> GenerationOptions:
    return GenerationOptions(max_tokens=n, temperature=0, stop=stop or [])


def prompt(n: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [1, *torch.randint(3, 32000, (n - 1,), generator=g).tolist()]


def run(engine: Engine, ids: list[int], options: GenerationOptions) -> Done:
    return [e for e in engine.generate(ids, options) if isinstance(e, Done)][0]


def same_weights(engine: Engine, **kw: object) -> Engine:
    return Engine(engine.model, engine.tokenizer, engine.placement, engine.max_context, **kw)  # type: ignore[arg-type]


def state(engine: Engine) -> tuple[list[int], int, torch.Tensor]:
    """The sequence, the cache's length and the keys/values it holds for it."""
    n = engine.cache.length
    kv = torch.stack([t[:, :, :n].float().cpu() for t in engine.cache.k + engine.cache.v])
    return list(engine.tokens), n, kv


# --- on the CPU: queued greedy steps, and the masked decode step that the graphs replay ------------------------------


@pytest.fixture(scope="module")
def cpu_engine(hf_model_dir) -> Engine:
    return load_engine(hf_model_dir, LoadOptions(device="cpu", dtype="fp32", max_context=64))


def test_queued_greedy_steps_give_the_same_text_and_cache(cpu_engine):
    ids = prompt(20)
    plain = same_weights(cpu_engine, lookahead=False)
    reference = run(plain, ids, greedy(12))
    assert reference.finish_reason == "length" and len(reference.tokens) == 12
    stop_text = plain.tokenizer.decode(reference.tokens[3:6])  # ends the text inside the reply
    cases = {
        "length": greedy(12),
        "stop sequence": greedy(12, [stop_text]),
        "context": greedy(200),  # 20 + 44 fills the context of 64
        "one token": greedy(1),
    }
    for name, options in cases.items():
        done = {}
        for ahead in (False, True):
            engine = same_weights(cpu_engine, lookahead=ahead)
            done[ahead] = run(engine, ids, options)
            done[ahead, "state"] = state(engine)
            # the next turn extends the sequence (or rewrites its end): the same logits either way
            more = [*engine.tokens[:60], *prompt(5, seed=1)[1:]]
            done[ahead, "next"] = engine.prefill(more)[0]
        assert done[True].tokens == done[False].tokens, name
        assert (done[True].text, done[True].finish_reason) == (done[False].text, done[False].finish_reason), name
        tokens, length, kv = done[True, "state"]
        assert (tokens, length) == done[False, "state"][:2] and length == len(tokens), name
        assert torch.equal(kv, done[False, "state"][2]), name
        assert torch.equal(done[True, "next"], done[False, "next"]), name
    assert run(same_weights(cpu_engine, lookahead=True), ids, greedy(200)).finish_reason == "context"


def test_queued_step_for_an_end_of_sequence_is_dropped(cpu_engine):
    ids = prompt(20)
    reference = run(same_weights(cpu_engine, lookahead=False), ids, greedy(10)).tokens
    tokenizer = copy.copy(cpu_engine.tokenizer)
    tokenizer.eos_id = reference[4]  # the fifth greedy token now ends the sequence
    for ahead in (False, True):
        engine = Engine(cpu_engine.model, tokenizer, cpu_engine.placement, cpu_engine.max_context, lookahead=ahead)
        done = run(engine, ids, greedy(10))
        first = reference.index(reference[4])
        assert done.finish_reason == "stop" and done.tokens == reference[:first]
        assert engine.cache.length == len(engine.tokens) == 20 + first


def test_a_generation_closed_early_leaves_the_cache_with_its_tokens(cpu_engine):
    engine = same_weights(cpu_engine, lookahead=True)
    events = engine.generate(prompt(20), greedy(10))
    for _ in range(3):
        next(events)  # the third token is out, and the step for it is already queued
    events.close()  # what Ctrl-C in a chat does at that point
    assert len(engine.tokens) == 22 and engine.cache.length == 22


def test_sampling_and_penalties_are_not_queued(cpu_engine):
    """Only greedy decoding without a penalty queues ahead; the others give what they gave before."""
    ids = prompt(12)
    for options in (
        GenerationOptions(max_tokens=8, temperature=0.8, seed=3),
        GenerationOptions(max_tokens=8, temperature=0, repeat_penalty=1.3),
    ):
        a = run(same_weights(cpu_engine, lookahead=False), ids, options)
        b = run(same_weights(cpu_engine, lookahead=True), ids, options)
        assert a.tokens == b.tokens


def test_masked_decode_over_a_growing_cache_equals_plain_decoding(hf_model_dir, tiny_spec):
    """What a graphed step computes: the whole (zeroed) cache buffer, a mask, positions as a tensor."""
    model = load_engine(hf_model_dir, LoadOptions(device="cpu", dtype="fp32")).model
    ids = torch.tensor([prompt(300, seed=2)])
    plain, masked = model.new_cache(), model.new_cache()
    with torch.inference_mode():
        model(ids[:, :250], plain)
        masked.reserve(250)
        for t in masked.k + masked.v:
            t.zero_()  # as on a GPU, where new buffers are zeroed
        model(ids[:, :250], masked)
        for pos in range(250, 300):  # crosses the growth from 256 to 512 positions
            a = model(ids[:, pos : pos + 1], plain)[0, -1]
            masked.reserve(pos + 1)
            for t in masked.k + masked.v:
                t[:, :, pos:].zero_()  # a GPU zeroes a grown cache's new buffers; on a CPU they are not (NaN garbage)
            b = model.decode_step(ids[:, pos : pos + 1], masked, torch.tensor([pos]))[0, -1]
            masked.length = pos + 1
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert masked.capacity == 512


def test_cuda_graphs_only_where_asked_for(monkeypatch):
    """Off by default (on an H200 the replayed step was slower than launching from Python: BENCHMARKS.md); on with
    MISTRAL_CUDA_GRAPHS=on, never on a CPU or with --compile, which makes its own."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.delenv(GRAPHS_ENV, raising=False)
    assert not graphs_wanted(cuda, compile=False)
    for value, wanted in (("on", True), ("1", True), ("off", False), ("0", False)):
        monkeypatch.setenv(GRAPHS_ENV, value)
        assert graphs_wanted(cuda, compile=False) == wanted, value
    assert not graphs_wanted(cuda, compile=True) and not graphs_wanted(cpu, compile=False)


# --- on a CUDA GPU --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpu_folder(tmp_path_factory, tiny_spec, tiny_sd):
    return write_hf(tmp_path_factory.mktemp("gpu") / "tiny", tiny_spec, tiny_sd)


@pytest.fixture
def graphs_on(monkeypatch):
    """Loads replay decode steps from CUDA graphs, as MISTRAL_CUDA_GRAPHS=on asks (off by default)."""
    monkeypatch.setenv(GRAPHS_ENV, "on")


@needs_cuda
def test_cuda_fp32_matches_transformers_on_cuda(tmp_path):
    spec = TinySpec(n_layers=3)
    sd = random_state_dict(spec, seed=11)
    ours = load_model(write_hf(tmp_path / "m", spec, sd), Placement(torch.device("cuda"), torch.float32))
    ref = hf_reference(spec, sd).cuda()
    ids = torch.tensor([prompt(40, seed=3)], device="cuda")
    with torch.inference_mode():
        got = ours(ids, ours.new_cache(), 0)
        expected = ref(ids).logits
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        reference = ref.generate(ids, max_new_tokens=48, do_sample=False, eos_token_id=None, pad_token_id=0)
    engine = Engine(ours, None, Placement(torch.device("cuda"), torch.float32), 512)  # type: ignore[arg-type]
    with torch.inference_mode():
        logits, _ = engine.prefill(ids[0].tolist())
        tokens = []
        for _ in range(48):
            tokens.append(int(logits.argmax()))
            logits = engine._step(tokens[-1])
            engine.tokens.append(tokens[-1])
    assert tokens == reference[0, 40:].tolist()


@needs_cuda
def test_cuda_bf16_is_close_to_the_fp32_network(gpu_folder, monkeypatch):
    monkeypatch.delenv(GRAPHS_ENV, raising=False)
    ids = prompt(64, seed=4)
    fp32 = load_engine(gpu_folder, LoadOptions(device="cpu", dtype="fp32"))
    bf16 = load_engine(gpu_folder, LoadOptions(device="cuda", dtype="bf16"))
    assert bf16.placement.dtype == torch.bfloat16 and bf16.lookahead
    assert bf16.graph is None and "CUDA graphs" not in banner.hardware(bf16)  # only where asked for
    x = torch.tensor([ids])
    with torch.inference_mode():
        ref = fp32.model(x, fp32.model.new_cache(), 0)[0]
        got = bf16.model(x.cuda(), bf16.model.new_cache(), 0)[0].float().cpu()
    assert float((got - ref).norm() / ref.norm()) < 0.03
    assert float((got.argmax(-1) == ref.argmax(-1)).float().mean()) > 0.9


@needs_cuda
@pytest.mark.parametrize("dtype, quantize", [("fp32", "none"), ("bf16", "none"), ("bf16", "int8"), ("bf16", "int4")])
def test_graphed_steps_equal_eager_steps(gpu_folder, graphs_on, dtype, quantize):
    """Graph replays are the eager masked step bit for bit, across a recapture when the cache grows (bf16 int8:
    with torch's GPU int8 kernel in the graph)."""
    ids = prompt(250, seed=5)
    graphed = load_engine(gpu_folder, LoadOptions(device="cuda", dtype=dtype, quantize=quantize, max_context=1024))
    assert graphed.graph is not None
    eager = same_weights(graphed, graphs=False)
    for engine in (graphed, eager):
        engine.prefill(ids)
    with torch.inference_mode():
        for pos in range(250, 300):
            token = ids[pos - 200]
            a = graphed._step(token).clone()
            graphed.tokens.append(token)
            eager.cache.reserve(pos + 1)
            b = graphed.model.decode_step(
                torch.tensor([[token]], device="cuda"), eager.cache, torch.tensor([pos], device="cuda")
            )[0, -1]
            eager.cache.length = pos + 1
            eager.tokens.append(token)
            assert torch.equal(a, b), pos
    assert graphed.graph.problem is None and graphed.cache.capacity == 512


@needs_cuda
def test_graphs_and_queued_steps_give_the_eager_text(gpu_folder, graphs_on):
    ids = prompt(200, seed=6)
    fast = load_engine(gpu_folder, LoadOptions(device="cuda", dtype="fp32", max_context=400))
    slow = same_weights(fast, graphs=False, lookahead=False)
    assert fast.lookahead and fast.graph is not None
    a, b = run(fast, ids, greedy(120)), run(slow, ids, greedy(120))  # crosses 256 positions
    assert a.tokens == b.tokens and a.text == b.text
    assert fast.cache.length == len(fast.tokens) == 319
    # a second turn on the same engine: its cache was kept consistent
    more = [*fast.tokens, *prompt(10, seed=7)[1:]]
    assert run(fast, more, greedy(20)).tokens == run(slow, more, greedy(20)).tokens


@needs_cuda
def test_decode_steps_never_wait_for_the_gpu(gpu_folder):
    engine = load_engine(gpu_folder, LoadOptions(device="cuda", dtype="bf16", max_context=600))
    for graphs in (True, False):
        e = same_weights(engine, graphs=graphs)
        e.prefill(prompt(300, seed=8))
        e._step(5)  # the first step captures (and may synchronize while it does)
        e.tokens.append(5)
        torch.cuda.set_sync_debug_mode("error")
        try:
            with torch.inference_mode():
                for i in range(3):
                    best = e._step(7 + i).argmax()  # an id from the host, then a token left on the device
                    e.tokens.append(7 + i)
                    e._step(best)
                    e.tokens.append(0)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()


@needs_cuda
def test_a_token_is_read_back_without_waiting_for_later_work():
    reader = TokenReader(torch.device("cuda"))
    reader.start(torch.tensor(123, device="cuda"))
    torch.cuda._sleep(2_000_000_000)  # GPU work queued after the copy: a spin of about a second
    assert reader.result() == 123
    assert not torch.cuda.current_stream().query()  # that work is still running: the read did not wait for it
    torch.cuda.synchronize()


def syncs_of(engine: Engine, ids: list[int], n: int) -> int:
    """How many times a greedy generation of n tokens waits for the GPU in a way torch reports."""
    import warnings

    engine.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run(engine, ids, greedy(n))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


@needs_cuda
def test_greedy_decoding_never_waits_for_the_gpu_per_token(gpu_folder):
    ids = prompt(100, seed=13)
    engine = load_engine(gpu_folder, LoadOptions(device="cuda", dtype="bf16", max_context=256))
    for graphs in (False, True):
        e = same_weights(engine, graphs=graphs)
        run(e, ids, greedy(4))  # a graph is captured here
        # the prefill and the end of the generation wait; the tokens in between add nothing
        assert syncs_of(e, ids, 5) == syncs_of(e, ids, 50), graphs
        e.lookahead = False  # reading each token back before the next step waits once per token
        assert syncs_of(e, ids, 50) > syncs_of(e, ids, 5), graphs


@needs_cuda
def test_compiled_step_matches_eager_on_cuda(gpu_folder):
    ids = prompt(30, seed=9)
    compiled = load_engine(gpu_folder, LoadOptions(device="cuda", dtype="fp32", max_context=128, compile=True))
    eager = same_weights(compiled, graphs=False)
    assert run(compiled, ids, greedy(24)).tokens == run(eager, ids, greedy(24)).tokens


@needs_cuda
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_layers_on_cuda(mode):
    """The plain dequantize-and-multiply path of other devices computes x @ W.T for the weight it stands for."""
    g = torch.Generator().manual_seed(12)
    w, x = torch.randn(256, 512, generator=g) / 512**0.5, torch.randn(3, 512, generator=g)
    layer = quantized_linear("layers.0.feed_forward.w2", w.cuda(), mode)
    if mode == "int8":
        deq = layer.weight.double().cpu() * layer.scales.double().cpu()[:, None]
    else:
        deq = layer.dequantize(torch.float64).cpu()
    assert float((deq - w).abs().max()) < (0.01 if mode == "int8" else 0.1)  # it is a quantization of w
    for rows in (1, 3):
        got = layer(x[:rows].cuda()).double().cpu()
        torch.testing.assert_close(got, x[:rows].double() @ deq.T, rtol=1e-5, atol=1e-5)


@needs_cuda
def test_int8_layers_use_torchs_gpu_kernel_where_it_is_right():
    from mistral_cli.model.quant import has_kernel

    g = torch.Generator().manual_seed(14)
    w, x = torch.randn(1024, 4096, generator=g) / 64, torch.randn(3, 4096, generator=g)
    layer = quantized_linear("layers.0.attention.wo", w.to("cuda", torch.bfloat16), "int8")
    assert layer.kernel == ("torch" if has_kernel("_weight_int8pack_mm", torch.device("cuda")) else None)
    deq = layer.weight.double().cpu() * layer.scales.double().cpu()[:, None]
    for rows in (1, 3):
        got = layer(x[:rows].to("cuda", torch.bfloat16)).double().cpu()
        expected = x[:rows].to(torch.bfloat16).double() @ deq.T
        assert float((got - expected).norm() / expected.norm()) < 0.01


@needs_cuda
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_model_decodes_with_graphs(gpu_folder, graphs_on, mode):
    ids = prompt(40, seed=10)
    fast = load_engine(gpu_folder, LoadOptions(device="cuda", dtype="fp32", quantize=mode, max_context=128))
    assert "CUDA graphs" in banner.hardware(fast) and mode in banner.hardware(fast)
    slow = same_weights(fast, graphs=False, lookahead=False)
    assert run(fast, ids, greedy(40)).tokens == run(slow, ids, greedy(40)).tokens
    assert fast.graph.problem is None


@needs_cuda
def test_cli_on_cuda(gpu_folder):
    env = {k: v for k, v in os.environ.items() if k != GRAPHS_ENV} | {"HF_HUB_OFFLINE": "1"}
    out = {}
    for device, graphs in (("cpu", "off"), ("cuda", "off"), ("cuda", "on")):
        cmd = [sys.executable, "-m", "mistral_cli", "complete", "-m", str(gpu_folder)]
        cmd += ["--device", device, "--dtype", "fp32", "--temperature", "0", "--max-tokens", "24", "--verbose"]
        run_env = env | ({GRAPHS_ENV: "on"} if graphs == "on" else {})
        proc = subprocess.run(cmd, input="The weather today", capture_output=True, text=True, env=run_env, timeout=300)
        assert proc.returncode == 0, proc.stderr
        out[device, graphs] = proc
    expected = out["cpu", "off"].stdout
    assert expected.strip() and out["cuda", "off"].stdout == expected == out["cuda", "on"].stdout
    assert "cuda fp32" in out["cuda", "off"].stderr and "CUDA graphs" not in out["cuda", "off"].stderr
    assert "cuda fp32, CUDA graphs" in out["cuda", "on"].stderr


@needs_cuda
@pytest.mark.parametrize("quantize", ["none", "int8", "int4"])
def test_prepared_weights_on_cuda_are_the_same_model_copied_once(tmp_path_factory, tmp_path, monkeypatch, quantize):
    """On a GPU the prepared file is the host-side source of one copy: the model equals the checkpoint's, and loading
    it holds no second copy of the weights in host memory (the mapping is page cache, not process memory). The
    small shape (350 MB in bf16), so that a copy would show beside the process's own growth."""
    from checkpoints import SHAPES, write_checkpoint

    folder = tmp_path_factory.getbasetemp() / "small-for-cuda"
    if not (folder / "config.json").is_file():
        write_checkpoint(folder, SHAPES["small"])
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("MISTRAL_PREPARE", raising=False)
    options = LoadOptions(device="cuda", dtype="bf16", quantize=quantize, max_context=128)
    plain = load_engine(folder, LoadOptions(**{**options.__dict__, "prepare": False}))
    first = load_engine(folder, options)
    assert first.weights_note.startswith("read the checkpoint and prepared ")

    def anonymous_kb() -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:"))

    before = anonymous_kb()
    second = load_engine(folder, options)
    grown = (anonymous_kb() - before) * 1024
    assert second.weights_note.startswith("mapped the prepared weights in ")
    tensors = [*second.model.parameters(), *second.model.buffers()]
    assert all(t.device.type == "cuda" for t in tensors)
    assert grown < sum(t.numel() * t.element_size() for t in tensors) / 2 + (64 << 20)
    ids = prompt(24, seed=5)
    expected = run(plain, ids, greedy(16)).tokens  # once: a second run would reuse the cache it left
    for engine in (first, second):
        assert run(engine, ids, greedy(16)).tokens == expected
