"""`mistral rm` on what `mistral download` put on disk for real (from the loopback Hub and CDN of tests/hub_server.py):
a Hugging Face cache entry removed as `hf cache delete` removes it (a blob two revisions share stays until the last of
them goes, refs go with their revision), the folder a tar download made, the prepared weights of either; never a
folder the tool did not make; a terminal is asked, a pipe needs --yes; failures are one sentence."""

from __future__ import annotations

import io
import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from hub_server import HubServer
from inprocess import mistral
from mistral_cli.hub.models import human_bytes
from terminal import Tmux

REPO = "acme/tiny-mistral"
CONFIG = json.dumps({"model_type": "mistral", "architectures": ["MistralForCausalLM"]}).encode()
HF_FILES = {"config.json": CONFIG, "model.safetensors": os.urandom(200_000), "tokenizer.model": os.urandom(30_000)}
NATIVE_FILES = {"params.json": b"{}", "consolidated.safetensors": os.urandom(100_000), "tokenizer.model": b"t" * 1000}


@pytest.fixture
def hub():
    with HubServer() as server:
        yield server


@pytest.fixture
def env(tmp_path, hub) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "HUGGINGFACE_", "MISTRAL_", "XDG_")) and "proxy" not in k.lower()}  # fmt: skip
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf"), MISTRAL_HOME=str(tmp_path / "models"),
               XDG_CACHE_HOME=str(tmp_path / "cache"), XDG_CONFIG_HOME=str(tmp_path / "config"),
               HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_UPDATE_CHECK="1",
               NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")  # fmt: skip
    return env


