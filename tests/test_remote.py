"""`--server`: chat, complete and info against OpenAI-compatible servers on 127.0.0.1, through the real command.

Two servers: `mistral serve` on the tiny random model, whose replies must equal the local run's (greedy, same model and
options); and `FakeOpenAI` below, a real HTTP server on a loopback port speaking just enough of the protocol to
produce what `mistral serve` cannot: a required key, a web page, a stream cut mid-reply, a 503 with Retry-After, a
reply slow enough to interrupt; and it records every request, so what the client sends is checked too.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from mistral_cli.errors import MistralError, UsageError
from mistral_cli.options import GenerationOptions
from mistral_cli.remote.client import EstimateTokenizer, RemoteEngine, api_url
from terminal import Tmux

KEY = "sk-test-secret-4242"
REPLY = ["Hello", " from", " the", " fake", " server", "."]


class FakeOpenAI(ThreadingHTTPServer):
    """GET /v1/models, POST /v1/chat/completions and /v1/completions (streamed as server-sent events, in chunked
    transfer encoding), and the faults its attributes ask for."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.models: list[dict[str, Any]] = [
            {"id": "fake-7b", "object": "model", "owned_by": "tests", "max_model_len": 4096},
            {"id": "other-model", "object": "model", "owned_by": "tests"},
        ]
        self.reply = list(REPLY)
        self.key: str | None = None  # the bearer key required, if any
        self.html = False  # answer everything with a web page
        self.cut_after: int | None = None  # close the connection after this many pieces of the reply
        self.hang_after: int | None = None  # stop sending (and hold the connection) after this many pieces
        self.delay = 0.0  # seconds between pieces
        self.busy: list[int] = []  # statuses to answer first, one per request, with Retry-After
        self.refuse: tuple[int, str] | None = None  # a status and message for every generation
        self.requests: list[dict[str, Any]] = []  # {"path", "auth", "headers", "body"}
        self.aborted = threading.Event()  # a client went away mid-stream
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that went away is no news here
            super().handle_error(request, client_address)

    def bodies(self, path: str) -> list[dict[str, Any]]:
        return [r["body"] for r in self.requests if r["path"] == path]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FakeOpenAI

    def log_message(self, *args: Any) -> None:
        pass

    def _json(self, status: int, data: Any, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _refused(self) -> bool:
        """The answers that come before any content: a web page, a missing key, a busy server."""
        s = self.server
        if s.html:
            page = b"<!DOCTYPE html><html><body><h1>Welcome to nginx!</h1></body></html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)
            return True
        if s.key is not None and self.headers.get("Authorization") != f"Bearer {s.key}":
            # as some hosted APIs do, the answer repeats the key it got: the client must not print it
            got = self.headers.get("Authorization", "")
            self._json(401, {"error": {"message": f"Incorrect API key provided: {got}", "type": "auth"}})
            return True
        if s.busy:
            status = s.busy.pop(0)
            self._json(status, {"error": {"message": "Overloaded"}}, {"Retry-After": "1"})
            return True
        return False

    def do_GET(self) -> None:
        self.server.requests.append(
            {"path": self.path, "auth": self.headers.get("Authorization"), "headers": dict(self.headers), "body": None}
        )
        if self._refused():
            return
        if self.path == "/v1/models":
            self._json(200, {"object": "list", "data": self.server.models})
        else:
            self._json(404, {"error": {"message": f"no route {self.path}"}})

    def do_POST(self) -> None:
        s = self.server
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        s.requests.append(
            {"path": self.path, "auth": self.headers.get("Authorization"), "headers": dict(self.headers), "body": body}
        )
        if self._refused():
            return
        if self.path not in ("/v1/chat/completions", "/v1/completions"):
            self._json(404, {"error": {"message": f"no route {self.path}"}})
            return
        if body.get("model") not in [m["id"] for m in s.models]:
            self._json(404, {"error": {"message": f"The model `{body.get('model')}` does not exist."}})
            return
        if s.refuse is not None:
            self._json(s.refuse[0], {"error": {"message": s.refuse[1], "type": "BadRequestError"}})
            return
        self._stream(body, chat=self.path == "/v1/chat/completions")

    def _stream(self, body: dict[str, Any], chat: bool) -> None:
        s = self.server
        pieces = s.reply[: body["max_tokens"]] if body.get("max_tokens") is not None else s.reply
        finish = "length" if len(pieces) < len(s.reply) else "stop"
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

        def send(data: Any) -> None:
            event = f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
            self.wfile.flush()

        def chunk(text: str | None, reason: str | None) -> dict[str, Any]:
            choice: dict[str, Any] = {"index": 0, "finish_reason": reason}
            if chat:
                choice["delta"] = {"content": text} if text is not None else {}
            else:
                choice["text"] = text or ""
            kind = "chat.completion.chunk" if chat else "text_completion"
            return {"id": "x", "object": kind, "created": 0, "model": body["model"], "choices": [choice]}

        try:
            for i, piece in enumerate(pieces):
                if i == s.cut_after:
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)  # no end of the chunked body: a cut
                    return
                if i == s.hang_after:
                    time.sleep(30)
                    return
                send(chunk(piece, None))
                time.sleep(s.delay)
            send(chunk(None, finish))
            if (body.get("stream_options") or {}).get("include_usage"):
                usage = {"prompt_tokens": 11, "completion_tokens": len(pieces), "total_tokens": 11 + len(pieces)}
                send({"id": "x", "object": "chat.completion.chunk", "created": 0, "model": body["model"],
                      "choices": [], "usage": usage})  # fmt: skip
            send("[DONE]")
            self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            s.aborted.set()


