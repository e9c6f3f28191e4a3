"""`mistral serve`: the real command in a subprocess on the tiny random model, on a free loopback port, driven by the
official `openai` client (and by raw HTTP where a client would hide what is tested). Its answers must equal
`mistral complete`'s with the same model, options and seed; refusals must be OpenAI's error object, never a traceback.
All traffic stays on 127.0.0.1."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import openai
import pytest

from inprocess import mistral

CONTEXT = "4096"  # a reply that runs to the end of the context takes seconds: long enough to cancel or queue behind
OPTIONS = ["--dtype", "fp32", "--max-context", CONTEXT]  # fp32: the same sums whatever the cache held before


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    home = tmp_path_factory.mktemp("serve-env")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "MISTRAL_", "OPENAI_"))}
    env.update(HF_HOME=str(home / "hf"), MISTRAL_HOME=str(home / "models"), HF_HUB_OFFLINE="1",
               MISTRAL_CONFIG=os.devnull)  # fmt: skip
    return env


class Served:
    """`mistral serve` in a subprocess, on the port it picks (--port 0, named by its ready line); its stderr lines
    are collected as they come."""

    def __init__(self, env: dict[str, str], *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mistral_cli", "serve", *args, "--port", "0"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # even when the tests run in the background
        )  # fmt: skip
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        try:
            self.url = self.wait_for(r"^mistral: serving \S+ on (http://127\.0\.0\.1:\d+/v1) \(Ctrl-C stops\)$", 120)[1]
        except AssertionError:
            self.proc.kill()
            raise

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, pattern: str, timeout: float = 10, after: int = 0) -> re.Match:
        """The first stderr line from number `after` on that matches `pattern`."""
        deadline = time.monotonic() + timeout
        while True:
            for line in self.lines[after:]:
                if m := re.search(pattern, line):
                    return m
            if time.monotonic() > deadline or (self.proc.poll() is not None and not self._reader.is_alive()):
                raise AssertionError(f"no line matching {pattern!r} in:\n" + "\n".join(self.lines))
            time.sleep(0.02)

    def client(self, key: str = "none") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url, api_key=key, max_retries=0, timeout=60)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        self.proc.send_signal(sig)
        code = self.proc.wait(20)
        self._reader.join(5)
        assert self.proc.stdout is not None and self.proc.stdout.read() == ""  # stdout is not the server's
        assert not [line for line in self.lines if "Traceback" in line], "\n".join(self.lines)
        return code


@pytest.fixture(scope="module")
def server(env, hf_model_dir):
    served = Served(env, str(hf_model_dir), *OPTIONS, "--queue", "1")
    yield served
    assert served.stop() == 0


@pytest.fixture(scope="module")
def keyed(env, hf_model_dir):
    """The model, its context and the key from MISTRAL_* variables (settings.py), as for the other commands; a
    sampling setting is for those only: a request brings its own."""
    settings = {"MISTRAL_API_KEY": "s3cret", "MISTRAL_MODEL": str(hf_model_dir), "MISTRAL_MAX_CONTEXT": "256",
                "MISTRAL_TEMPERATURE": "0.3"}  # fmt: skip
    served = Served({**env, **settings})
    yield served
    assert served.stop(signal.SIGINT) == 0


def local(env: dict[str, str], model, *args: str) -> str:
    """What `mistral complete` prints for the same model and options."""
    r = mistral(env, "complete", "-m", str(model), *OPTIONS, *args)
    assert r.returncode == 0, r.stderr
    return r.stdout


def printed(text: str) -> str:
    return text if text.endswith("\n") else text + "\n"  # as `complete` ends its output


def post(url: str, body: Any, headers: dict[str, str] | None = None) -> tuple[int, Any, Any]:
    """A raw POST: (status, headers, JSON answer)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, answer.headers, json.loads(answer.read())
    except urllib.error.HTTPError as e:
        return e.code, e.headers, json.loads(e.read())


def get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as answer:
        return json.loads(answer.read())


def refusal(answer: tuple[int, Any, Any], status: int = 400) -> dict[str, Any]:
    code, _, body = answer
    assert code == status, body
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert "Traceback" not in body["error"]["message"]
    return body["error"]


# ------------------------------------------------------------------------------------------------- the protocol


