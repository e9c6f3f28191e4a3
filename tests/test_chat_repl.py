"""`mistral chat` end to end: in a real terminal (tmux) and with piped input, on the tiny random model."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mistral_cli.cli.chat.commands import parse_option
from mistral_cli.cli.chat.session import kilo
from mistral_cli.cli.chat.views import MarkdownView, split_markdown
from mistral_cli.engine.engine import Done
from mistral_cli.engine.load import load_engine
from mistral_cli.errors import UsageError
from mistral_cli.options import GenerationOptions, LoadOptions
from mistral_cli.text.chat_format import Message, encode_chat
from terminal import Tmux

CONTEXT = "2048"  # small: the tiny model's attention then costs little


def chat_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TMUX", "NO_COLOR", "MISTRAL_MODEL")}
    return {
        **env,
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),
        "MISTRAL_HOME": str(tmp_path / "models"),
        "MISTRAL_CHAT_HISTORY": str(tmp_path / "history"),
        "MISTRAL_DTYPE": "fp32",  # the replies are compared with greedy_reply, which runs in float32
    }


def greedy_reply(folder: Path, text: str, n: int) -> str:
    engine = load_engine(folder, LoadOptions(device="cpu", dtype="fp32", max_context=int(CONTEXT)))
    ids = encode_chat(engine.tokenizer, [Message("user", text)])
    return [e for e in engine.generate(ids, GenerationOptions(max_tokens=n, temperature=0)) if isinstance(e, Done)][
        0
    ].text


@pytest.fixture
def tmux(tmp_path):
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed")
    sessions: list[Tmux] = []

    def start(*args: str) -> Tmux:
        command = " ".join(shlex.quote(a) for a in [sys.executable, "-m", "mistral_cli", "chat", *args])
        sessions.append(Tmux(command, chat_env(tmp_path), tmp_path))
        return sessions[-1]

    yield start
    for s in sessions:
        s.close()


def test_terminal_session(tmux, hf_model_dir, tmp_path):
    t = tmux("-m", str(hf_model_dir), "--max-tokens", "8", "--max-context", CONTEXT)
    t.wait(r"/help lists the commands")
    t.wait(r"tiny-hf · 0/2k tokens")  # the status line

    t.type("/help")
    t.keys("Enter")
    t.wait(r"/retry +answer the last message again")
    t.type("/set temperature 0")
    t.keys("Enter")
    t.wait(r"temperature = 0\.0")

    # a streamed reply, and the status line's context and speed after it
    expected = greedy_reply(hf_model_dir, "Hello there", 8)
    t.type("Hello there")
    t.keys("Enter")
    screen = t.wait(r"\[max tokens reached\]")
    t.wait(r"tiny-hf · \d+/2k tokens · [\d.]+ tok/s")
    words = [w for w in re.findall(r"[A-Za-z]{3,}", expected) if w not in ("max", "tokens", "reached")]
    assert words and words[0] in screen, (expected, screen)

    # Alt+Enter makes a new line; Enter sends both lines as one message
    t.type("line one")
    t.keys("M-Enter")
    t.type("line two")
    t.keys("Enter")
    t.wait(r"\[max tokens reached\]", count=2)
    # pasted text is kept whole: its newline does not send it
    t.paste("pasted one\npasted two")
    t.keys("Enter")
    t.wait(r"\[max tokens reached\]", count=3)

    # Ctrl-C during a long reply stops it and keeps the session; Ctrl-C at the prompt clears the line
    t.type("/set max_tokens none")
    t.keys("Enter")
    t.wait(r"max_tokens = None")
    t.type("Tell me a long story")
    t.keys("Enter")
    t.wait(r"> Tell me a long story\n(?!.*thinking)\S")  # the reply has begun
    time.sleep(0.5)
    t.keys("C-c")
    t.wait(r"\[interrupted\]")
    t.wait(r"Alt\+Enter new line")  # the status line: the prompt is back
    t.type("half-typed words")
    t.keys("C-c")
    t.type("/info")
    t.keys("Enter")
    t.wait(r"history +4 exchanges")

    t.type("/sve")
    t.keys("Enter")
    t.wait(r"Unknown command /sve; did you mean /save\?")
    saved = tmp_path / "chat.json"
    t.type(f"/save {saved}")
    t.keys("Enter")
    t.wait(r"Saved 8 messages")
    t.type("/exit")
    t.keys("Enter")
    t.wait(r"EXIT=0")

    data = json.loads(saved.read_text(encoding="utf-8"))
    assert [m["role"] for m in data] == ["user", "assistant"] * 4
    assert [m["content"] for m in data[::2]] == [
        "Hello there", "line one\nline two", "pasted one\npasted two", "Tell me a long story"
    ]  # fmt: skip
    assert data[1]["content"] == expected
    assert data[0]["metadata"]["cut"][-1] == {"message": 7, "finish_reason": "interrupted"}
    # input history persists, multi-line entries included
    history = (tmp_path / "history").read_text(encoding="utf-8")
    assert "+Hello there\n" in history and "+line one\n+line two\n" in history

    # the saved file is a conversation `mistral complete --messages` reads
    data.append({"role": "user", "content": "And now?"})
    (tmp_path / "next.json").write_text(json.dumps(data), encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, "-m", "mistral_cli", "complete", "-m", str(hf_model_dir), "-n", "4", "--max-context", CONTEXT,
         "--messages", str(tmp_path / "next.json")],
        capture_output=True, env=chat_env(tmp_path), timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr.decode()


def test_terminal_offers_to_download_a_missing_model(tmux):
    t = tmux("-m", "mistral-7b-instruct-v0.2")
    t.wait(r"Download it now\? \[y/N\]")
    t.type("n")
    t.keys("Enter")
    screen = t.wait(r"EXIT=1")
    assert "mistral download mistral-7b-instruct-v0.2" in screen


def test_terminal_json_replies_are_shown_as_they_are(tmux, hf_model_dir):
    t = tmux("-m", str(hf_model_dir), "--max-tokens", "40", "--max-context", CONTEXT)
    t.wait(r"/help lists the commands")
    t.type("/set temperature 0")
    t.keys("Enter")
    t.type("/set format json")
    t.keys("Enter")
    t.wait(r"format = /set format json")
    t.type("Hello")  # the tiny model's greedy object closes at once here; any other object may run past 40 tokens
    t.keys("Enter")
    t.wait(r"(?m)^\{.*\}\s*$")
    # Markdown would drop the backslashes and turn `*a*` and `_b_` into emphasis: the JSON must stay as it came
    value = r"*a* _b_ \"c\" # d"
    schema = {
        "type": "object",
        "properties": {"k": {"enum": [value]}},
        "required": ["k"],
        "additionalProperties": False,
    }
    t.type(f"/set schema {json.dumps(schema)}")
    t.keys("Enter")
    t.wait(r"format = the schema of /set schema")
    t.type("Again")
    t.keys("Enter")
    screen = t.wait(r'(?m)^\{"k".*\}\s*$', timeout=60)
    replies = [line.strip() for line in screen.splitlines() if line.startswith("{")]
    assert isinstance(json.loads(replies[0]), dict), screen
    assert json.loads(replies[1]) == {"k": value}, screen


def test_piped_input_answers_each_line(hf_model_dir, tmp_path):
    saved = tmp_path / "piped.json"
    script = f"/set temperature 0\nHello there\n/retry\n/undo\n/bogus\n/set top_p 2\nHello there\n/save {saved}\n"
    proc = subprocess.run(
        [sys.executable, "-m", "mistral_cli", "chat", "-m", str(hf_model_dir), "-n", "8", "--max-context", CONTEXT],
        input=script.encode(), capture_output=True, env=chat_env(tmp_path), timeout=60,
    )  # fmt: skip
    out, err = proc.stdout.decode(), proc.stderr.decode()
    reply = greedy_reply(hf_model_dir, "Hello there", 8)
    reply += "" if reply.endswith("\n") else "\n"
    assert out == reply * 3  # stdout carries only the replies
    assert "Unknown command /bogus" in err and "top_p must be in (0, 1]" in err  # errors do not end the session
    assert "[max tokens reached]" in err
    assert proc.returncode == 1 and "2 inputs failed" in err
    assert [m["content"] for m in json.loads(saved.read_text(encoding="utf-8"))] == ["Hello there", reply.rstrip("\n")]


def test_piped_continue_format_verbose_and_model_switch(hf_model_dir, native_model_dir, tmp_path):
    import jsonschema

    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["n"], "additionalProperties": False}  # fmt: skip
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    script = (f"/set temperature 0\nHello there\n/set verbose on\n/continue\n/set schema {tmp_path / 'schema.json'}\n"
              f"Give me JSON\n/set format off\n/set verbose off\n/models\n/model {native_model_dir}\nHello again\n"
              f"/info\n/set format yaml\n")  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "mistral_cli", "chat", "-m", str(hf_model_dir), "-n", "8", "--max-context", CONTEXT],
        input=script.encode(), capture_output=True, env=chat_env(tmp_path), timeout=120,
    )  # fmt: skip
    out, err = proc.stdout.decode(), proc.stderr.decode()
    lines = out.splitlines()
    # /continue goes on where the reply stopped, as if it had never stopped: 8 + 8 tokens are the 16-token reply
    assert lines[0] + lines[1] == greedy_reply(hf_model_dir, "Hello there", 16).replace("\n", "")
    assert "1 new, read in" in err  # the continued reply fed only the reply's last token
    jsonschema.validate(json.loads(lines[2]), schema)  # the reply under /set schema
    assert re.search(r"format = /set schema .*schema\.json", err) and "format = off" in err
    assert "Now using tiny-native" in err and re.search(r"model +tiny-native", out)
    assert "/set format takes json or off" in err
    assert proc.returncode == 1 and "1 input failed" in err


def test_piped_input_with_a_missing_model_prints_the_download_command(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "mistral_cli", "chat", "-m", "mistral-7b-instruct-v0.2"],
        input=b"hi\n", capture_output=True, env=chat_env(tmp_path), timeout=60,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "run `mistral download mistral-7b-instruct-v0.2`" in proc.stderr.decode()


def test_piped_load_system_and_context_management(hf_model_dir, tmp_path):
    start = tmp_path / "start.json"
    start.write_text(json.dumps([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]))
    saved = tmp_path / "after.json"
    words = " ".join(["weather"] * 150)
    script = "".join(f"Question {i} about the weather?\n" for i in range(6)) + f"{words}\n/info\n/save {saved}\n"
    proc = subprocess.run(
        [sys.executable, "-m", "mistral_cli", "chat", "-m", str(hf_model_dir), "-n", "8", "-t", "0",
         "--max-context", "128", "--load", str(start), "--system", "Be brief."],
        input=script.encode(), capture_output=True, env=chat_env(tmp_path), timeout=60,
    )  # fmt: skip
    out, err = proc.stdout.decode(), proc.stderr.decode()
    assert "Loaded 1 exchange" in err
    assert re.search(r"The context is full: dropped the oldest \d+ exchanges? \(\d+ tokens\)", err)
    assert re.search(r"This message is 15\d tokens \(\d+ with the system prompt and the instruct format\); the "
                     r"context holds 128 tokens", err)  # fmt: skip
    assert re.search(r"context +\d+ of 128 tokens used", out)
    messages = json.loads(saved.read_text(encoding="utf-8"))
    # the whole conversation is saved, dropped exchanges included; the refused message is not in it
    assert messages[0] == {"role": "system", "content": "Be brief.", "metadata": messages[0]["metadata"]}
    assert [m["content"] for m in messages if m["role"] == "user"] == [
        "Hi",
        *(f"Question {i} about the weather?" for i in range(6)),
    ]


STREAM_SCRIPT = """
import sys, time
from rich.console import Console
from mistral_cli.cli.chat.views import MarkdownView
text = sys.argv[1]
view = MarkdownView(Console(), "thinking")
for i in range(0, len(text), 4):
    view.add(text[i : i + 4])
    time.sleep(0.003)