@pytest.fixture
def fake():
    server = FakeOpenAI()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def env(tmp_path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "MISTRAL_", "OPENAI_", "TMUX"))}
    env.update(
        HF_HOME=str(tmp_path / "hf"),
        MISTRAL_HOME=str(tmp_path / "models"),
        HF_HUB_OFFLINE="1",
        MISTRAL_CONFIG=os.devnull,
        MISTRAL_CHAT_HISTORY=str(tmp_path / "history"),
    )
    return env


def mistral(env: dict[str, str], *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mistral_cli", *args], input=stdin, env=env, capture_output=True, text=True, timeout=120
    )


def one_sentence(r: subprocess.CompletedProcess, code: int = 1) -> str:
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("mistral: error: ")]
    assert len(lines) == 1, r.stderr
    return lines[0].removeprefix("mistral: error: ")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------------ pure parts


def test_server_urls_end_in_v1():
    for given in ("http://h:8000", "http://h:8000/", "http://h:8000/v1", " http://h:8000/v1/ "):
        assert api_url(given) == "http://h:8000/v1"
    assert api_url("https://example.com/api") == "https://example.com/api/v1"
    for bad, needle in [
        ("localhost:8000", "needs an http:// or https:// URL"),
        ("ftp://h", "needs an http"),
        ("http://h:port", "needs an http"),
        ("http://user:pw@h:8000", "must not hold credentials"),
        ("http://h:8000/v1?x=1", "without a query"),
    ]:
        with pytest.raises(UsageError, match=needle) as e:
            api_url(bad)
        assert "pw" not in str(e.value)


def test_the_estimate_counts_three_bytes_a_token():
    tok = EstimateTokenizer()
    assert len(tok.encode("")) == 0
    assert len(tok.encode("abcd")) == 2
    assert len(tok.encode("日本語")) == 3  # three bytes each: one token a character, as SentencePiece gives


def test_the_engine_interface_streams_chunks_and_a_done(fake):
    from mistral_cli.engine.events import Chunk, Done

    engine = RemoteEngine(fake.url, None).connect()
    assert (engine.model, engine.max_context) == ("fake-7b", 4096)  # the first listed, and its max_model_len
    assert RemoteEngine(fake.url, None, "other-model").connect().max_context == 32768  # no size listed
    assert RemoteEngine(fake.url, None, max_context=1000).connect().max_context == 1000  # --max-context wins
    events = list(engine.complete("Hi", GenerationOptions(temperature=0, max_tokens=3)))
    assert [e.text for e in events if isinstance(e, Chunk)] == REPLY[:3]
    done = events[-1]
    assert isinstance(done, Done)
    assert (done.text, done.finish_reason) == ("Hello from the", "length")
    assert (done.completion_tokens, done.prompt_tokens) == (3, 11)  # the server's usage
    assert done.prefill_s > 0 and done.decode_s >= 0
    # no --max-tokens: "length" can only be the context
    fake.reply = REPLY * 2
    events = list(engine.chat([], GenerationOptions(max_tokens=None), system="S"))
    assert events[-1].finish_reason == "stop"


def test_a_silent_stream_times_out_keeping_what_came(fake):
    fake.hang_after = 2
    engine = RemoteEngine(fake.url, None, "fake-7b", timeout=0.5)
    got = []
    with pytest.raises(MistralError, match=r"cut the reply off before it was finished \(nothing came for 0.5 s\)"):
        for event in engine.complete("Hi", GenerationOptions()):
            got.append(event.text)
    assert got == REPLY[:2]