def test_requests_become_our_options_with_openai_defaults():
    from mistral_cli.serve.protocol import parse_chat, parse_completion

    req = parse_completion({"prompt": ["Hi"], "stop": "END", "extra": "ignored", "presence_penalty": 0})
    assert (req.prompt, req.chat, req.stream, req.options.stop) == ("Hi", False, False, ["END"])
    assert (req.options.temperature, req.options.top_p, req.options.max_tokens) == (1.0, 1.0, None)
    assert req.options.seed is not None  # drawn: a request without one is random
    req = parse_chat({
        "messages": [{"role": "developer", "content": "Be brief."},
                     {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
        "max_tokens": 5, "max_completion_tokens": 7, "top_k": 40, "repetition_penalty": 1.1, "seed": 3,
        "stream": True, "stream_options": {"include_usage": True}, "logprobs": False,
    })  # fmt: skip
    assert [(m.role, m.content) for m in req.messages] == [("system", "Be brief."), ("user", "a\nb")]
    o = req.options
    assert (o.max_tokens, o.top_k, o.repeat_penalty, o.seed, req.stream, req.include_usage) == (
        7,
        40,
        1.1,
        3,
        True,
        True,
    )


def test_prompts_are_built_as_mistral_complete_builds_them(hf_model_dir):
    from mistral_cli.cli.complete import build_prompt
    from mistral_cli.serve.protocol import ApiError, parse_chat, parse_completion
    from mistral_cli.text.chat_format import Message
    from mistral_cli.text.tokenizer import Tokenizer

    tok = Tokenizer(hf_model_dir / "tokenizer.model")
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}]
    ids = parse_chat({"messages": messages}).prompt_ids(tok, 4096)
    convo = [Message(m["role"], m["content"]) for m in messages]
    assert ids == build_prompt(tok, None, instruct=False, system=None, messages=convo)
    ids = parse_completion({"prompt": "Roses are"}).prompt_ids(tok, 4096)
    assert ids == build_prompt(tok, "Roses are", instruct=False, system=None, messages=None)
    with pytest.raises(ApiError, match="The prompt is 4 tokens, but the context holds 4") as e:
        parse_completion({"prompt": "Roses are"}).prompt_ids(tok, 4)
    assert (e.value.status, e.value.code) == (400, "context_length_exceeded")


# ------------------------------------------------------------------------------------------------------ answers


def test_completions_equal_mistral_complete(server, env, hf_model_dir):
    api = server.client()
    prompt = "The capital of France is"
    expected = local(env, hf_model_dir, "-t", "0", "-n", "12", prompt)
    whole = api.completions.create(model="any-name", prompt=prompt, max_tokens=12, temperature=0)
    assert printed(whole.choices[0].text) == expected
    assert whole.id.startswith("cmpl-") and whole.object == "text_completion" and whole.model == hf_model_dir.name
    assert whole.choices[0].finish_reason == "length" and whole.choices[0].index == 0
    assert (whole.usage.completion_tokens, whole.usage.total_tokens) == (12, whole.usage.prompt_tokens + 12)

    chunks = list(api.completions.create(model="m", prompt=[prompt], max_tokens=12, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks][-1] == "length" and all(c.id == chunks[0].id for c in chunks)

    seeded = api.completions.create(model="m", prompt=prompt, max_tokens=10, seed=7, extra_body={"top_k": 40})
    assert printed(seeded.choices[0].text) == local(env, hf_model_dir, "-t", "1", "--top-k", "40", "-n", "10",
                                                    "--seed", "7", prompt)  # fmt: skip


def test_chat_equals_mistral_complete_messages(server, env, hf_model_dir, tmp_path):
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Name a colour 🎨"},
    ]
    path = tmp_path / "convo.json"
    path.write_text(json.dumps(messages), encoding="utf-8")
    expected = local(env, hf_model_dir, "-t", "0", "-n", "16", "--messages", str(path))
    api = server.client()
    whole = api.chat.completions.create(model="m", messages=messages, max_completion_tokens=16, temperature=0)
    choice = whole.choices[0]
    assert printed(choice.message.content) == expected and choice.message.role == "assistant"
    assert whole.id.startswith("chatcmpl-") and whole.object == "chat.completion" and choice.finish_reason == "length"

    stream = api.chat.completions.create(model="m", messages=messages, max_tokens=16, temperature=0, stream=True,
                                         stream_options={"include_usage": True})  # fmt: skip
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    # the same conversation again: its prompt is all in the cache, with the logits it had (so the reply repeats)
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == whole.usage.prompt_tokens

    sampled = api.chat.completions.create(model="m", messages=messages, max_tokens=12, seed=3, top_p=0.9)
    assert printed(sampled.choices[0].message.content) == local(
        env, hf_model_dir, "-t", "1", "--top-p", "0.9", "-n", "12", "--seed", "3", "--messages", str(path)
    )
    # the next turn extends the sequence the cache holds: only its new tokens are read
    reply = {"role": "assistant", "content": sampled.choices[0].message.content}
    turn = api.chat.completions.create(model="m", messages=[*messages, reply, {"role": "user", "content": "More"}],
                                       max_tokens=2)  # fmt: skip
    assert turn.usage.prompt_tokens_details.cached_tokens >= whole.usage.prompt_tokens


