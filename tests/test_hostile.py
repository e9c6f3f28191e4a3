"""Faults a user can cause, through the real command: one sentence on stderr, a non-zero exit, no traceback, and
nothing lost of a file that was there before."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest


@pytest.fixture
def env(tmp_path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "MISTRAL_"))}
    env.update(
        HF_HOME=str(tmp_path / "hf"),
        MISTRAL_HOME=str(tmp_path / "models"),
        HF_HUB_OFFLINE="1",
        MISTRAL_CONFIG=os.devnull,
        MISTRAL_KERNELS="off",  # nothing to build: the faults below are about other files
        XDG_CACHE_HOME=str(tmp_path / "cache"),
    )
    return env


def mistral(env: dict[str, str], *args: str, shell: str = "", **kw) -> subprocess.CompletedProcess:
    """The command as a user runs it; `shell`: redirections and limits for it, through bash."""
    command = [sys.executable, "-m", "mistral_cli", *args]
    if shell:
        quoted = " ".join(f"'{a}'" for a in command)
        command = ["bash", "-c", shell.replace("CMD", quoted)]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, **kw)


def one_sentence(r: subprocess.CompletedProcess, code: int = 1) -> str:
    assert r.returncode == code, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("mistral: error: ")]
    assert len(lines) == 1, r.stderr
    return lines[0]


def test_a_full_output_device_is_one_sentence(env, hf_model_dir):
    r = mistral(env, "complete", "Hello", "-m", str(hf_model_dir), "-n", "4", "-t", "0", shell="CMD > /dev/full")
    assert "No space left on device (writing the output)" in one_sentence(r)
    r = mistral(env, "info", str(hf_model_dir), shell="CMD > /dev/full")
    assert "No space left on device" in one_sentence(r)


@pytest.mark.parametrize("command", [["complete", "Hello", "-n", "4", "-m"], ["info"]])
def test_a_closed_stdout_is_one_sentence(env, hf_model_dir, command):
    r = mistral(env, *command, str(hf_model_dir), shell="CMD >&-")
    assert "Standard output is closed" in one_sentence(r)


def _with_a_planted_bug(env: dict[str, str], module: str, function: str, *argv: str) -> subprocess.CompletedProcess:
    """`mistral ARGV` with mistral_cli.cli.MODULE.FUNCTION replaced by one that raises ValueError('planted')."""
    plant = (
        f"import sys; from mistral_cli.cli import {module}, app\n"
        "def broken(**kw): raise ValueError('planted')\n"
        f"{module}.{function} = broken\n"
        f"sys.argv = ['mistral', *{list(argv)!r}]; app.main()\n"
    )
    return subprocess.run([sys.executable, "-c", plant], env=env, capture_output=True, text=True, timeout=60)


def test_an_unexpected_error_is_one_sentence_and_a_saved_traceback(env, tmp_path):
    """A bug (here: one planted in `info`) prints one line that points to the traceback saved under the cache
    folder; MISTRAL_DEBUG=1 shows the traceback itself."""
    r = _with_a_planted_bug(env, "info", "run_info", "info")
    line = one_sentence(r)
    assert "Internal error: ValueError: planted. This is a bug in mistral-cli" in line
    (saved,) = (tmp_path / "cache" / "mistral-cli" / "crashes").iterdir()
    assert str(saved) in line
    assert "Traceback" in saved.read_text() and "planted" in saved.read_text()
    r = _with_a_planted_bug({**env, "MISTRAL_DEBUG": "1"}, "info", "run_info", "info")
    assert r.returncode != 0 and "Traceback" in r.stderr and "ValueError: planted" in r.stderr


def test_save_on_a_full_disk_keeps_the_previous_conversation(env, hf_model_dir, tmp_path):
    """/save writes a temporary file and renames it: when the disk is full (here: a file-size limit), the earlier
    save stays whole and no temporary file is left."""
    out = tmp_path / "talk.json"
    chat = ["chat", "-m", str(hf_model_dir), "-n", "2", "-t", "0", "--max-context", "4096"]
    r = mistral(env, *chat, input=f"Hello\n/save {out}\n", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    before = out.read_bytes()
    assert json.loads(before)[0]["content"] == "Hello"
    long = "word " * 600  # the conversation's JSON is now well over the 1 KiB limit
    r = mistral(env, *chat, input=f"{long}\n/save {out}\n", shell="ulimit -f 1; CMD", cwd=tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"Cannot write messages file {out}: File too large." in r.stderr
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".talk")) == []


def test_one_message_is_one_message(env, hf_model_dir, tmp_path):
    out = tmp_path / "system.json"
    r = mistral(env, "chat", "-m", str(hf_model_dir), input=f"/system Be brief.\n/save {out}\n", cwd=tmp_path)
    assert r.returncode == 0 and f"Saved 1 message to {out}." in r.stderr, r.stderr  # not "1 messages"


def test_save_does_not_overwrite_a_file_it_did_not_write(env, hf_model_dir, tmp_path):
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": true}\n', encoding="utf-8")
    r = mistral(env, "chat", "-m", str(hf_model_dir), "-n", "2", input=f"Hello\n/save {notes}\n", cwd=tmp_path)
    assert r.returncode == 1
    assert f"{notes} exists and is not a conversation saved by mistral chat" in r.stderr
    assert notes.read_text(encoding="utf-8") == '{"mine": true}\n'


def _copy_model(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"num_hidden_layers": 1_000_000_000}, "describes 36,992,004,096,064 parameters"),  # refused at once
        ({"rope_theta": float("nan")}, "rope_theta = nan, which must be a positive number"),
        ({"rms_norm_eps": -1}, "norm_eps = -1.0, which must be a positive number"),
        ({"hidden_size": 64.5}, "hidden_size must be a whole number, not 64.5"),
        ({"hidden_size": 66, "head_dim": None}, "hidden_size 66 is not a multiple of the 4 attention heads"),
    ],
)
def test_a_config_with_impossible_numbers_is_one_sentence(env, hf_model_dir, tmp_path, change, needle):
    folder = _copy_model(hf_model_dir, tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config.update(change)
    (folder / "config.json").write_text(json.dumps(config))  # NaN as JSON's NaN, which Python's json reads
    r = mistral(env, "complete", "Hi", "-m", str(folder), "-n", "2")
    assert needle in one_sentence(r), r.stderr


def test_a_shard_index_cannot_reach_outside_the_model_folder(env, tmp_path, tiny_spec, tiny_sd):
    from tiny import write_hf

    folder = write_hf(tmp_path / "m", tiny_spec, tiny_sd, shards=2)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "../../../../etc/passwd"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    for command in (["complete", "Hi", "-n", "2", "-m", str(folder)], ["info", str(folder)]):
        line = one_sentence(mistral(env, *command))
        assert "names a weight file outside the model folder ('../../../../etc/passwd')" in line
        assert "/etc/passwd" not in mistral(env, *command).stdout


def test_a_messages_file_nested_deep_is_one_sentence(env, hf_model_dir, tmp_path):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    r = mistral(env, "complete", "--messages", str(deep), "-m", str(hf_model_dir), "-n", "2")
    assert "is nested too deeply to be a conversation" in one_sentence(r, code=1)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["complete", "--threads", "two", "Hi"], "Invalid value for '--threads': 'two' is not a valid int"),
        (["complete", "--bogus"], "No such option: --bogus"),
        (["nosuch"], "No such command 'nosuch'"),
    ],
)
def test_a_bad_command_line_is_one_line_with_a_pointer_to_help(env, args, needle):
    r = mistral(env, *args)
    line = one_sentence(r, code=2)
    assert needle in line and "--help` lists the options." in line
    assert r.stderr.strip() == line  # no usage block, no box


# --------------------------------------------------------------------------------------------------- chat states


@pytest.fixture(scope="module")
def small_engine(hf_model_dir):
    from mistral_cli.engine.load import load_engine
    from mistral_cli.options import LoadOptions

    return load_engine(hf_model_dir, LoadOptions(device="cpu", dtype="fp32", max_context=64))


def _session(engine, **options):
    import io

    from rich.console import Console

    from mistral_cli.cli.chat.session import Session
    from mistral_cli.options import GenerationOptions
    from mistral_cli.text.conversation import Conversation

    engine.reset()
    notes = Console(file=io.StringIO(), width=200)
    return Session(
        engine,
        Conversation(engine.tokenizer),
        GenerationOptions(temperature=0, **options),
        model="tiny",
        out=notes,
        notes=notes,
        markdown=False,
    )


def test_ctrl_c_before_the_first_token_does_not_keep_the_message(small_engine, monkeypatch):
    """Ctrl-C while the prompt is read: the message is not kept, so the next one is a turn of its own (before, an
    empty reply stayed, and the next message was merged into the same user turn)."""
    chat = _session(small_engine, max_tokens=3)
    real = small_engine.prefill

    def interrupted(ids, *args):
        monkeypatch.setattr(small_engine, "prefill", real)  # only this once: the user pressed Ctrl-C here
        raise KeyboardInterrupt

    monkeypatch.setattr(small_engine, "prefill", interrupted)
    chat.handle("First")
    assert chat.conv.exchanges == []
    assert "Interrupted before the reply began" in chat.notes.file.getvalue()
    chat.handle("Second")
    assert [ex.user for ex in chat.conv.exchanges] == ["Second"]
    assert chat.conv.exchanges[0].reply is not None


def test_the_context_meter_never_shows_more_than_the_context(small_engine):
    chat = _session(small_engine)  # no --max-tokens: the reply runs until the context is full
    chat.handle("Hello")
    assert chat.last_done.finish_reason == "context"
    # the history counts the reply's last token (sampled from the 64th position) and its EOS, which never fit
    assert chat.conv.tokens_used() == 66
    assert " · 64/64 tokens" in chat.status_line()


def test_a_system_prompt_longer_than_the_context_fails_at_start_up(env, hf_model_dir):
    r = mistral(env, "chat", "-m", str(hf_model_dir), "--max-context", "64", "--system", "word " * 100, input="Hi\n")
    assert "The system prompt is " in one_sentence(r)
    assert "has no room for a message" in r.stderr
    assert r.stdout == ""


def test_a_history_path_that_is_a_folder_turns_history_off(env, hf_model_dir, tmp_path):
    """Before, prompt-toolkit looped on "Press ENTER to continue" and Ctrl-D did not leave."""
    import shlex
    import shutil

    from terminal import Tmux

    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed")
    env = {k: v for k, v in env.items() if k != "TMUX"}
    command = [sys.executable, "-m", "mistral_cli", "chat", "-m", str(hf_model_dir), "-n", "2", "--max-context", "256"]
    t = Tmux(" ".join(shlex.quote(a) for a in command), {**env, "MISTRAL_CHAT_HISTORY": str(tmp_path)}, tmp_path)
    try:
        t.wait(r"/help lists the commands")
        t.wait(r"Input history is off for this session")
        t.wait(r"\(it is a folder\); set MISTRAL_CHAT_HISTORY")
        t.type("Hello")
        t.keys("Enter")
        t.wait(r"tok/s")  # the reply came
        t.keys("C-d")
        t.wait(r"EXIT=0")
    finally:
        t.close()


def test_the_input_history_is_rewritten_whole(tmp_path):
    """Each entry rewrites the file through a temporary file: an existing FileHistory file keeps its entries, and a
    write that fails (here: a file-size limit) leaves the file as it was and turns the history off, with a note."""
    from prompt_toolkit.history import FileHistory

    from mistral_cli.cli.chat.history import SafeFileHistory

    path = tmp_path / "history"
    theirs = FileHistory(str(path))
    theirs.store_string("one")
    theirs.store_string("two\nlines")
    notes: list[str] = []
    ours = SafeFileHistory(path, notes.append)
    assert list(ours.load_history_strings()) == ["two\nlines", "one"]
    ours.store_string("three")
    assert list(FileHistory(str(path)).load_history_strings()) == ["three", "two\nlines", "one"]
    assert notes == [] and [p.name for p in tmp_path.iterdir()] == ["history"]

    path.write_text("".join(f"\n# old\n+entry {i}\n" for i in range(200)))  # over 1 KiB
    before = path.read_bytes()
    script = (
        "import sys; from pathlib import Path; from mistral_cli.cli.chat.history import SafeFileHistory\n"
        f"h = SafeFileHistory(Path({str(path)!r}), print); h.store_string('new'); h.store_string('newer')\n"
    )
    r = subprocess.run(["bash", "-c", f"ulimit -f 1; {sys.executable} -c \"$0\"", script],
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("Input history is off for this session") == 1 and "(File too large)" in r.stdout
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["history"]


# ------------------------------------------------------------------------------------------- unbounded input


def test_a_prompt_over_the_stdin_bound_is_refused_without_reading_all_of_it(env, hf_model_dir):
    """An endless stdin (here: /dev/zero turned into text) is read up to 64 MiB, then refused."""
    r = mistral(env, "complete", "-m", str(hf_model_dir), shell="tr '\\0' a < /dev/zero | CMD")
    assert "The prompt on stdin is over 64 MiB" in one_sentence(r) and "--truncate" in r.stderr


def test_a_huge_prompt_is_refused_having_encoded_only_its_start(env, hf_model_dir):
    """60 MB of text (before: a minute and gigabytes of memory to encode it all, then the same error)."""
    r = mistral(env, "complete", "-m", str(hf_model_dir), "--max-context", "256",
                shell="yes 'a few words of text' | head -c 60000000 | CMD")  # fmt: skip
    line = one_sentence(r)
    assert re.search(r"The prompt is over [\d,]+ tokens, but the context holds 256", line), line
    assert "--truncate to drop its beginning" in line


def test_truncate_keeps_the_end_of_a_huge_prompt_and_says_so(env, hf_model_dir):
    from mistral_cli.engine.load import load_engine
    from mistral_cli.options import GenerationOptions, LoadOptions
    from mistral_cli.text.tokenizer import Tokenizer

    tok = Tokenizer(hf_model_dir / "tokenizer.model")
    r = mistral(
        env,
        "complete",
        "-m",
        str(hf_model_dir),
        "--max-context",
        "256",
        "-n",
        "4",
        "-t",
        "0",
        "--json",
        "--truncate",
        shell="seq 1 3000000 | CMD",
    )  # fmt: skip (about 20 MB)
    assert r.returncode == 0, r.stderr
    assert "mistral: note: --truncate dropped the beginning of the prompt to fit the context (251 of its" in r.stderr
    got = json.loads(r.stdout)
    # -n 4 keeps 4 tokens for the reply: BOS and the last 251 tokens of the whole text, encoded whole (the cut by
    # length before encoding is invisible)
    tail = "".join(f"{i}\n" for i in range(2_990_000, 3_000_001))
    ids = [tok.bos_id, *tok.encode(tail)[-251:]]
    engine = load_engine(hf_model_dir, LoadOptions(device="cpu", max_context=256))
    done = list(engine.generate(ids, GenerationOptions(max_tokens=4, temperature=0), leading_space=True))[-1]
    assert got["usage"]["prompt_tokens"] == 252 and got["text"] == done.text


def test_a_huge_messages_file_is_refused_quickly(env, hf_model_dir, tmp_path):
    big = tmp_path / "big.json"
    with big.open("w") as f:
        f.write('[{"role": "user", "content": "')
        f.write("padding " * 9_000_000)  # 72 MB
        f.write('"}]')
    r = mistral(env, "complete", "-m", str(hf_model_dir), "--messages", str(big))
    assert f"Messages file {big} is over 64 MiB" in one_sentence(r)
    big.write_text(json.dumps([{"role": "user", "content": "some words " * 2_000_000}]))  # 22 MB: read, not encoded
    r = mistral(env, "complete", "-m", str(hf_model_dir), "--max-context", "256", "--messages", str(big))
    assert re.search(r"The prompt is over [\d,]+ tokens, but the context holds 256", one_sentence(r))


def test_messages_dash_reads_the_conversation_from_stdin(env, hf_model_dir):
    convo = json.dumps([{"role": "user", "content": "Hello"}])
    args = ["complete", "-m", str(hf_model_dir), "-n", "3", "-t", "0"]
    from_stdin = mistral(env, *args, "--messages", "-", input=convo)
    assert from_stdin.returncode == 0, from_stdin.stderr
    assert from_stdin.stdout == mistral(env, *args, "--instruct", "Hello").stdout
    r = mistral(env, *args, "--messages", "-", input="not json")
    assert "The JSON on stdin is not valid JSON" in one_sentence(r)


# ------------------------------------------------------------------------------------------------- permissions


def _unprivileged() -> str:
    """A shell prefix that runs CMD without root's power to ignore file permissions."""
    if os.geteuid() != 0:
        return "CMD"
    if subprocess.run(["setpriv", "--version"], capture_output=True).returncode != 0:
        pytest.skip("running as root without setpriv: permissions cannot be tested")
    return "setpriv --bounding-set=-all --inh-caps=-all CMD"