# -------------------------------------------------------------------------------------------- complete, fake server


def test_complete_raw_and_instruct(fake, env):
    # the user's OpenAI settings are for OpenAI: none of them reaches another server
    openai_env = {"OPENAI_API_KEY": "sk-openai-user-key", "OPENAI_ORG_ID": "org-user", "OPENAI_BASE_URL": "http://x"}
    r = mistral({**env, **openai_env}, "complete", "--server", fake.url + "/v1/", "Once upon", "-n", "4", "-t", "0")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "".join(REPLY[:4]) + "\n" and r.stderr == ""
    models, body = fake.requests[0], fake.requests[1]["body"]
    assert models["path"] == "/v1/models"  # the default model: the first the server lists
    assert body == {
        "model": "fake-7b", "prompt": "Once upon", "stream": True, "stream_options": {"include_usage": True},
        "temperature": 0.0, "top_p": 1.0, "max_tokens": 4, "seed": body["seed"],
    }  # fmt: skip
    assert fake.requests[1]["auth"] == "Bearer none"  # no key given
    assert not any("org-user" in str(q["headers"]) for q in fake.requests)

    # --instruct with --system: the chat endpoint, a named model (no listing), --echo, and the extra sampling fields
    fake.requests.clear()
    r = mistral(env, "complete", "--server", fake.url, "-m", "fake-7b", "--system", "Be brief.", "Hi", "--echo",
                "--top-k", "5", "--min-p", "0.1", "--repeat-penalty", "1.2", "--stop", "END", "--seed", "7")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout == "Hi\n\n" + "".join(REPLY) + "\n"
    assert [q["path"] for q in fake.requests] == ["/v1/chat/completions"]
    body = fake.requests[0]["body"]
    assert body["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert (body["top_k"], body["min_p"], body["repetition_penalty"], body["repeat_penalty"]) == (5, 0.1, 1.2, 1.2)
    assert (body["stop"], body["seed"]) == (["END"], 7)


def test_output_formats_go_as_response_format_or_vllm_s_fields(fake, env):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    cases = [
        (["--instruct", "--format", "json"], "response_format", {"type": "json_object"}),
        (["--instruct", "--json-schema", json.dumps(schema)], "response_format",
         {"type": "json_schema", "json_schema": {"name": "output", "schema": schema, "strict": True}}),
        (["--json-schema", json.dumps(schema)], "response_format",
         {"type": "json_schema", "json_schema": {"name": "output", "schema": schema, "strict": True}}),
        (["--regex", "[0-9]+"], "guided_regex", "[0-9]+"),
    ]  # fmt: skip
    for args, field, value in cases:
        fake.requests.clear()
        r = mistral(env, "complete", "--server", fake.url, "-m", "fake-7b", *args, "Hi", "-n", "3")
        assert r.returncode == 0, r.stderr
        assert fake.requests[0]["body"][field] == value, args


def test_complete_messages_json_and_verbose(fake, env, tmp_path):
    conversation = [
        {"role": "user", "content": "One"}, {"role": "user", "content": "Two"},
        {"role": "assistant", "content": "Yes"}, {"role": "user", "content": "Three"},
    ]  # fmt: skip
    (tmp_path / "m.json").write_text(json.dumps(conversation))
    r = mistral(env, "complete", "--server", fake.url, "--messages", str(tmp_path / "m.json"), "--json", "-t", "0",
                "--verbose", "--api-key", KEY)  # fmt: skip
    assert r.returncode == 0, r.stderr
    # two user messages in a row are one turn, as the instruct format reads them (strict templates refuse them)
    assert fake.bodies("/v1/chat/completions")[0]["messages"] == [
        {"role": "user", "content": "One\n\nTwo"}, {"role": "assistant", "content": "Yes"},
        {"role": "user", "content": "Three"},
    ]  # fmt: skip
    out = json.loads(r.stdout)
    assert out["text"] == "".join(REPLY) and out["finish_reason"] == "stop"
    assert out["usage"] == {"prompt_tokens": 11, "completion_tokens": len(REPLY)}  # the server's count
    assert out["timings"]["load_s"] == 0 and out["timings"]["prefill_s"] > 0
    assert (out["model"], out["server"]) == ("fake-7b", fake.url + "/v1")
    assert "fake-7b on http://127.0.0.1" in r.stderr and "first token after" in r.stderr
    assert all(q["auth"] == f"Bearer {KEY}" for q in fake.requests)
    assert KEY not in r.stderr + r.stdout


def test_hardware_options_and_truncate(fake, env):
    r = mistral(env, "complete", "--server", fake.url, "--device", "cpu", "Hi")
    assert "--device is for a model run on this machine, not with --server" in one_sentence(r, 2)
    r = mistral({**env, "MISTRAL_SERVER": fake.url}, "chat", "--quantize", "int8")
    assert "but MISTRAL_SERVER is set: leave --quantize out" in one_sentence(r, 2)
    r = mistral(env, "complete", "--api-key", KEY, "Hi")
    assert one_sentence(r, 2) == "--api-key is the key of a --server; a model run here needs none."
    # from the environment they are ignored; --truncate is the server's business
    r = mistral({**env, "MISTRAL_SERVER": fake.url, "MISTRAL_DEVICE": "cuda", "MISTRAL_THREADS": "3"},
                "complete", "Hi", "--truncate")  # fmt: skip
    assert r.returncode == 0 and r.stdout == "".join(REPLY) + "\n"
    assert r.stderr == "mistral: note: --truncate does nothing with --server: the server decides what fits.\n"


# ------------------------------------------------------------------------------------------------------- failures


def test_connection_refused(env):
    url = f"http://127.0.0.1:{free_port()}"
    r = mistral(env, "complete", "--server", url, "Hi")
    assert one_sentence(r) == (
        f"Cannot reach the server at {url}/v1 (connection refused); check the URL and that the server is running."
    )


def test_keys(fake, env):
    fake.key = KEY
    r = mistral(env, "complete", "--server", fake.url, "Hi")
    assert "wants an API key (401 Unauthorized): give it with --api-key or MISTRAL_API_KEY" in one_sentence(r)
    r = mistral({**env, "MISTRAL_API_KEY": "sk-wrong-key-1"}, "chat", "--server", fake.url, "--verbose")
    assert "refused the API key (401 Unauthorized): check --api-key" in one_sentence(r)
    assert "sk-wrong-key-1" not in r.stderr + r.stdout
    r = mistral({**env, "MISTRAL_API_KEY": KEY}, "complete", "--server", fake.url, "Hi")
    assert r.returncode == 0 and r.stdout == "".join(REPLY) + "\n"


def test_unknown_model_lists_the_served_ones(fake, env):
    r = mistral(env, "complete", "--server", fake.url, "-m", "mistral", "Hi")
    assert one_sentence(r) == (
        f"The server at {fake.url}/v1 has no model 'mistral' (it lists: fake-7b, other-model); pick one with --model."
    )


def test_a_web_page_is_not_the_api(fake, env):
    fake.html = True
    r = mistral(env, "complete", "--server", fake.url, "-m", "fake-7b", "Hi")
    assert one_sentence(r) == (
        f"The server at {fake.url}/v1 answered /v1/completions with a web page, not the OpenAI API; check the URL."
    )
    r = mistral(env, "info", "--server", fake.url)
    assert "answered /v1/models with a web page" in one_sentence(r)


def test_a_refused_request_names_the_servers_answer(fake, env):
    fake.refuse = (400, "This model's maximum context length is 4096 tokens.")
    r = mistral(env, "complete", "--server", fake.url, "Hi")
    assert one_sentence(r) == (
        f"The server at {fake.url}/v1 refused the request (400 Bad Request): This model's maximum context length "
        "is 4096 tokens."
    )


def test_busy_is_retried_as_retry_after_asks(fake, env):
    fake.busy = [503]
    start = time.monotonic()
    r = mistral(env, "complete", "--server", fake.url, "-m", "fake-7b", "Hi")
    assert r.returncode == 0 and r.stdout == "".join(REPLY) + "\n", r.stderr
    assert time.monotonic() - start >= 1  # Retry-After: 1
    fake.busy = [429, 429, 429]
    r = mistral(env, "complete", "--server", fake.url, "-m", "fake-7b", "Hi")
    assert "is busy (429 Too Many Requests: Overloaded) and still was after 2 retries" in one_sentence(r)


def test_a_stream_cut_mid_reply_keeps_what_came(fake, env):
    fake.cut_after = 3
    r = mistral(env, "complete", "--server", fake.url, "Hi")
    assert r.stdout == "".join(REPLY[:3]) + "\n"
    assert f"The server at {fake.url}/v1 cut the reply off before it was finished" in one_sentence(r)


# ----------------------------------------------------------------------------------------------------------- info


def test_info_lists_the_served_models(fake, env):
    r = mistral(env, "info", "--server", fake.url)
    assert r.returncode == 0, r.stderr
    assert re.search(r"fake-7b\s+4,096\s+tests", r.stdout) and re.search(r"other-model\s+-\s+tests", r.stdout)
    r = mistral(env, "info", "--server", fake.url, "other-model", "--json")
    assert json.loads(r.stdout) == {"server": fake.url + "/v1", "models": [fake.models[1]]}
    r = mistral(env, "info", "--server", fake.url, "nope")
    assert "lists no model 'nope'" in one_sentence(r)
    r = mistral(env, "info", "--server", fake.url, "--prune")
    assert "leave it out with --server" in one_sentence(r, 2)


# ----------------------------------------------------------------------------------------------------------- chat


def test_chat_from_a_pipe_sends_the_history(fake, env):
    # MISTRAL_MAX_CONTEXT was set for this machine's memory: the server's own size counts
    r = mistral({**env, "MISTRAL_MAX_CONTEXT": "1000"}, "chat", "--server", fake.url, "--system", "Be kind.", "-t", "0",
                stdin="First\nSecond\n/info\n")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("".join(REPLY)) == 2
    assert "remote: served by " + fake.url + "/v1" in r.stdout
    assert re.search(r"context +~\d+ of 4,096 tokens used \(estimated", r.stdout)
    second = fake.bodies("/v1/chat/completions")[1]["messages"]
    assert second == [
        {"role": "system", "content": "Be kind."}, {"role": "user", "content": "First"},
        {"role": "assistant", "content": "".join(REPLY)}, {"role": "user", "content": "Second"},
    ]  # fmt: skip
    r = mistral(env, "chat", "--server", fake.url, "--max-context", "1000", stdin="/info\n")
    assert "of 1,000 tokens used" in r.stdout


def test_chat_stream_cut_keeps_the_partial_reply(fake, env, tmp_path):
    fake.cut_after = 2
    saved = tmp_path / "c.json"
    r = mistral(env, "chat", "--server", fake.url, stdin=f"Hi\n/save {saved}\n")
    assert r.returncode == 1
    assert r.stdout.startswith("".join(REPLY[:2]) + "\n")
    assert "[stopped by an error]" in r.stderr and "cut the reply off before it was finished" in r.stderr
    data = json.loads(saved.read_text())
    assert data[1] == {"role": "assistant", "content": "".join(REPLY[:2])}
    assert data[0]["metadata"]["cut"] == [{"message": 1, "finish_reason": "error"}]


@pytest.fixture
def tmux(tmp_path, env):
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed")
    sessions: list[Tmux] = []

    def start(*args: str) -> Tmux:
        command = " ".join(shlex.quote(a) for a in [sys.executable, "-m", "mistral_cli", "chat", *args])
        sessions.append(Tmux(command, env, tmp_path))
        return sessions[-1]

    yield start
    for s in sessions:
        s.close()


def test_chat_in_a_terminal(fake, tmux, tmp_path):
    t = tmux("--server", fake.url)
    t.wait(r"fake-7b · http://127\.0\.0\.1:\d+/v1 · 4k context\. /help lists the commands")
    t.wait(r"fake-7b · ~0/4k tokens")  # the status line: an estimate
    t.type("/set temperature 0")
    t.keys("Enter")
    t.wait(r"temperature = 0\.0")
    t.type("Hello there")
    t.keys("Enter")
    t.wait(r"Hello from the fake server\.")
    t.wait(r"fake-7b · ~\d+/4k tokens · [\d.]+ tok/s")
    assert fake.bodies("/v1/chat/completions")[-1]["temperature"] == 0.0
    t.type("/retry")
    t.keys("Enter")
    t.wait(r"Hello from the fake server\.", count=2)
    assert fake.bodies("/v1/chat/completions")[-1]["messages"] == [{"role": "user", "content": "Hello there"}]

    # Ctrl-C during a slow reply: the stream is closed (the server sees it), the partial reply kept and marked
    fake.delay, fake.reply = 0.3, [f" word{i}" for i in range(100)]
    t.type("Tell me a long story")
    t.keys("Enter")
    t.wait(r"word2")
    t.keys("C-c")
    t.wait(r"\[interrupted\]")
    assert fake.aborted.wait(5)
    t.type("/info")
    t.keys("Enter")
    t.wait(r"model +fake-7b, remote: served by http://127\.0\.0\.1:\d+/v1")
    t.wait(r"history +2 exchanges")
    saved = tmp_path / "chat.json"
    t.type(f"/save {saved}")
    t.keys("Enter")
    t.wait(r"Saved 4 messages")
    t.type("/exit")
    t.keys("Enter")
    t.wait(r"EXIT=0")
    data = json.loads(saved.read_text())
    assert data[3]["content"].startswith(" word0 word1 word2")
    assert data[0]["metadata"]["cut"] == [{"message": 3, "finish_reason": "interrupted"}]


# --------------------------------------------------------------------------------------------- start-up imports


def test_the_remote_path_imports_no_torch_and_help_no_openai(fake, env):
    code = (
        "import sys, runpy; sys.argv = ['mistral', *sys.argv[1:]]\n"
        "try:\n    runpy.run_module('mistral_cli', run_name='__main__')\n"
        "finally:\n    print(sorted(m for m in ('torch', 'openai') if m in sys.modules), file=sys.stderr)\n"
    )
    run = [sys.executable, "-c", code]
    r = subprocess.run([*run, "complete", "--server", fake.url, "Hi"], env=env, capture_output=True, text=True)
    assert r.returncode == 0 and r.stderr.strip() == "['openai']", r.stderr
    r = subprocess.run([*run, "chat", "--server", fake.url], input="Hi\n", env=env, capture_output=True, text=True)
    assert r.returncode == 0 and r.stderr.strip() == "['openai']", r.stderr
    r = subprocess.run([*run, "--help"], env=env, capture_output=True, text=True)
    assert r.stderr.strip() == "[]", r.stderr


# ------------------------------------------------------------------------------------- against `mistral serve`

CONTEXT = "2048"


@pytest.fixture
def serve(hf_model_dir, env, tmp_path):
    """`mistral serve` on the tiny model, on a free loopback port; skipped where the command does not exist yet."""
    if (
        importlib.util.find_spec("mistral_cli.serve") is None
        and importlib.util.find_spec("mistral_cli.cli.serve") is None
    ):
        pytest.skip("mistral serve is not in this tree yet")
    port = free_port()
    env = {**env, "MISTRAL_DTYPE": "fp32"}
    log = tmp_path / "serve.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mistral_cli", "serve", str(hf_model_dir), "--port", str(port), "--max-context",
         CONTEXT],
        env=env, stdout=subprocess.DEVNULL, stderr=log.open("w"),
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        with contextlib.suppress(OSError), urllib.request.urlopen(url + "/health", timeout=2) as answer:
            if answer.status == 200:
                break
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"mistral serve did not start: {log.read_text()}")
        time.sleep(0.2)
    yield url
    proc.terminate()
    proc.wait(10)