def test_stop_strings_end_the_text_with_finish_stop(server):
    api = server.client()
    text = api.completions.create(model="m", prompt="Hello", max_tokens=30, temperature=0).choices[0].text
    stop = text[5:9]
    cut = api.completions.create(model="m", prompt="Hello", max_tokens=30, temperature=0, stop=["zzzz", stop])
    assert cut.choices[0].text == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].model_extra["stop_reason"] == stop


def test_models_and_health(server, hf_model_dir):
    (model,) = server.client().models.list().data
    assert (model.id, model.object, model.owned_by) == (hf_model_dir.name, "model", "mistral-cli")
    assert model.model_extra["max_model_len"] == int(CONTEXT)
    assert server.client().models.retrieve(hf_model_dir.name).id == hf_model_dir.name
    assert get(server.url.removesuffix("/v1") + "/health")["status"] == "ok"


def test_two_clients_at_once_are_both_answered(server):
    prompts = ["Once upon a time", "The weather today"]
    api = server.client()
    expected = [api.completions.create(model="m", prompt=p, max_tokens=40, temperature=0).choices[0].text
                for p in prompts]  # fmt: skip
    got: dict[int, str] = {}

    def ask(i: int) -> None:
        stream = server.client().completions.create(model="m", prompt=prompts[i], max_tokens=40, temperature=0,
                                                    stream=True)  # fmt: skip
        got[i] = "".join(c.choices[0].text for c in stream)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [got.get(0), got.get(1)] == expected


# ------------------------------------------------------------------------------------------ cancelling, queueing


def test_a_streamed_client_that_goes_away_cancels_its_generation(server):
    mark = len(server.lines)
    stream = server.client().completions.create(model="m", prompt="Tell me a story", temperature=0, stream=True)
    for _, _ in zip(range(3), stream, strict=False):
        pass
    stream.close()
    line = server.wait_for(r"POST /v1/completions 200 .*, (\d+) generated, cancelled: the client went away", 5, mark)
    assert int(line[1]) < 1000  # of the 4090 tokens it would have run to
    t0 = time.monotonic()
    server.client().completions.create(model="m", prompt="Next", max_tokens=4, temperature=0)
    assert time.monotonic() - t0 < 3


def test_a_waiting_client_that_goes_away_cancels_its_request(server):
    mark = len(server.lines)
    host, port = server.url.removeprefix("http://").removesuffix("/v1").split(":")
    body = json.dumps({"prompt": "Tell me a story", "temperature": 0}).encode()
    with socket.create_connection((host, int(port))) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
        time.sleep(0.5)
    server.wait_for(r"POST /v1/completions 499 .* generated, cancelled: the client went away", 5, mark)


def test_a_full_queue_answers_503_with_retry_after(server):
    """--queue 1: one request runs, one waits, the third is turned away."""
    api = server.client()
    running = api.completions.create(model="m", prompt="Tell me a story", temperature=0, stream=True)
    next(iter(running))
    waiting: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: waiting.update(answer=api.completions.create(
        model="m", prompt="Hi", max_tokens=3, temperature=0)))  # fmt: skip
    thread.start()
    health = server.url.removesuffix("/v1") + "/health"
    deadline = time.monotonic() + 10
    while get(health)["requests"] < 2:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    status, headers, body = post(server.url + "/completions", {"prompt": "Hi", "max_tokens": 3})
    error = refusal((status, headers, body), 503)
    assert error["code"] == "queue_full" and error["type"] == "server_error" and headers.get("Retry-After") == "2"
    running.close()
    thread.join(10)
    assert waiting["answer"].usage.completion_tokens == 3


