"""`mistral complete` end to end: the real CLI in a subprocess on a tiny random model, against transformers."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from mistral_cli.engine.events import Done, StopMatcher
from mistral_cli.engine.load import load_engine
from mistral_cli.options import GenerationOptions, LoadOptions
from mistral_cli.text.chat_format import Message, encode_chat
from mistral_cli.text.tokenizer import Tokenizer
from tiny import hf_reference


def run(*args: str, stdin: bytes | str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    data = stdin.encode() if isinstance(stdin, str) else stdin
    proc = subprocess.run(
        [sys.executable, "-m", "mistral_cli", *args],
        input=data,
        capture_output=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
        timeout=180,
    )
    proc.out = proc.stdout.decode("utf-8")  # type: ignore[attr-defined]
    proc.err = proc.stderr.decode("utf-8")  # type: ignore[attr-defined]
    return proc


def greedy_reference(spec, sd, prompt_ids: list[int], n: int) -> list[int]:
    ref = hf_reference(spec, sd)
    with torch.inference_mode():
        out = ref.generate(
            torch.tensor([prompt_ids]), max_new_tokens=n, do_sample=False, eos_token_id=2, pad_token_id=0
        )
    return [t for t in out[0, len(prompt_ids) :].tolist() if t != 2]


@pytest.fixture(scope="module")
def tok(hf_model_dir) -> Tokenizer:
    return Tokenizer(hf_model_dir / "tokenizer.model")


def test_raw_greedy_equals_transformers(hf_model_dir, tiny_spec, tiny_sd, tok):
    prompt = "The capital of France is"
    # the reference runs in float32; `auto` is bf16 on most CPUs
    proc = run(
        "complete", "-m", str(hf_model_dir), "--dtype", "fp32", "--temperature", "0", "--max-tokens", "24", prompt
    )
    assert proc.returncode == 0, proc.err
    assert proc.err == ""
    ids = [tok.bos_id, *tok.encode(prompt)]
    expected = greedy_reference(tiny_spec, tiny_sd, ids, 24)
    # the continuation as it reads after the prompt: decode(prompt + reply) minus decode(prompt)
    full, head = tok.decode(ids + expected), tok.decode(ids)
    assert full.startswith(head)
    want = full[len(head) :]
    assert proc.out == want + ("" if want.endswith("\n") else "\n")


def test_instruct_and_messages_greedy_equal_transformers(hf_model_dir, tiny_spec, tiny_sd, tok, tmp_path):
    ids = encode_chat(tok, [Message("user", "Write a haiku about tea.")], system="Be brief.")
    expected = tok.decode(greedy_reference(tiny_spec, tiny_sd, ids, 20))
    proc = run("complete", "-m", str(hf_model_dir), "--dtype", "fp32", "-t", "0", "-n", "20", "--instruct", "--system", "Be brief.",
               stdin="Write a haiku about tea.")  # fmt: skip
    assert proc.returncode == 0, proc.err
    assert proc.out.rstrip("\n") == expected.rstrip("\n")

    convo = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Name a colour 🎨"},
    ]
    path = tmp_path / "convo.json"
    path.write_text(json.dumps(convo), encoding="utf-8")
    ids = encode_chat(tok, [Message(m["role"], m["content"]) for m in convo])
    expected = tok.decode(greedy_reference(tiny_spec, tiny_sd, ids, 20))
    proc = run("complete", "-m", str(hf_model_dir), "--dtype", "fp32", "-t", "0", "-n", "20", "--messages", str(path))
    assert proc.returncode == 0, proc.err
    assert proc.out.rstrip("\n") == expected.rstrip("\n")


def test_continue_extends_the_assistant_message_in_place(hf_model_dir, tiny_spec, tiny_sd, tok, tmp_path):
    convo = [{"role": "user", "content": "Tell me a story."}, {"role": "assistant", "content": "Once upon a time"}]
    path = tmp_path / "cut.json"
    path.write_text(json.dumps(convo), encoding="utf-8")
    # the tokens the model saw while writing the message: no EOS after it, and no new user turn
    ids = [*encode_chat(tok, [Message("user", "Tell me a story.")]), *tok.encode("Once upon a time")]
    reply = greedy_reference(tiny_spec, tiny_sd, ids, 16)
    full, head = tok.decode(ids + reply), tok.decode(ids)
    proc = run("complete", "-m", str(hf_model_dir), "--dtype", "fp32", "-t", "0", "-n", "16", "--continue",
               "--messages", str(path))  # fmt: skip
    assert proc.returncode == 0, proc.err
    assert proc.out.rstrip("\n") == full[len(head) :].rstrip("\n")  # spaces as they read after "time"

    path.write_text(json.dumps(convo[:1]), encoding="utf-8")
    proc = run("complete", "-m", str(hf_model_dir), "--continue", "--messages", str(path))
    assert proc.returncode == 2 and "must be the assistant's" in proc.err
    proc = run("complete", "-m", str(hf_model_dir), "--continue", "Hi")
    assert proc.returncode == 2 and "--continue needs --messages" in proc.err


def test_ctrl_c_with_json_prints_what_came(hf_model_dir):
    proc = subprocess.Popen(
        [sys.executable, "-m", "mistral_cli", "complete", "-m", str(hf_model_dir), "--dtype", "fp32", "-t", "0",
         "--json", "--verbose", "--logprobs", "1", "Once upon a time"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # even when the tests run in the background
    )  # fmt: skip
    assert proc.stderr is not None
    assert "mistral: loaded" in proc.stderr.readline()  # generating now: to the end of a 32K context, minutes
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    result = json.loads(out)
    assert result["finish_reason"] == "interrupted" and "Interrupted." in err
    n = result["usage"]["completion_tokens"]
    assert n > 0 and len(result["logprobs"]["content"]) == n
    assert result["usage"]["prompt_tokens"] == 5  # BOS and "Once upon a time"


def test_ctx_size_is_max_context_for_llama_cpp_users(hf_model_dir):
    for flag in ("-c", "--ctx-size"):
        proc = run("complete", "-m", str(hf_model_dir), flag, "8", "one two three four five six seven eight nine")
        assert proc.returncode != 0 and "the context holds 8" in proc.err, proc.err


def test_seed_reproducible_and_json(hf_model_dir, tok):
    args = ["complete", "-m", str(hf_model_dir), "-n", "16", "--temperature", "1.0", "--top-k", "50", "--json"]
    a = json.loads(run(*args, "--seed", "7", "Once upon a time").out)
    b = json.loads(run(*args, "--seed", "7", "Once upon a time").out)
    c = json.loads(run(*args, "--seed", "8", "Once upon a time").out)
    assert a["text"] == b["text"] and a["text"] != c["text"]
    assert a["seed"] == 7 and a["finish_reason"] == "length"
    assert a["usage"] == {"prompt_tokens": 1 + len(tok.encode("Once upon a time")), "completion_tokens": 16}
    assert set(a["timings"]) == {"load_s", "prefill_s", "decode_s", "prefill_tokens_per_s", "decode_tokens_per_s"}
    assert a["options"]["top_k"] == 50 and a["model"] == str(hf_model_dir)
    unseeded = json.loads(run(*args, "Once upon a time").out)
    assert isinstance(unseeded["seed"], int)  # reported, so the run can be repeated
    again = json.loads(run(*args, "--seed", str(unseeded["seed"]), "Once upon a time").out)
    assert again["text"] == unseeded["text"]


def test_stop_string_cuts_output(hf_model_dir, tok):
    base = run("complete", "-m", str(hf_model_dir), "-t", "0", "-n", "30", "--json", "Hello").out
    text = json.loads(base)["text"]
    assert len(text) > 12
    stop = text[5:9]  # a stop string that very likely spans token boundaries
    proc = run("complete", "-m", str(hf_model_dir), "-t", "0", "-n", "30", "--json", "--stop", stop, "Hello")
    got = json.loads(proc.out)
    assert got["finish_reason"] == "stop_sequence"
    assert got["text"] == text[: text.index(stop)]


def test_stop_matcher_holds_back_partial_matches():
    m = StopMatcher(["END", "xyz"])
    assert m.feed("abcE") == ("abc", False)
    assert m.feed("N") == ("", False)
    assert m.feed("Dzz") == ("", True)
    assert "".join(m.text) == "abc"
    m = StopMatcher(["END"])
    assert m.feed("EN") == ("", False)
    assert m.feed("x") == ("ENx", False)


def test_closed_stdout_is_quiet(hf_model_dir):
    cmd = f"{sys.executable} -m mistral_cli complete -m {hf_model_dir} -n 200 'Tell me' | head -c 5"
    proc = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, timeout=180)
    assert proc.stderr == b""
    assert len(proc.stdout) <= 5


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--temperature", "-1"], "--temperature"),
        (["--top-p", "0"], "--top-p"),
        (["--top-p", "1.5"], "--top-p"),
        (["--min-p", "2"], "--min-p"),
        (["--repeat-penalty", "0"], "--repeat-penalty"),
        (["--max-context", "0"], "--max-context"),
    ],
)
def test_bad_option_values(hf_model_dir, args, needle):
    proc = run("complete", "-m", str(hf_model_dir), *args, "hi")
    assert proc.returncode == 2 if needle != "--max-context" else proc.returncode != 0
    assert "Traceback" not in proc.err and needle in proc.err and proc.out == ""


def test_empty_prompt_and_invalid_utf8(hf_model_dir):
    proc = run("complete", "-m", str(hf_model_dir), stdin=b"  \n")
    assert proc.returncode == 2 and "empty" in proc.err and "Traceback" not in proc.err
    proc = run("complete", "-m", str(hf_model_dir), "-n", "3", stdin=b"caf\xe9 au lait")
    assert proc.returncode == 0
    assert proc.err.count("not valid UTF-8") == 1


def test_prompt_longer_than_context(hf_model_dir, tok):
    prompt = "word " * 40
    proc = run("complete", "-m", str(hf_model_dir), "--max-context", "16", prompt)
    assert proc.returncode == 1
    n = 1 + len(tok.encode(prompt))
    assert f"{n} tokens" in proc.err and "16" in proc.err and "Traceback" not in proc.err


def test_bad_messages_files(hf_model_dir, tmp_path):
    cases = {
        "bad.json": ("[{", "JSON"),
        "role.json": (json.dumps([{"role": "robot", "content": "x"}]), "robot"),
        "last.json": (json.dumps([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]), "user"),
    }
    for name, (content, needle) in cases.items():
        (tmp_path / name).write_text(content)
        proc = run("complete", "-m", str(hf_model_dir), "--messages", str(tmp_path / name))
        assert proc.returncode != 0 and needle in proc.err and "Traceback" not in proc.err, proc.err


def test_echo_and_verbose(hf_model_dir):
    proc = run("complete", "-m", str(hf_model_dir), "-n", "4", "--echo", "--verbose", "-t", "0", "Roses are")
    assert proc.returncode == 0
    assert proc.out.startswith("Roses are")
    assert "tokens/s" in proc.err


def kernels_here():
    from mistral_cli.native import kernels

    return kernels.native()


ONE_THREAD = r", 1 thread( \(shared CPU: [^)]*\))? in"  # the note when other programs run beside the test


def test_beside_busy_programs_threads_sleep_and_leave_them_their_cores(hf_model_dir):
    """Programs running as the model loads: the verbose line says so, and the decode uses torch's default count of
    threads less one per busy program (at least one), unless --threads or OMP_NUM_THREADS says otherwise."""
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    probe = [sys.executable, "-c", "import torch; print(torch.get_num_threads())"]
    default = int(subprocess.run(probe, capture_output=True, text=True, env=clean, check=True).stdout)
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        time.sleep(0.5)  # running when the model loads
        args = ("complete", "-m", str(hf_model_dir), "-n", "2", "-t", "0", "--verbose", "Hi")
        subprocess_env = {**clean, "HF_HUB_OFFLINE": "1"}
        runs = [
            subprocess.run([sys.executable, "-m", "mistral_cli", *a], capture_output=True, text=True, env=e, timeout=180)
            for a, e in ((args, subprocess_env), ((*args, "--threads", "3"), subprocess_env),
                         (args, {**subprocess_env, "OMP_NUM_THREADS": "2"}))
        ]  # fmt: skip
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    note = r", (\d+) threads? \(shared CPU: (\d+) other programs? running\) in"
    found = [re.search(note, r.stderr) for r in runs]
    assert all(r.returncode == 0 for r in runs) and all(found), [r.stderr for r in runs]
    threads, others = (int(g) for g in found[0].groups())
    assert others >= 2 and threads == max(1, default - others), runs[0].stderr
    assert [int(m.group(1)) for m in found[1:]] == [3, min(2, default)]  # the user's count (torch caps the variable)


def test_threads_and_default_dtype(hf_model_dir):
    base = run("complete", "-m", str(hf_model_dir), "-n", "6", "-t", "0", "--verbose", "Roses are")
    assert base.returncode == 0, base.err
    assert re.search(r"on cpu (bf16|fp32)(, AVX2( \+ AVX512-[A-Z0-9]+)* kernels)?, \d+ threads?( \(shared CPU: [^)]*\))? in",
                     base.err), base.err  # fmt: skip
    # our kernels are used wherever they can be built (python -m mistral_cli.native.kernels says whether)
    assert (" kernels, " in base.err) == (kernels_here() is not None), base.err
    off = run(
        "complete",
        "-m",
        str(hf_model_dir),
        "-n",
        "6",
        "-t",
        "0",
        "--verbose",
        "Roses are",
        env={"MISTRAL_KERNELS": "off"},
    )
    assert off.returncode == 0 and " kernels, " not in off.err, off.err
    one = run("complete", "-m", str(hf_model_dir), "-n", "6", "-t", "0", "--verbose", "--threads", "1", "Roses are")
    assert one.returncode == 0 and "on cpu" in one.err and re.search(ONE_THREAD, one.err), one.err
    assert one.out == base.out  # the thread count changes the speed, not the text
    env = run("complete", "-m", str(hf_model_dir), "-n", "2", "--verbose", "Roses are", env={"MISTRAL_THREADS": "1"})
    assert re.search(ONE_THREAD, env.err), env.err
    for bad, needle in ((["--threads", "0"], "--threads must be 1 or more"),
                        (["--threads", "two"], "Invalid value for '--threads'")):  # fmt: skip
        proc = run("complete", "-m", str(hf_model_dir), "-n", "2", *bad, "Roses are")
        assert proc.returncode != 0 and needle in proc.err and "Traceback" not in proc.err, proc.err
    proc = run("complete", "-m", str(hf_model_dir), "-n", "2", "Roses are", env={"MISTRAL_THREADS": "0"})
    assert proc.returncode != 0 and "--threads must be 1 or more, not 0 (from env MISTRAL_THREADS)" in proc.err, (
        proc.err
    )


def test_engine_reuses_cache_for_extended_prompt(hf_model_dir, tok):
    engine = load_engine(hf_model_dir, LoadOptions(device="cpu", dtype="fp32"))
    opts = GenerationOptions(temperature=0, max_tokens=5)
    first = [tok.bos_id, *tok.encode("One two three")]
    done = [e for e in engine.generate(first, opts) if isinstance(e, Done)][0]
    assert done.prefilled_tokens == len(first)
    second = first + done.tokens + tok.encode(" four five")
    fed = []
    list(engine.generate(second, opts, on_prefill=fed.append))
    # the cache held the prompt and all generated tokens but the last, which was never fed
    assert fed == [len(second) - len(first) - len(done.tokens) + 1]


def test_truncate_keeps_the_end_of_the_prompt(hf_model_dir, tok, tmp_path):
    prompt = " ".join(f"w{i}" for i in range(60))
    proc = run("complete", "-m", str(hf_model_dir), "--max-context", "40", "-n", "5", "--truncate", "--json", prompt)
    got = json.loads(proc.out)
    assert proc.returncode == 0 and got["usage"]["prompt_tokens"] + 5 <= 40
    convo = [{"role": "user", "content": f"question {i} " * 5} for i in range(7)]
    for i in range(1, 6, 2):
        convo[i] = {"role": "assistant", "content": f"answer {i} " * 5}
    path = tmp_path / "long.json"
    path.write_text(json.dumps(convo))
    proc = run("complete", "-m", str(hf_model_dir), "--max-context", "64", "-n", "4", "--truncate", "--json",
               "--messages", str(path))  # fmt: skip
    got = json.loads(proc.out)
    kept = [Message(m["role"], m["content"]) for m in convo[-1:]]
    assert proc.returncode == 0, proc.err
    assert got["usage"]["prompt_tokens"] >= len(encode_chat(tok, kept)) and got["usage"]["prompt_tokens"] + 4 <= 64