@pytest.mark.parametrize("kind", [[], ["--instruct"], ["--instruct", "--system", "Answer in French."]])
def test_complete_via_serve_equals_the_local_run(serve, hf_model_dir, env, kind):
    common = ["Hello there", "-n", "12", "-t", "0", *kind]
    env = {**env, "MISTRAL_DTYPE": "fp32"}
    local = mistral(env, "complete", "-m", str(hf_model_dir), "--max-context", CONTEXT, *common)
    remote = mistral(env, "complete", "--server", serve, *common)
    assert local.returncode == 0 and remote.returncode == 0, (local.stderr, remote.stderr)
    assert remote.stdout == local.stdout
    a, b = (json.loads(mistral(env, *args, "--json").stdout) for args in (
        ["complete", "-m", str(hf_model_dir), "--max-context", CONTEXT, *common], ["complete", "--server", serve, *common]
    ))  # fmt: skip
    assert (b["text"], b["finish_reason"], b["usage"]) == (a["text"], a["finish_reason"], a["usage"])


def test_chat_via_serve_equals_the_local_run(serve, hf_model_dir, tmux, env, tmp_path):
    from test_chat_repl import greedy_reply

    expected = greedy_reply(hf_model_dir, "Hello there", 8)
    t = tmux("--server", serve, "-n", "8", "-t", "0")
    t.wait(r"/help lists the commands")
    t.type("Hello there")
    t.keys("Enter")
    t.wait(r"\[max tokens reached\]")
    saved = tmp_path / "chat.json"
    t.type(f"/save {saved}")
    t.keys("Enter")
    t.wait(r"Saved 2 messages")
    t.type("/exit")
    t.keys("Enter")
    t.wait(r"EXIT=0")
    assert json.loads(saved.read_text())[1]["content"] == expected