def download(env: dict[str, str], *args: str) -> Path:
    # a process of its own: huggingface_hub reads HF_ENDPOINT when it is imported
    r = subprocess.run([sys.executable, "-m", "mistral_cli", "download", *args], env=env, capture_output=True,
                       text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    return Path(r.stdout.strip())


def tar_of(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"model/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def prepared(env: dict[str, str], source: Path) -> Path:
    """Prepared weights of `source` as engine/prepared.py names and describes them (listing reads only the header)."""
    made_of = {"folder": str(source.resolve()), "dtype": "BF16", "quantize": "none"}
    header = json.dumps({"__metadata__": {"mistral-cli": json.dumps({"made_of": made_of})}}).encode()
    path = Path(env["XDG_CACHE_HOME"]) / "mistral-cli" / "prepared" / f"{source.name}-bf16-none-0123456789.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 8192)
    return path


def on_disk(path: Path) -> int:
    return path.stat().st_blocks * 512


def failed(r: subprocess.CompletedProcess, code: int) -> str:
    """A refusal or failure is one sentence on stderr, no traceback."""
    assert r.returncode == code, r.stderr
    assert "Traceback" not in r.stderr
    return r.stderr.strip().splitlines()[-1].removeprefix("mistral: error: ")


def test_revisions_go_one_at_a_time_and_a_shared_blob_stays_until_the_last(hub, env):
    repo = hub.add_repo(REPO, HF_FILES)
    repo.commit({**HF_FILES, "config.json": CONFIG.replace(b"}", b', "rms_norm_eps": 1e-06}')}, ref="v1")
    main, v1 = download(env, REPO), download(env, REPO, "--revision", "v1")
    storage = main.parent.parent
    shared, v1_config = (main / "model.safetensors").resolve(), (v1 / "config.json").resolve()
    assert shared == (v1 / "model.safetensors").resolve() and v1_config != (main / "config.json").resolve()
    weights = prepared(env, v1)
    hub.add_repo("acme/copy", HF_FILES)  # a copy: the same commit hash as REPO's main, in another repo
    other = download(env, "acme/copy")
    assert other.name == main.name

    r = mistral(env, "rm", REPO)  # no terminal to ask on and no --yes: the listing, then nothing goes
    assert failed(r, 2) == "Nothing was removed: pass --yes to remove without a terminal to ask on."
    blobs = sum(p.stat().st_size for p in (storage / "blobs").iterdir())  # what huggingface_hub counts
    assert f"{human_bytes(blobs):>9}  {storage}  (Hugging Face cache, 2 revisions)" in r.stderr
    assert f"{human_bytes(on_disk(weights)):>9}  {weights}  (prepared weights)" in r.stderr
    assert f"Frees {human_bytes(blobs + on_disk(weights))}." in r.stderr
    assert main.is_dir() and v1.is_dir() and weights.is_file()

    assert failed(mistral(env, "rm", REPO, "--revision", "v9", "--yes"), 1).startswith(f"{REPO} has no revision 'v9'")
    freed = v1_config.stat().st_size  # the one blob of v1 that main does not use
    weights_size = on_disk(weights)
    r = mistral(env, "rm", REPO, "--revision", "v1", "--yes")
    assert r.returncode == 0, r.stderr
    assert f"{human_bytes(freed):>9}  {v1}  (Hugging Face cache, revision v1; the blobs other revisions use stay)" in (
        r.stderr
    )
    assert f"Frees {human_bytes(freed + weights_size)}." in r.stderr
    assert not v1.exists() and not v1_config.exists() and not weights.exists()
    assert not (storage / "refs" / "v1").exists() and (storage / "refs" / "main").is_file()
    assert shared.is_file() and (main / "model.safetensors").read_bytes() == HF_FILES["model.safetensors"]

    r = mistral(env, "rm", str(main), "--yes")  # the folder `mistral download` printed: the last revision
    assert r.returncode == 0, r.stderr
    assert "(Hugging Face cache, 1 revision)" in r.stderr and f"Removed {main}" in r.stderr
    assert not storage.exists() and other.is_dir()  # the repo's folder goes with its last revision
    assert (
        failed(mistral(env, "rm", REPO, "--yes"), 1)
        == f"{REPO} is not on disk; `mistral info` lists the models that are."
    )


def test_an_alias_in_the_hub_cache_and_in_a_tar_folder_goes_from_both(hub, env):
    hub.add_repo("mistral-community/Mistral-7B-v0.2", HF_FILES)
    snapshot = download(env, "mistral-7b-v0.2")
    folder = download(env, "mistral-7b-v0.2", "--url", hub.add_tar("/m.tar", tar_of(NATIVE_FILES)))
    assert folder == Path(env["MISTRAL_HOME"]) / "mistral-7b-v0.2"
    weights = prepared(env, folder)
    size = sum(on_disk(p) for p in folder.iterdir())

    r = mistral(env, "rm", "mistral-7b-v0.2", "--yes")
    assert r.returncode == 0, r.stderr
    assert f"{human_bytes(size):>9}  {folder}  (tar download)" in r.stderr
    assert "both in the Hugging Face cache and in a folder of a tar download: both go" in r.stderr
    assert not snapshot.parent.parent.exists() and not folder.exists() and not weights.exists()
    assert Path(env["MISTRAL_HOME"]).is_dir()

    # an unfinished tar download: its archive so far is the tool's too
    partial = Path(env["MISTRAL_HOME"]) / ".partial" / "my-model.tar.part"
    partial.parent.mkdir(parents=True, exist_ok=True)  # the tar download above made it
    partial.write_bytes(b"x" * 5000)
    partial.with_name("my-model.tar.part.json").write_text("{}")
    r = mistral(env, "rm", "my-model", "--yes")
    assert r.returncode == 0, r.stderr
    assert "(unfinished tar download)" in r.stderr and not partial.exists()
    assert list(partial.parent.iterdir()) == []


def test_folders_the_tool_did_not_make_are_refused(hub, env, tmp_path):
    ours = download(env, "my-model", "--url", hub.add_tar("/m.tar", tar_of(NATIVE_FILES)))
    home = ours.parent
    handmade = home / "handmade"
    handmade.mkdir()
    (handmade / "params.json").write_text("{}")
    elsewhere = tmp_path / "elsewhere"  # a download's record, but not in $MISTRAL_HOME
    shutil.copytree(ours, elsewhere)
    (home / "linked").symlink_to(elsewhere)
    for name in (str(handmade), "handmade", str(elsewhere), str(home / "linked"), str(home), str(tmp_path)):
        assert "was not made by `mistral download`" in failed(mistral(env, "rm", name, "--yes"), 2)
    assert handmade.is_dir() and elsewhere.is_dir() and (home / "linked").is_symlink()
    assert failed(mistral(env, "rm", "my-model", "--revision", "main", "--yes"), 2) == (
        "--revision goes with an alias or a Hugging Face repo id."
    )
    assert failed(mistral(env, "rm", "nothing-here", "--yes"), 1).startswith("nothing-here is not on disk")

    r = mistral(env, "rm", str(ours), "--yes")  # its path works as well as its name
    assert r.returncode == 0, r.stderr
    assert not ours.exists() and handmade.is_dir() and elsewhere.is_dir()


def test_what_cannot_be_removed_is_one_sentence(hub, env, monkeypatch):
    hub.add_repo(REPO, HF_FILES)
    snapshot = download(env, REPO)
    folder = download(env, "my-model", "--url", hub.add_tar("/m.tar", tar_of(NATIVE_FILES)))

    def refused(path, *args, **kwargs):  # as on a folder of another user (root ignores permission bits)
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(shutil, "rmtree", refused)  # huggingface_hub removes a repo's folder with it too
    assert failed(mistral(env, "rm", REPO, "--yes"), 1).startswith(f"Could not remove {snapshot.parent.parent}")
    message = failed(mistral(env, "rm", "my-model", "--yes"), 1)
    assert message == f"Could not remove {folder}: Permission denied; what was listed may be partly removed."
    assert snapshot.is_dir() and folder.is_dir()


def test_a_terminal_is_asked(env, tmp_path):
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed")
    folder = Path(env["MISTRAL_HOME"]) / "mistral-7b-v0.2"
    folder.mkdir(parents=True)
    (folder / ".mistral-source.json").write_text("{}")
    command = shlex.join([sys.executable, "-m", "mistral_cli", "rm", "mistral-7b-v0.2"])
    for answer, gone in (("n", False), ("y", True)):
        t = Tmux(command, env, tmp_path)
        try:
            t.wait(r"Remove them\? \[y/N\]")
            t.type(answer)
            t.keys("Enter")
            screen = t.wait(r"EXIT=0")
        finally:
            t.close()
        assert f"{folder}  (tar download)" in screen
        assert ("Nothing was removed." in screen) != gone and ("Removed mistral-7b-v0.2" in screen) == gone
        assert folder.exists() != gone
