"""`mistral rm`: a Hugging Face cache entry removed as `hf cache delete` removes it (blobs shared by revisions kept
until the last one goes), a folder `mistral download --source tar` made, the prepared weights of either; never a
folder the tool did not make; a terminal is asked, a pipe needs --yes."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from inprocess import mistral
from terminal import Tmux

REPO = "mistralai/Mistral-7B-Instruct-v0.2"  # the alias mistral-7b-instruct-v0.2
CONFIG = json.dumps({"model_type": "mistral", "architectures": ["MistralForCausalLM"]}).encode()


def _hub_entry(cache: Path, repo: str, revisions: dict[str, dict[str, bytes]]) -> Path:
    """A model in the hub cache's layout: blobs named by content, snapshots of links to them, refs/main."""
    import hashlib

    root = cache / ("models--" + repo.replace("/", "--"))
    for sha, files in revisions.items():
        for name, data in files.items():
            blob = root / "blobs" / hashlib.sha256(data).hexdigest()
            blob.parent.mkdir(parents=True, exist_ok=True)
            blob.write_bytes(data)
            link = root / "snapshots" / sha / name
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(list(revisions)[-1])
    return root


def _prepared(cache_home: Path, source: Path, name: str) -> Path:
    """A prepared-weights file made from `source` (only its header is read by listing and removal)."""
    folder = cache_home / "mistral-cli" / "prepared"
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"made_of": {"folder": str(source.resolve()), "dtype": "BF16", "quantize": "none"}}
    header = json.dumps({"__metadata__": {"mistral-cli": json.dumps(meta)}}).encode()
    path = folder / f"{name}-bf16-none-0123456789abcdef0123.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 4096)
    return path


@pytest.fixture
def home(tmp_path):
    env = {"PATH": os.environ["PATH"], "HF_HOME": str(tmp_path / "hf"), "MISTRAL_HOME": str(tmp_path / "models"),
           "XDG_CACHE_HOME": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1", "MISTRAL_CONFIG": os.devnull}  # fmt: skip
    return tmp_path, env


def test_a_hub_entry_goes_with_its_prepared_weights(home):
    tmp, env = home
    shared, old, new = b"tokenizer" * 100, b"weights-1" * 1000, b"weights-2" * 1000
    root = _hub_entry(tmp / "hf" / "hub", REPO, {"a" * 40: {"config.json": CONFIG, "tokenizer.model": shared,
                                                            "model.safetensors": old},
                                                 "b" * 40: {"config.json": CONFIG, "tokenizer.model": shared,
                                                            "model.safetensors": new}})  # fmt: skip
    other = _hub_entry(tmp / "hf" / "hub", "someone/other", {"c" * 40: {"config.json": CONFIG}})
    prepared = _prepared(tmp / "cache", root / "snapshots" / ("b" * 40), "b" * 40)

    r = mistral(env, "rm", "mistral-7b-instruct-v0.2")  # no terminal to ask on, no --yes: nothing goes
    assert r.returncode == 2 and "pass --yes" in r.stderr
    assert root.is_dir() and prepared.is_file()
    assert str(root) in r.stderr and "2 revisions" in r.stderr and "(prepared weights)" in r.stderr

    r = mistral(env, "rm", "mistral-7b-instruct-v0.2", "--yes")
    assert r.returncode == 0, r.stderr
    assert not root.exists() and not prepared.exists()
    assert other.is_dir()  # another model's entry is untouched
    assert "Removed mistral-7b-instruct-v0.2" in r.stderr

    r = mistral(env, "rm", "mistral-7b-instruct-v0.2", "--yes")
    assert r.returncode == 1 and "is not on disk" in r.stderr


def test_a_tar_folder_and_never_a_folder_the_tool_did_not_make(home):
    tmp, env = home
    ours = tmp / "models" / "mistral-7b-v0.2"
    ours.mkdir(parents=True)
    (ours / "params.json").write_text("{}")
    (ours / "consolidated.safetensors").write_bytes(b"x" * 5000)
    (ours / ".mistral-source.json").write_text("{}")
    theirs = tmp / "models" / "handmade"
    theirs.mkdir()
    (theirs / "params.json").write_text("{}")
    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / ".mistral-source.json").write_text("{}")

    for path in (theirs, elsewhere):
        r = mistral(env, "rm", str(path), "--yes")
        assert r.returncode == 2 and "was not made by `mistral download`" in r.stderr
        assert path.is_dir()
    r = mistral(env, "rm", "mistral-7b-v0.2", "--yes")
    assert r.returncode == 0, r.stderr
    assert not ours.exists() and theirs.is_dir()


def test_a_terminal_is_asked(home):
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed")
    tmp, env = home
    folder = tmp / "models" / "mistral-7b-v0.2"
    folder.mkdir(parents=True)
    (folder / ".mistral-source.json").write_text("{}")
    command = " ".join(shlex.quote(a) for a in [sys.executable, "-m", "mistral_cli", "rm", "mistral-7b-v0.2"])
    for answer, gone in (("n", False), ("y", True)):
        t = Tmux(command, {**os.environ, **env}, tmp)
        try:
            t.wait(r"Remove them\? \[y/N\]")
            t.type(answer)
            t.keys("Enter")
            screen = t.wait(r"EXIT=0")
        finally:
            t.close()
        assert ("Nothing was removed." in screen) != gone
        assert folder.exists() != gone


def test_model_names_complete_without_torch(home):
    tmp, env = home
    _hub_entry(tmp / "hf" / "hub", "acme/Mistral-Fine-7B", {"d" * 40: {"config.json": CONFIG}})
    probe = ("import atexit, sys\natexit.register(lambda: sys.stderr.write('TORCH' if 'torch' in sys.modules else ''))\n"
             "sys.argv[0] = 'mistral'\nfrom mistral_cli.cli.app import main\nmain()\n")  # fmt: skip
    for words, cword in (("mistral info ", "2"), ("mistral chat --model mis", "3"), ("mistral rm ac", "2")):
        r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60,
                           env={**os.environ, **env, "_MISTRAL_COMPLETE": "complete_bash", "COMP_WORDS": words,
                                "COMP_CWORD": cword})  # fmt: skip
        assert r.returncode == 0 and "TORCH" not in r.stderr, r.stderr
        names = r.stdout.split()
        if words.endswith("ac"):
            assert names == ["acme/Mistral-Fine-7B"]
        elif words.endswith("mis"):
            assert names == ["mistral-7b-instruct-v0.2", "mistral-7b-v0.2"]
        else:
            assert {"mistral-7b-instruct-v0.2", "mistral-7b-v0.2", "acme/Mistral-Fine-7B"} <= set(names)