@pytest.mark.parametrize("what", ["MISTRAL_HOME", "HF_HOME", "model folder", "weight file", "tokenizer"])
def test_a_path_without_permission_is_one_sentence_naming_it(env, hf_model_dir, tmp_path, what):
    folder = _copy_model(hf_model_dir, tmp_path / "m")
    locked = {
        "MISTRAL_HOME": tmp_path / "models",
        "HF_HOME": tmp_path / "hf",
        "model folder": folder,
        "weight file": folder / "model.safetensors",
        "tokenizer": folder / "tokenizer.model",
    }[what]
    if not locked.exists():
        locked.mkdir()
    locked.chmod(0)
    try:
        model = str(folder) if what not in ("MISTRAL_HOME", "HF_HOME") else "mistral-7b-instruct-v0.2"
        for command in (["info", model], ["complete", "Hi", "-n", "2", "-m", model]):
            r = mistral(env, *command, shell=_unprivileged())
            line = one_sentence(r)
            assert str(locked) in line and ("Permission denied" in line or "permission" in line), line
    finally:
        locked.chmod(0o755)


@pytest.mark.parametrize("variable", ["MISTRAL_HOME", "HF_HOME"])
def test_a_models_folder_that_is_a_file_is_one_sentence(env, tmp_path, variable):
    plain = tmp_path / "plain"
    plain.write_text("not a folder")
    env[variable] = str(plain)
    download = ["download", "--dry-run"] + (["--source", "tar"] if variable == "MISTRAL_HOME" else [])
    for command in (["info"], ["complete", "Hi", "-m", "mistral-7b-instruct-v0.2"], download):
        line = one_sentence(mistral(env, *command))
        assert f"{plain} is a file, not a folder" in line and f"set {variable} to a folder" in line
    assert plain.read_text() == "not a folder"