# ---------------------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("body", "param", "needle"),
    [
        (b'{"prompt": "Hi",', None, "not valid JSON"),
        (b"[1, 2]", None, "must be a JSON object"),
        ({"prompt": "Hi", "n": 2}, "n", "n must be 1"),
        ({"prompt": "Hi", "temperature": -1}, "temperature", "temperature must be 0 (greedy) or more"),
        ({"prompt": "Hi", "max_tokens": "ten"}, "max_tokens", "'max_tokens' must be an integer"),
        ({"prompt": "Hi", "stop": [1]}, "stop", "'stop' must be a string or a list of strings"),
        ({"prompt": "Hi", "top_p": 0}, "top_p", "top_p must be in (0, 1]"),
        ({"prompt": "Hi", "logprobs": 21}, "logprobs", "logprobs must be between 0 and 20, not 21"),
        ({"messages": [{"role": "user", "content": "Hi"}], "top_logprobs": 2}, "top_logprobs", "needs logprobs"),
        ({"prompt": "Hi", "echo": True, "logprobs": 1, "stream": True}, "echo", "leave out stream"),
        ({"prompt": "Hi", "guided_regex": "a", "guided_grammar": "b"}, "guided_grammar", "Send one of"),
        ({"prompt": "Hi", "response_format": {"type": "xml"}}, "response_format", "response_format type must be"),
        ({"prompt": "Hi", "guided_grammar": "start: nothing_defined\n"}, "response_format", "cannot be used"),
        ({"prompt": ["a", "b"]}, "prompt", "one prompt per request"),
        ({"prompt": "word " * 5000}, "prompt", "The prompt is 5,002 tokens, but the context holds 4,096"),
        ({"prompt": "word " * 50000}, "prompt", "The prompt is over "),
        ({"messages": []}, "messages", "non-empty list"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages", 'unknown role "tool"'),
        (
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
            "messages",
            "must end with a user message",
        ),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages", "reads text only"),
    ],
)
def test_bad_requests_are_400s_in_openai_shape(server, body, param, needle):
    chat = isinstance(body, dict) and "messages" in body
    error = refusal(post(server.url + ("/chat/completions" if chat else "/completions"), body))
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert needle in error["message"], error["message"]


# ---------------------------------------------------------------------------------------------- log-probabilities


def _local_json(env, model, *args: str) -> dict[str, Any]:
    return json.loads(local(env, model, "--json", *args))


