"""Faults a user can cause, through the real command: one sentence on stderr, a non-zero exit, no traceback, and
nothing lost of a file that was there before."""

from __future__ import annotations

import json
import os
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


def test_an_unexpected_error_is_one_sentence_and_a_saved_traceback(env, tmp_path):
    """A bug (here: one planted in `info`) prints one line that points to the traceback saved under the cache
    folder; MISTRAL_DEBUG=1 shows the traceback itself."""
    plant = (
        "import sys; from mistral_cli.cli import info, app\n"
        "def broken(**kw): raise ValueError('planted')\n"
        "info.run_info = broken\n"
        "sys.argv = ['mistral', 'info']; app.main()\n"
    )
    r = subprocess.run([sys.executable, "-c", plant], env=env, capture_output=True, text=True, timeout=60)
    line = one_sentence(r)
    assert "Internal error: ValueError: planted. This is a bug in mistral-cli" in line
    (saved,) = (tmp_path / "cache" / "mistral-cli" / "crashes").iterdir()
    assert str(saved) in line
    assert "Traceback" in saved.read_text() and "planted" in saved.read_text()
    r = subprocess.run(
        [sys.executable, "-c", plant], env={**env, "MISTRAL_DEBUG": "1"}, capture_output=True, text=True, timeout=60
    )
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