view.end("interrupted")
print("DONE")
"""


def test_a_long_markdown_reply_streams_without_lost_or_repeated_lines(tmux, tmp_path):
    paragraphs = [f"Paragraph {i} says **hello** to line {i}." for i in range(25)]
    code = "".join(f"value_{i} = {i}\n" for i in range(30))
    text = "\n\n".join(paragraphs[:10]) + f"\n\n```python\n{code}```\n\n" + "\n\n".join(paragraphs[10:])
    script = tmp_path / "stream.py"
    script.write_text(STREAM_SCRIPT, encoding="utf-8")
    t = Tmux(f"{shlex.quote(sys.executable)} {script} {shlex.quote(text)}", chat_env(tmp_path), tmp_path, height=15)
    try:
        screen = t.wait(r"DONE")
    finally:
        t.close()
    for i in range(25):  # the screen is 15 lines: most of this was printed for good while it streamed
        assert len(re.findall(rf"Paragraph {i} says hello to line {i}\.", screen)) == 1, screen
    for i in range(30):
        assert len(re.findall(rf"value_{i} = {i}\b", screen)) == 1, screen
    assert "[interrupted]" in screen


def test_split_markdown():
    assert split_markdown("one\n\ntwo\n\nthr") == ("one\n\ntwo\n\n", "thr")
    assert split_markdown("no blank line yet") == ("", "no blank line yet")
    # inside a code block: closed in the first part, reopened in the second
    head, rest = split_markdown("intro\n\n```py\na = 1\nb = 2\nc =")
    assert (head, rest) == ("intro\n\n```py\na = 1\nb = 2\n```\n", "```py\nc =")
    # a blank line inside a code block is not a split point
    assert split_markdown("```\na\n\nb\n```\n\nafter") == ("```\na\n\nb\n```\n\n", "after")


def test_parse_option():
    opts = GenerationOptions()
    assert parse_option("temperature", "0", opts).temperature == 0.0
    assert parse_option("--max-tokens", "12", opts).max_tokens == 12
    assert parse_option("max_tokens", "none", parse_option("max_tokens", "5", opts)).max_tokens is None
    assert parse_option("stop", "###", opts).stop == ["###"]
    assert parse_option("seed", "random", opts).seed is None
    with pytest.raises(UsageError, match="Unknown option 'heat'"):
        parse_option("heat", "1", opts)
    with pytest.raises(UsageError, match="top_k needs a whole number"):
        parse_option("top_k", "1.5", opts)
    with pytest.raises(UsageError, match=r"^top_p must be in \(0, 1\], not 2.0\.$"):  # /set's names, not flags
        parse_option("top_p", "2", opts)
    with pytest.raises(UsageError, match=r"^temperature must be 0 \(greedy\) or more, not -1.0\.$"):
        parse_option("temperature", "-1", opts)


def test_kilo():
    assert [kilo(n) for n in (0, 999, 1229, 2048, 32768)] == ["0", "999", "1.2k", "2k", "32k"]


def test_loading_on_a_terminal_shows_bytes_and_a_percentage(hf_model_dir, tmp_path):
    """The chat's load, read from the checkpoint (--no-prepare), draws a bar with bytes and a percentage: every byte
    the terminal got is read through a pseudo-terminal, so a bar drawn and cleared in a moment is still seen."""
    import fcntl
    import pty
    import select
    import signal
    import struct
    import termios

    pid, fd = pty.fork()
    if pid == 0:  # the child: the chat on the pseudo-terminal
        os.execve(sys.executable, [sys.executable, "-m", "mistral_cli", "chat", "-m", str(hf_model_dir),
                                   "--no-prepare", "--max-context", CONTEXT], chat_env(tmp_path))  # fmt: skip
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    seen, text = b"", ""
    deadline = time.monotonic() + 60
    try:
        while "Ctrl-D leaves" not in text and time.monotonic() < deadline:
            if select.select([fd], [], [], 0.5)[0]:
                try:
                    seen += os.read(fd, 65536)
                except OSError:
                    break
                text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", seen.decode("utf-8", errors="replace"))
                text = re.sub(r"\s+", " ", text)  # lines the terminal wrapped, joined again
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(fd)
    assert "Ctrl-D leaves" in text, text
    bar = re.search(r"Loading \S*tiny-hf .*?(\d+(\.\d+)?)/(\d+(\.\d+)?) MB +(\d+)%", text)
    assert bar, text
    assert re.search(r"(\d+\.\d)/\1 MB +100%", text), text  # it ends full


def test_the_waiting_line_shows_the_weights_read_from_disk():
    """A first reply while the mapped weights are still read from disk: the waiting line says how far the reading
    has got, and nothing more of it is drawn once the reply starts."""
    import io

    from rich.console import Console

    from mistral_cli.model.prepared_files import ReadAhead

    reading = ReadAhead(4_000_000_000)
    reading.done = 1_000_000_000
    out = Console(file=io.StringIO(), force_terminal=True, width=100)
    view = MarkdownView(out, "thinking…", reading=reading)
    deadline = time.monotonic() + 20
    while "(25%)" not in out.file.getvalue() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "reading the weights from disk: 1.0/4.0 GB (25%)…" in out.file.getvalue()
    view.add("Hello")
    reading.done = 2_000_000_000
    time.sleep(0.5)
    view.end(None)
    assert "(50%)" not in out.file.getvalue()
    assert "Hello" in out.file.getvalue()