# ------------------------------------------------------------------------------------------------------ numbers


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_weights_holding_nan_or_infinity_are_one_sentence(env, tmp_path, tiny_spec, tiny_sd, value):
    from tiny import write_hf

    sd = {k: v.clone() for k, v in tiny_sd.items()}
    sd["model.layers.0.mlp.down_proj.weight"][0, 0] = value  # one bad value in one matrix spoils every score
    folder = write_hf(tmp_path / "m", tiny_spec, sd)
    for temperature in ("0", "0.8"):
        r = mistral(env, "complete", "Hi", "-n", "4", "-t", temperature, "-m", str(folder))
        assert "The model computed scores that are not numbers (NaN or infinity)" in one_sentence(r)


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"num_hidden_layers": 10**9}, "describes 36,992,004,096,064 parameters, but the weight files hold only"),
        ({"vocab_size": 31999}, "has 32000 tokens but the model expects 31999"),
        ("tokenizer", "is not a SentencePiece model"),
    ],
)
def test_info_names_what_loading_would_refuse(env, hf_model_dir, tmp_path, change, needle):
    """`info` reads headers only, but says what `complete` would refuse (before, it described a 281 TB model from a
    16 MB file without a word), in the table and in --json, and exits 1."""
    folder = _copy_model(hf_model_dir, tmp_path / "m")
    if change == "tokenizer":
        (folder / "tokenizer.model").write_bytes(b"garbage" * 100)
    else:
        config = json.loads((folder / "config.json").read_text())
        config.update(change)
        (folder / "config.json").write_text(json.dumps(config))
    r = mistral(env, "info", str(folder))
    assert re.search(f"{folder} cannot be loaded; see the problems? above.", one_sentence(r))
    assert needle in r.stdout.replace("\n", " ")
    r = mistral(env, "info", "--json", str(folder))
    assert r.returncode == 1
    problems = json.loads(r.stdout, parse_constant=lambda c: pytest.fail(f"info --json printed {c}"))["problems"]
    assert any(needle in p for p in problems)
    assert needle in one_sentence(mistral(env, "complete", "Hi", "-n", "2", "-m", str(folder)))


