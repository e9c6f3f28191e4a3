"""`mistral complete --batch`: one load, one output line per input line in order, each equal to `complete --json`'s
for the same prompt and options; bad lines answered with an error object; `--resume` continuing a cut run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import jsonschema
import pytest

from inprocess import mistral

OPTIONS = ["--dtype", "fp32", "--device", "cpu"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    home = tmp_path_factory.mktemp("batch-env")
    return {"PATH": "/usr/bin:/bin", "MISTRAL_PREPARE": "off", "MISTRAL_CONFIG": "/dev/null",
            "MISTRAL_HOME": str(home), "HF_HOME": str(home / "hf"), "HF_HUB_OFFLINE": "1"}  # fmt: skip


def batch(env, model, path, *args: str) -> tuple[int, list[dict], str]:
    r = mistral(env, "complete", "-m", str(model), *OPTIONS, "--batch", str(path), *args)
    return r.returncode, [json.loads(line) for line in r.stdout.splitlines()], r.stderr


def write(path, items) -> None:
    path.write_text("".join((item if isinstance(item, str) else json.dumps(item)) + "\n" for item in items))


LINES = [
    {"id": "greeting", "prompt": "Hello", "max_tokens": 6, "temperature": 0},
    {"prompt": "Roses are", "max_tokens": 5, "seed": 11, "temperature": 0.9},
    {"id": 7, "messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 4, "temperature": 0},
    {"prompt": "Write a word.", "instruct": True, "system": "Be brief.", "max_tokens": 3, "seed": 5},
]


def test_every_line_equals_its_own_complete_json(env, hf_model_dir, tmp_path):
    path = tmp_path / "in.jsonl"
    write(path, LINES)
    code, out, err = batch(env, hf_model_dir, path, "--top-k", "40")
    assert code == 0, err
    assert [o["id"] for o in out] == ["greeting", 2, 7, 4]
    messages = tmp_path / "m.json"
    messages.write_text(json.dumps(LINES[2]["messages"]))
    single = [
        ["-n", "6", "-t", "0", "Hello"],
        ["-n", "5", "--seed", "11", "-t", "0.9", "Roses are"],
        ["-n", "4", "-t", "0", "--messages", str(messages)],
        ["-n", "3", "--seed", "5", "--instruct", "--system", "Be brief.", "Write a word."],
    ]
    for got, args in zip(out, single, strict=True):
        r = mistral(env, "complete", "-m", str(hf_model_dir), *OPTIONS, "--top-k", "40", "--json", *args)
        expected = json.loads(r.stdout)
        assert (got["text"], got["finish_reason"], got["usage"]) == (
            expected["text"], expected["finish_reason"], expected["usage"]
        )  # fmt: skip
        drawn = "--seed" not in args  # greedy lines leave the seed to chance: it differs, and does not matter
        assert {**got["options"], "seed": 0} == {**expected["options"], "seed": 0}
        assert drawn or got["seed"] == expected["seed"]
    # one load for the whole file: every line reports the same one
    assert len({o["timings"]["load_s"] for o in out}) == 1


def test_bad_lines_get_error_objects_and_the_rest_runs(env, hf_model_dir, tmp_path):
    path = tmp_path / "in.jsonl"
    write(path, [
        "{not json", {"prompt": "Hi", "max_tokens": 2}, {"prompt": "Hi", "colour": "red"}, {"id": "x"},
        {"prompt": "Hi", "temperature": -1}, {"prompt": "Hi", "max_tokens": "ten"}, "",
        {"messages": [{"role": "assistant", "content": "x"}]}, {"prompt": "word " * 40000}, [1, 2],
        {"prompt": "Hi", "logprobs": 99}, {"prompt": "Hi", "response_format": {"type": "xml"}},
    ])  # fmt: skip
    code, out, err = batch(env, hf_model_dir, path)
    assert code == 1 and "10 of 11 lines failed" in err
    assert [o["id"] for o in out] == [1, 2, 3, "x", 5, 6, 8, 9, 10, 11, 12]  # the empty line 7 is no line
    errors = [o.get("error", "") for o in out]
    assert "text" in out[1] and errors[1] == ""
    for needle, e in zip(
        ["not valid JSON", "", "unknown field 'colour'", "needs a prompt or messages", "temperature must be 0",
         "max_tokens must be a whole number", "must end with a user message", "The prompt is", "must be a JSON object",
         "logprobs must be an integer from 0 to 20", "response_format type must be"],
        errors, strict=True,
    ):  # fmt: skip
        assert needle in e, (needle, e)


def test_resume_skips_what_was_answered(env, hf_model_dir, tmp_path):
    path, out_file = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write(path, [{"id": i, "prompt": f"Line {i}", "max_tokens": 3, "temperature": 0} for i in range(1, 6)])
    # an earlier run: line 1 done, line 2 failed, and a crash in the middle of writing line 3
    write(out_file, [{"id": 1, "text": "kept as it was"}, {"id": 2, "error": "it failed"}])
    with open(out_file, "a") as f:
        f.write('{"id": 3, "te')
    r = mistral(env, "complete", "-m", str(hf_model_dir), *OPTIONS, "--batch", str(path), "--resume", str(out_file))
    assert r.returncode == 0, r.stderr
    assert r.stdout == "" and "torn last line" in r.stderr and "1 already answered" in r.stderr
    lines = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert [o["id"] for o in lines] == [1, 2, 2, 3, 4, 5]  # 2 again: its error is redone
    assert lines[0]["text"] == "kept as it was" and "text" in lines[2]
    # all answered now: nothing more is run or written
    before = out_file.read_text()
    r = mistral(env, "complete", "-m", str(hf_model_dir), *OPTIONS, "--batch", str(path), "--resume", str(out_file))
    assert r.returncode == 0 and out_file.read_text() == before and "5 already answered" in r.stderr


def test_stdin_formats_and_logprobs_per_line(env, hf_model_dir):
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["n"], "additionalProperties": False}  # fmt: skip
    lines = [
        {"prompt": "JSON:", "max_tokens": 20, "response_format": {"type": "json_schema", "json_schema": {"schema": schema}}},
        {"prompt": "Plain:", "max_tokens": 3, "logprobs": 2},
    ]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "mistral_cli", "complete", "-m", str(hf_model_dir), *OPTIONS, "--batch", "-"],
        input="\n".join(json.dumps(x) for x in lines), capture_output=True, text=True, env={**env, "PATH": ""},
        timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    first, second = (json.loads(line) for line in proc.stdout.splitlines())
    jsonschema.validate(json.loads(first["text"]), schema)
    assert "logprobs" not in first and len(second["logprobs"]["content"][0]["top_logprobs"]) == 2


def test_batch_usage_errors(env, hf_model_dir, tmp_path):
    r = mistral(env, "complete", "-m", str(hf_model_dir), "--batch", str(tmp_path / "none.jsonl"))
    assert r.returncode == 2 and "does not exist" in r.stderr
    r = mistral(env, "complete", "-m", str(hf_model_dir), "--batch", str(tmp_path), "Hi")
    assert r.returncode == 2 and "give no PROMPT" in r.stderr
    r = mistral(env, "complete", "-m", str(hf_model_dir), "--resume", str(tmp_path / "o.jsonl"), "Hi")
    assert r.returncode == 2 and "--resume goes with --batch" in r.stderr


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_sequences_decoded_together_equal_each_decoded_alone(hf_model_dir, dtype):
    from mistral_cli.engine.load import load_engine
    from mistral_cli.options import GenerationOptions, LoadOptions

    engine = load_engine(hf_model_dir, LoadOptions(device="cpu", dtype=dtype, prepare=False))
    assert engine.batches()
    tok = engine.tokenizer
    texts = ["Hello", "The capital of France is a city that", "Roses are red, violets", "x", "Once upon"]
    prompts = [[tok.bos_id, *tok.encode(t)] for t in texts]
    options = [
        GenerationOptions(max_tokens=12, temperature=0),
        GenerationOptions(max_tokens=20, temperature=0.8, seed=3, top_k=50),
        GenerationOptions(max_tokens=9, temperature=0, stop=["e"]),
        GenerationOptions(max_tokens=0),
        GenerationOptions(max_tokens=6, temperature=1.2, seed=9, repeat_penalty=1.3),
    ]
    together = engine.generate_many(prompts, options, leading_space=[True] * len(prompts))
    for prompt, opts, done in zip(prompts, options, together, strict=True):
        alone = list(engine.generate(prompt, opts, leading_space=True))[-1]
        if dtype == "bf16" and opts.temperature > 0:
            # bf16 logits of a batch and of one row differ by rounding (an eighth at a logit of 20): a sampled
            # sequence may part after its first token, where a draw falls between the two
            assert done.tokens[:1] == alone.tokens[:1] and len(done.tokens) == len(alone.tokens)
        else:
            assert (done.tokens, done.text, done.finish_reason) == (alone.tokens, alone.text, alone.finish_reason)
        assert done.prompt_tokens == len(prompt)


def test_a_row_that_fills_the_context_ends_as_it_would_alone(hf_model_dir):
    """The token that fills the context is also the last `max_tokens` allows: both paths call that "context"."""
    from mistral_cli.engine.load import load_engine
    from mistral_cli.options import GenerationOptions, LoadOptions

    engine = load_engine(hf_model_dir, LoadOptions(device="cpu", dtype="fp32", max_context=24, prepare=False))
    tok = engine.tokenizer
    prompts = [[tok.bos_id, *tok.encode(t)] for t in ("Once upon", "The capital of France is")]
    # the k-th reply token is sampled after len(prompt) + k - 1 tokens: the context is full at k = 24 - len + 1
    options = [GenerationOptions(max_tokens=25 - len(p), temperature=0) for p in prompts]
    together = engine.generate_many(prompts, options, leading_space=[True, True])
    for prompt, opts, done in zip(prompts, options, together, strict=True):
        alone = list(engine.generate(prompt, opts, leading_space=True))[-1]
        assert (done.tokens, done.finish_reason) == (alone.tokens, alone.finish_reason)
        assert len(done.tokens) == 25 - len(prompt) or done.finish_reason == "stop"
    assert any(d.finish_reason == "context" for d in together)


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_quantized_sequences_batch_only_where_rows_are_multiplied_as_integers(hf_model_dir, quantize):
    """int8/int4 on a CPU decode together only where our kernels multiply several rows as integers (AVX512-VNNI);
    elsewhere the multi-row path expands the weights and one row at a time is faster. Together, each sequence gets
    the same first token and as many tokens as alone; later greedy tokens may part where a random model's top two
    logits are within rounding (the single-row step runs its attention and norms in C, the batch in torch; each
    integer product row is bit for bit the same, tests/test_kernels.py)."""
    from mistral_cli.engine.load import load_engine
    from mistral_cli.native import kernels
    from mistral_cli.options import GenerationOptions, LoadOptions

    engine = load_engine(hf_model_dir, LoadOptions(device="cpu", dtype="bf16", quantize=quantize, prepare=False))
    ops = kernels.native()
    integer_rows = ops is not None and bool(ops.features & 2)
    assert engine.batches() == integer_rows == (not engine.expands_quantized_rows)
    if not integer_rows:
        pytest.skip("this CPU has no AVX512-VNNI: int8/int4 sequences decode one after another here")
    tok = engine.tokenizer
    prompts = [[tok.bos_id, *tok.encode(t)] for t in ("Hello", "The capital of France is", "Roses are red")]
    options = [GenerationOptions(max_tokens=n, temperature=0) for n in (10, 8, 6)]
    together = engine.generate_many(prompts, options, leading_space=[True] * len(prompts))
    for prompt, opts, done in zip(prompts, options, together, strict=True):
        alone = list(engine.generate(prompt, opts, leading_space=True))[-1]
        assert done.tokens[0] == alone.tokens[0]
        assert (len(done.tokens), done.finish_reason, done.prompt_tokens) == (opts.max_tokens, "length", len(prompt))


def test_line_options_override_the_command_line(env, hf_model_dir, tmp_path):
    path = tmp_path / "in.jsonl"
    write(path, [{"prompt": "Hi"}, {"prompt": "Hi", "top_k": 5, "max_tokens": 2, "stop": "q", "instruct": False}])
    code, out, err = batch(env, hf_model_dir, path, "--top-k", "40", "-n", "4", "-t", "0", "--instruct")
    assert code == 0, err
    cli, line = out
    assert (cli["options"]["top_k"], cli["options"]["max_tokens"], cli["options"]["stop"]) == (40, 4, [])
    assert (line["options"]["top_k"], line["options"]["max_tokens"], line["options"]["stop"]) == (5, 2, ["q"])
    r = mistral(env, "complete", "-m", str(hf_model_dir), *OPTIONS, "--json", "--top-k", "5", "-n", "2", "-t", "0",
                "--stop", "q", "Hi")  # fmt: skip
    alone = json.loads(r.stdout)
    assert (line["text"], line["finish_reason"], line["usage"]) == (
        alone["text"],
        alone["finish_reason"],
        alone["usage"],
    )
    assert cli["usage"]["prompt_tokens"] > line["usage"]["prompt_tokens"]  # the instruct frame, from the command line


def test_ctrl_c_leaves_whole_lines_and_resume_finishes(hf_model_dir, tmp_path):
    path, out_file = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    # 8 short lines (one group, written together), then one that would run to the end of the context
    write(path, [*({"id": i, "prompt": f"Line {i}", "max_tokens": 2} for i in range(1, 9)), {"id": 9, "prompt": "Go"},
                 {"id": 10, "prompt": "End", "max_tokens": 2}])  # fmt: skip
    args = [sys.executable, "-m", "mistral_cli", "complete", "-m", str(hf_model_dir), *OPTIONS, "-t", "0",
            "--batch", str(path), "--resume", str(out_file)]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MISTRAL_PREPARE": "off"}
    proc = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # even when the tests run in the background
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not (out_file.exists() and out_file.read_text().count("\n") >= 8) and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)  # line 9 is being generated
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Interrupted." in err and "8 lines written" in err, err
    assert [json.loads(line)["id"] for line in out_file.read_text().splitlines()] == list(range(1, 9))
    # the same command with a limit for line 9 goes on from there
    r = subprocess.run([*args, "-n", "3"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and "8 already answered" in r.stderr, r.stderr
    lines = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert [o["id"] for o in lines] == list(range(1, 11)) and lines[8]["usage"]["completion_tokens"] == 3
