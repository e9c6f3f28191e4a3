"""Log-probabilities: each generated token's, and the prompt's with --echo, against transformers' log-softmax on the
same random weights (fp32), through the engine and through `mistral complete --json --logprobs`."""

from __future__ import annotations

import json

import pytest
import torch

from inprocess import mistral
from mistral_cli.engine.events import Chunk, Done
from mistral_cli.engine.load import load_engine
from mistral_cli.options import GenerationOptions, LoadOptions
from tiny import hf_reference

TOP = 5


@pytest.fixture(scope="module")
def engine(hf_model_dir):
    return load_engine(hf_model_dir, LoadOptions(device="cpu", dtype="fp32", prepare=False))


@pytest.fixture(scope="module")
def reference(tiny_spec, tiny_sd):
    return hf_reference(tiny_spec, tiny_sd)


def _reference_logprobs(reference, ids: list[int]) -> torch.Tensor:
    """(len(ids), V): row i is the distribution of the token after ids[:i+1]."""
    with torch.inference_mode():
        logits = reference(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def _run(engine, prompt, options, **kw) -> tuple[list[Chunk], Done]:
    events = list(engine.generate(prompt, options, **kw))
    return [e for e in events if isinstance(e, Chunk) and e.token >= 0], events[-1]


@pytest.mark.parametrize("temperature", [0.0, 1.5])
def test_generated_tokens_match_transformers(engine, reference, temperature):
    prompt = [engine.tokenizer.bos_id, *engine.tokenizer.encode("The capital of France is")]
    options = GenerationOptions(max_tokens=12, temperature=temperature, seed=3, repeat_penalty=1.3)
    chunks, done = _run(engine, prompt, options, logprobs=TOP)
    assert len(chunks) == len(done.logprobs) == len(done.tokens) > 0
    expected = _reference_logprobs(reference, prompt + done.tokens)
    for i, (chunk, scored) in enumerate(zip(chunks, done.logprobs, strict=True)):
        assert chunk.logprob is scored
        row = expected[len(prompt) - 1 + i]
        # the raw distribution: neither the temperature nor the repetition penalty changes it
        assert scored.token == done.tokens[i]
        assert scored.logprob == pytest.approx(float(row[scored.token]), abs=1e-4)
        values, ids = torch.topk(row, TOP)
        assert [t for t, _, _ in scored.top] == ids.tolist()
        assert [lp for _, _, lp in scored.top] == pytest.approx(values.tolist(), abs=1e-4)
        assert scored.text == engine.tokenizer.token_bytes(scored.token)


def test_prompt_scoring_matches_transformers(engine, reference):
    tok = engine.tokenizer
    prompt = [tok.bos_id, *tok.encode("Paris is the capital of France, and Berlin of Germany.")]
    _, done = _run(engine, prompt, GenerationOptions(max_tokens=2, temperature=0), logprobs=0, prompt_logprobs=True)
    scored = done.prompt_logprobs
    assert len(scored) == len(prompt) and scored[0] is None
    expected = _reference_logprobs(reference, prompt)
    for i in range(1, len(prompt)):
        assert scored[i].token == prompt[i]
        assert scored[i].logprob == pytest.approx(float(expected[i - 1, prompt[i]]), abs=1e-4)
        assert scored[i].top == []
    # scoring leaves the cache holding the prompt, so the generation after it is the one without scoring
    _, plain = _run(engine, prompt, GenerationOptions(max_tokens=2, temperature=0))
    assert done.tokens == plain.tokens


def test_prompt_scoring_in_chunks_equals_one_pass(engine, monkeypatch):
    from mistral_cli.engine import engine as engine_module

    prompt = [engine.tokenizer.bos_id, *engine.tokenizer.encode("one two three four five six seven eight nine")]
    whole = engine.score(prompt, 2)
    monkeypatch.setattr(engine_module, "SCORE_CHUNK", 3)
    chunked = engine.score(prompt, 2)
    assert [s and s.logprob for s in chunked] == pytest.approx([s and s.logprob for s in whole], abs=1e-5)


def test_complete_json_reports_logprobs(hf_model_dir, reference):
    env = {"PATH": "/usr/bin:/bin", "MISTRAL_PREPARE": "off"}
    r = mistral(env, "complete", "-m", str(hf_model_dir), "--device", "cpu", "--dtype", "fp32", "-t", "0", "-n", "6",
                "--json", "--logprobs", "3", "--echo", "Hello there")  # fmt: skip
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    content = out["logprobs"]["content"]
    assert len(content) == out["usage"]["completion_tokens"]
    assert all(len(c["top_logprobs"]) == 3 and c["top_logprobs"][0]["logprob"] >= c["logprob"] for c in content)
    assert bytes(content[0]["bytes"]).decode("utf-8", errors="replace") == content[0]["token"]
    prompt_scores = out["prompt_logprobs"]
    assert prompt_scores[0] is None and len(prompt_scores) == out["usage"]["prompt_tokens"]
    ids = [1, *[p["id"] for p in prompt_scores[1:]]] + [c["id"] for c in content]
    expected = _reference_logprobs(reference, ids)
    for i, entry in enumerate(prompt_scores[1:] + content, start=1):
        assert entry["logprob"] == pytest.approx(float(expected[i - 1, entry["id"]]), abs=1e-4)


def test_logprobs_need_json_and_a_range(hf_model_dir):
    env = {"PATH": "/usr/bin:/bin", "MISTRAL_PREPARE": "off"}
    r = mistral(env, "complete", "-m", str(hf_model_dir), "--logprobs", "2", "Hi")
    assert r.returncode != 0 and "--json" in r.stderr
    r = mistral(env, "complete", "-m", str(hf_model_dir), "--json", "--logprobs", "21", "Hi")
    assert r.returncode != 0 and "21" in r.stderr