def test_info_on_a_sound_model_has_no_problems(env, hf_model_dir):
    r = mistral(env, "info", "--json", str(hf_model_dir))
    assert r.returncode == 0 and json.loads(r.stdout)["problems"] == []


# ----------------------------------------------------------------------------------------------- other messages


def test_a_switch_variable_that_is_neither_on_nor_off_is_refused(env, hf_model_dir):
    for variable in ("MISTRAL_KERNELS", "MISTRAL_CUDA_GRAPHS"):
        r = mistral({**env, variable: "banana"}, "info", str(hf_model_dir))
        more = ", or avx2 for the AVX2 kernels on a CPU with AVX-512" if variable == "MISTRAL_KERNELS" else ""
        assert f"{variable} must be on or off (or 1, 0){more}, not 'banana'." in one_sentence(r, code=2)


def test_a_bad_huge_pages_value_is_our_warning_not_torchs(env, hf_model_dir):
    r = mistral({**env, "THP_MEM_ALLOC_ENABLE": "banana"}, "complete", "Hi", "-n", "2", "-m", str(hf_model_dir))
    assert r.returncode == 0, r.stderr
    assert r.stderr == "mistral: warning: THP_MEM_ALLOC_ENABLE must be 0 or 1, not 'banana'; using 1.\n"