def test_chat_logprobs_equal_mistral_complete_s(server, env, hf_model_dir, tmp_path):
    messages = [{"role": "user", "content": "Name a colour."}]
    (tmp_path / "m.json").write_text(json.dumps(messages))
    expected = _local_json(env, hf_model_dir, "-t", "0", "-n", "6", "--logprobs", "3", "--messages",
                           str(tmp_path / "m.json"))["logprobs"]["content"]  # fmt: skip
    api = server.client()
    whole = api.chat.completions.create(model="m", messages=messages, max_tokens=6, temperature=0, logprobs=True,
                                        top_logprobs=3)  # fmt: skip
    got = whole.choices[0].logprobs.content
    assert [(t.token, t.bytes) for t in got] == [(e["token"], e["bytes"]) for e in expected]
    assert [t.logprob for t in got] == pytest.approx([e["logprob"] for e in expected], abs=1e-4)
    assert [[a.token for a in t.top_logprobs] for t in got] == [
        [a["token"] for a in e["top_logprobs"]] for e in expected
    ]
    streamed = api.chat.completions.create(model="m", messages=messages, max_tokens=6, temperature=0, logprobs=True,
                                           top_logprobs=3, stream=True)  # fmt: skip
    pieces = [t for c in streamed if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [t.logprob for t in pieces] == pytest.approx([e["logprob"] for e in expected], abs=1e-4)


def test_complete_over_the_server_reports_the_logprobs_a_local_run_does(server, env, hf_model_dir):
    for args in (["The capital of France is"], ["--instruct", "Name a colour."]):
        expected = _local_json(env, hf_model_dir, "-t", "0", "-n", "6", "--logprobs", "3", *args)
        r = mistral(env, "complete", "--server", server.url, "--json", "-t", "0", "-n", "6", "--logprobs", "3", *args)
        assert r.returncode == 0, r.stderr
        got = json.loads(r.stdout)
        assert got["text"] == expected["text"]
        g, e = got["logprobs"]["content"], expected["logprobs"]["content"]
        assert [t["token"] for t in g] == [t["token"] for t in e] and len(g) == 6
        assert [t["logprob"] for t in g] == pytest.approx([t["logprob"] for t in e], abs=1e-4)
        assert [[a["token"] for a in t["top_logprobs"]] for t in g] == [
            [a["token"] for a in t["top_logprobs"]] for t in e
        ]
        # the chat API carries our token ids (`id`); the completions API has no place for them
        assert [t["id"] for t in g] == ([t["id"] for t in e] if "--instruct" in args else [-1] * 6)
    r = mistral(env, "complete", "--server", server.url, "--json", "--echo", "--logprobs", "1", "Hi")
    assert r.returncode != 0 and "not with --server" in r.stderr


def test_completions_score_an_echoed_prompt_as_evaluation_harnesses_ask(server, env, hf_model_dir):
    prompt = "Paris is the capital of France"
    expected = _local_json(env, hf_model_dir, "-t", "0", "-n", "0", "--echo", "--logprobs", "2", prompt)
    whole = server.client().completions.create(model="m", prompt=prompt, max_tokens=0, echo=True, logprobs=2)
    choice = whole.choices[0]
    assert choice.text == prompt
    scored = expected["prompt_logprobs"]
    assert choice.logprobs.token_logprobs[0] is None and len(choice.logprobs.tokens) == len(scored)
    assert choice.logprobs.token_logprobs[1:] == pytest.approx([e["logprob"] for e in scored[1:]], abs=1e-4)
    assert all(len(top) == 2 for top in choice.logprobs.top_logprobs[1:])
    assert "".join(choice.logprobs.tokens) == " " + prompt  # BOS, then the text's pieces with their spaces


def test_response_format_json_schema_and_regex(server):
    import jsonschema

    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
              "ok": {"type": "boolean"}}, "required": ["n", "ok"], "additionalProperties": False}  # fmt: skip
    api = server.client()
    for seed in range(3):
        answer = api.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "JSON please"}], max_tokens=40, seed=seed,
            response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": schema, "strict": True}},
        )  # fmt: skip
        jsonschema.validate(json.loads(answer.choices[0].message.content), schema)
        assert answer.choices[0].finish_reason == "stop"
    text = api.completions.create(model="m", prompt="Count:", max_tokens=20, extra_body={"guided_regex": "[0-9]{3}"})
    assert re.fullmatch("[0-9]{3}", text.choices[0].text)


def test_the_openai_client_raises_the_server_s_sentence(server):
    with pytest.raises(openai.BadRequestError, match="n must be 1"):
        server.client().chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}], n=2)
    error = refusal(post(server.url.removesuffix("/v1") + "/v2/nothing", {}), 404)
    assert "There is no /v2/nothing here" in error["message"]
    assert server.wait_for(r"POST /v2/nothing 404 in [\d.]+ s: There is no")


def test_the_api_key_is_required(keyed):
    messages = [{"role": "user", "content": "Hi"}]
    for key in ("none", "wrong"):
        with pytest.raises(openai.AuthenticationError):
            keyed.client(key).chat.completions.create(model="m", messages=messages, max_tokens=2)
    assert refusal(post(keyed.url + "/completions", {"prompt": "x"}), 401)["code"] == "invalid_api_key"
    api = keyed.client("s3cret")
    assert api.chat.completions.create(model="m", messages=messages, max_tokens=2).usage.completion_tokens == 2
    assert api.models.list().data[0].model_extra["max_model_len"] == 256  # MISTRAL_MAX_CONTEXT
    assert get(keyed.url.removesuffix("/v1") + "/health")["status"] == "ok"  # open to a load balancer
    assert not [line for line in keyed.lines if "s3cret" in line]


class Failing:
    """An engine whose generation fails after one token, with `error`."""

    max_context = 64

    def __init__(self, tokenizer: Any, error: Exception) -> None:
        self.tokenizer, self.error, self.resets = tokenizer, error, 0

    def generate(self, prompt: list[int], options: Any, *, leading_space: bool = False, **_: Any):
        from mistral_cli.engine.events import Chunk

        yield Chunk("a", 5)
        raise self.error

    def reset(self) -> None:
        self.resets += 1