def test_a_config_file_that_sets_a_key_twice_is_refused(env, hf_model_dir, tmp_path):
    config = tmp_path / "config.toml"
    config.write_text("top_p = 0.5\ntop-p = 0.9\n")
    r = mistral({**env, "MISTRAL_CONFIG": str(config)}, "complete", "Hi", "-m", str(hf_model_dir))
    assert f"The config file {config} sets top_p twice, as 'top_p' and 'top-p'; keep one." in one_sentence(r, code=2)


def test_compile_on_a_cpu_is_refused_at_once(env, hf_model_dir):
    r = mistral(env, "complete", "Hi", "-n", "2", "--device", "cpu", "--compile", "-m", str(hf_model_dir))
    assert "--compile is for cuda" in one_sentence(r, code=2)


def test_info_names_a_device_that_is_not_here(env, hf_model_dir):
    from mistral_cli.cli.info import detect_device

    if detect_device()[0] == "cuda":
        pytest.skip("this machine has a CUDA GPU")
    r = mistral(env, "info", "--device", "cuda", str(hf_model_dir))
    one_sentence(r)
    assert "--device cuda was asked for, but PyTorch would see no CUDA GPU here" in r.stdout


def test_help_shows_a_default_for_every_option():
    r = subprocess.run([sys.executable, "-m", "mistral_cli", "complete", "--help"], capture_output=True, text=True,
                       env={**os.environ, "COLUMNS": "200"}, timeout=60)  # fmt: skip
    lines = {line.split()[1]: line for line in r.stdout.splitlines() if line.startswith("│ --")}
    for option in ("--json", "--echo", "--truncate", "--verbose", "--compile", "--instruct"):
        assert "[default: off]" in lines[option], lines[option]
    for option in ("--stop", "--system", "--messages"):
        assert "[default: none]" in lines[option], lines[option]
    assert "among the last 64" in lines["--repeat-penalty"]


def test_verbose_shows_the_traceback_of_an_unexpected_error(env):
    r = _with_a_planted_bug(env, "complete", "run_complete", "complete", "--verbose", "Hi")
    assert "Traceback" in r.stderr and "ValueError: planted" in r.stderr
    assert r.stderr.rstrip().splitlines()[-1].startswith("mistral: error: Internal error: ValueError: planted.")


def test_a_loaded_json_reply_is_shown_as_it_is_not_as_markdown(small_engine, tmp_path):
    """/load shows the last reply; one in JSON (made under /set format) keeps its backslashes, `*a*` and `_b_`, which
    Markdown would turn into escapes and emphasis, while a prose reply is still rendered."""
    reply = '{"path": "C:\\\\temp", "note": "*a* and _b_"}'
    chat = _session(small_engine)
    chat.markdown = True
    saved = tmp_path / "c.json"
    for text, shown in ((reply, reply), ("Some **bold** words.", "Some bold words.")):
        saved.write_text(json.dumps([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": text}]))
        chat.load(saved)
        assert shown in chat.out.file.getvalue(), chat.out.file.getvalue()