@contextlib.contextmanager
def in_process(engine: Any, verbose: bool):
    """serve/app.py's Api on `engine`, run by uvicorn in a thread of this process: (its URL, its log lines)."""
    import uvicorn

    from mistral_cli.serve.app import Api

    lines: list[str] = []
    api = Api(engine, "fake", api_key=None, waiting=1, log=lines.append, verbose=verbose)
    server = uvicorn.Server(uvicorn.Config(api, lifespan="on", log_config=None, log_level="error", access_log=False))
    sock = socket.create_server(("127.0.0.1", 0))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]})
    thread.start()
    try:
        while not server.started:
            assert thread.is_alive()
            time.sleep(0.01)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1", lines
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.mark.parametrize("verbose", [False, True])
def test_a_failing_engine_is_a_500_in_one_sentence(hf_model_dir, verbose):
    from mistral_cli.errors import MistralError
    from mistral_cli.text.tokenizer import Tokenizer

    tok = Tokenizer(hf_model_dir / "tokenizer.model")
    engine = Failing(tok, ValueError("a bug\nsecond line"))
    with in_process(engine, verbose) as (url, lines):
        error = refusal(post(url + "/completions", {"prompt": "Hi"}), 500)
        assert error["type"] == "server_error"
        assert error["message"] == (
            "Internal error (ValueError: a bug); this is a bug in mistral-cli, and `mistral serve --verbose` logs its "
            "traceback."
        )
        api = openai.OpenAI(base_url=url, api_key="none", max_retries=0)
        with pytest.raises(openai.APIError, match="Internal error"):
            list(api.completions.create(model="m", prompt="Hi", stream=True))
        assert any("POST /v1/completions 500 in" in line and "Internal error" in line for line in lines)
        assert any("Traceback" in line for line in lines) == verbose
        assert engine.resets == 2  # its cache may not match its tokens after a bug: the next prompt starts afresh
    engine = Failing(tok, MistralError("The model produced NaN logits."))
    with in_process(engine, verbose) as (url, lines):
        error = refusal(post(url + "/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}), 500)
        assert error["message"] == "The model produced NaN logits." and engine.resets == 0
        assert not any("Traceback" in line for line in lines)


# ------------------------------------------------------------------------------------------------ the process


def test_sigterm_cancels_what_runs_and_exits_0(env, hf_model_dir):
    served = Served(env, str(hf_model_dir), *OPTIONS)
    try:
        stream = served.client().completions.create(model="m", prompt="Tell me a story", temperature=0, stream=True)
        next(iter(stream))
        t0 = time.monotonic()
        assert served.stop() == 0
        assert time.monotonic() - t0 < 10
    finally:
        served.proc.kill()  # nothing, once it has stopped
    with contextlib.suppress(openai.APIError):  # the shutdown's error event, or the connection closing
        for _ in stream:
            pass
    assert served.wait_for(r"POST /v1/completions 200 .*cancelled: the server is stopping")


def test_a_taken_port_is_one_sentence(env, hf_model_dir):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "mistral_cli", "serve", str(hf_model_dir), "--port", str(port)],
                           env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
        assert (r.returncode, r.stdout) == (1, "")
        assert r.stderr == f"mistral: error: 127.0.0.1:{port} is already in use: stop what listens there, or pick " \
                           "another --port.\n"  # fmt: skip
        # a host beyond loopback without a key is warned about first (the bind fails: nothing is served anywhere)
        r = subprocess.run([sys.executable, "-m", "mistral_cli", "serve", str(hf_model_dir), "--port", str(port),
                            "--host", "0.0.0.0"], env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
        assert r.returncode == 1
        warning, error = r.stderr.splitlines()
        assert warning.startswith("mistral: warning: serving on 0.0.0.0 without --api-key")
        assert error.startswith("mistral: error: 0.0.0.0:") and "already in use" in error


def test_the_command_line_starts_without_the_server_packages():
    code = "import sys; import mistral_cli.cli.app; print(sorted({m.split('.')[0] for m in sys.modules}))"
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                       check=True).stdout.replace("'", '"'))  # fmt: skip
    assert not {"fastapi", "uvicorn", "starlette", "openai", "torch"} & set(loaded)
