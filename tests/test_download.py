"""`mistral download` against a loopback Hub and CDN (tests/hub_server.py), run as the user runs it: a subprocess.

huggingface_hub reads HF_ENDPOINT and HF_HOME when it is imported, so every run is `python -m mistral_cli` with an
environment that points at the loopback server and at temporary folders; nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch
from rich.console import Console

from hub_server import GOOD_TOKEN, NOT_ACCEPTED_TOKEN, HubServer, folder_files
from mistral_cli.hub.download import UnsafeArchive, extract_safely
from mistral_cli.hub.models import V1_TOKENIZER_SHA256
from tiny import TinySpec, random_state_dict, write_hf, write_native

INSTRUCT = "mistralai/Mistral-7B-Instruct-v0.2"
REPO = "acme/tiny-mistral"
SHARD1, SHARD2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
NEEDED = ["config.json", "model.safetensors.index.json", SHARD1, SHARD2, "tokenizer.model"]


@pytest.fixture(scope="module")
def hf_files(tmp_path_factory) -> dict[str, bytes]:
    """A tiny bf16 model in HF layout, two shards (SHARD1 is the big one: 8 MB), with the real tokenizer."""
    spec = TinySpec()
    folder = write_hf(
        tmp_path_factory.mktemp("hf") / "m", spec, random_state_dict(spec), shards=2, dtype=torch.bfloat16
    )
    return folder_files(folder)


@pytest.fixture(scope="module")
def native_files(tmp_path_factory) -> dict[str, bytes]:
    spec = TinySpec()
    folder = write_native(tmp_path_factory.mktemp("native") / "m", spec, random_state_dict(spec), dtype=torch.bfloat16)
    return folder_files(folder)


@pytest.fixture
def hub():
    with HubServer() as server:
        yield server


@pytest.fixture
def env(tmp_path, hub) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("HF_", "HUGGINGFACE_", "MISTRAL_")) and "proxy" not in k.lower()
    }
    env.update(
        HF_ENDPOINT=hub.url,
        HF_HOME=str(tmp_path / "hf"),
        MISTRAL_HOME=str(tmp_path / "models"),
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_XET="1",
        HF_HUB_DISABLE_UPDATE_CHECK="1",
        DO_NOT_TRACK="1",
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
    )
    return env


def mistral(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mistral_cli", *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def start(env: dict[str, str], *args: str) -> subprocess.Popen:
    """`mistral ARGS` running, with Ctrl-C's default handling (a run started in the background ignores SIGINT, and
    its children would inherit that)."""
    return subprocess.Popen(
        [sys.executable, "-m", "mistral_cli", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip


def ok(r: subprocess.CompletedProcess) -> Path:
    """A success prints exactly one line on stdout: the model folder."""
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("\n") == 1, r.stdout
    folder = Path(r.stdout.strip())
    assert folder.is_dir()
    return folder


def error(r: subprocess.CompletedProcess, code: int = 1) -> str:
    """A failure is one sentence on stderr, no traceback, nothing on stdout."""
    assert r.returncode == code, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and r.stdout == ""
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("mistral: error: ")
    return last.removeprefix("mistral: error: ")


def storage(env: dict[str, str], repo_id: str) -> Path:
    return Path(env["HF_HOME"]) / "hub" / ("models--" + repo_id.replace("/", "--"))


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def with_extras(files: dict[str, bytes]) -> dict[str, bytes]:
    """What the real repos also carry and inference does not need, .bin weights first of all."""
    return {
        **files,
        "pytorch_model-00001-of-00002.bin": os.urandom(300_000),
        "pytorch_model-00002-of-00002.bin": os.urandom(200_000),
        "pytorch_model.bin.index.json": b"{}",
        "tokenizer.json": os.urandom(50_000),
        "tokenizer_config.json": b"{}",
        "generation_config.json": b"{}",
        "README.md": b"# tiny",
    }


# ------------------------------------------------------------------------------------------------------------ hub


def test_only_safetensors_and_what_inference_needs_land_in_the_hf_cache(hub, env, hf_files):
    hub.add_repo(REPO, with_extras(hf_files))
    snapshot = ok(mistral(env, "download", REPO))
    sha = hub.repos[REPO].refs["main"]
    assert snapshot == storage(env, REPO) / "snapshots" / sha
    assert (storage(env, REPO) / "refs" / "main").read_text() == sha
    assert sorted(p.name for p in snapshot.iterdir()) == sorted(NEEDED)
    for name in NEEDED:
        assert (snapshot / name).read_bytes() == hf_files[name]
        assert (snapshot / name).is_symlink()  # the standard cache layout other tools share
    for name in (SHARD1, SHARD2, "tokenizer.model"):
        assert (snapshot / name).resolve() == storage(env, REPO) / "blobs" / sha256(hf_files[name])
    fetched = {r.label for r in hub.file_gets()}
    assert fetched == set(NEEDED)  # never the .bin files, tokenizer.json, README
    assert all(r.authorization is None for r in hub.requests() if r.server == "cdn")


def test_a_second_run_sends_no_file_bytes(hub, env, hf_files):
    hub.add_repo(REPO, with_extras(hf_files))
    first = ok(mistral(env, "download", REPO))
    hub.clear_log()
    assert ok(mistral(env, "download", REPO)) == first
    assert hub.file_gets() == []
    assert [r.path for r in hub.requests() if "/resolve/" in r.path] == []  # not even a HEAD


def test_dry_run_lists_files_and_bytes_and_fetches_nothing(hub, env, hf_files):
    hub.add_repo(REPO, with_extras(hf_files))
    r = mistral(env, "download", REPO, "--dry-run")
    assert r.returncode == 0, r.stderr
    need = sum(len(hf_files[n]) for n in NEEDED)
    for name in NEEDED:
        assert name in r.stdout
    assert "pytorch_model-00001-of-00002.bin" in r.stdout.split("Not needed")[1]
    assert f"Would fetch {need / 1e6:.2f} MB" in r.stdout
    assert hub.file_gets() == [] and not storage(env, REPO).exists()


def test_gated_repo_needs_a_token_that_has_access(hub, env, hf_files):
    hub.add_repo(INSTRUCT, hf_files, gated=True)
    page = f"{hub.url}/{INSTRUCT}"
    message = error(mistral(env, "download"))  # the default model is the gated instruct alias
    assert message.startswith(f"{INSTRUCT} is gated: accept its terms at {page}")
    assert "--token" in message and "HF_TOKEN" in message
    message = error(mistral({**env, "HF_TOKEN": NOT_ACCEPTED_TOKEN}, "download"))
    assert message.startswith(f"Your Hugging Face token has no access to {INSTRUCT} yet: accept its terms at {page}")
    assert "rejected the Hugging Face token" in error(mistral(env, "download", "--token", "hf_wrong"))
    assert hub.file_gets() == []

    hub.clear_log()
    r = mistral(env, "download", "--token", GOOD_TOKEN)
    snapshot = ok(r)
    assert (snapshot / SHARD1).read_bytes() == hf_files[SHARD1]
    assert GOOD_TOKEN not in r.stdout + r.stderr
    hub_files = [r for r in hub.requests() if r.server == "hub" and "/resolve/" in r.path]
    assert hub_files and all(r.authorization == f"Bearer {GOOD_TOKEN}" for r in hub_files)
    assert all(r.authorization is None for r in hub.requests() if r.server == "cdn")  # the token stays on the Hub


def test_token_from_the_environment(hub, env, hf_files):
    hub.add_repo(INSTRUCT, hf_files, gated=True)
    r = mistral({**env, "HF_TOKEN": GOOD_TOKEN}, "download", "mistral-7b-instruct-v0.2")
    ok(r)
    assert GOOD_TOKEN not in r.stdout + r.stderr


def test_missing_repo_and_revision(hub, env, hf_files):
    hub.add_repo(REPO, hf_files)
    assert error(mistral(env, "download", "acme/nothing-here")).startswith("acme/nothing-here was not found on the Hub")
    assert error(mistral(env, "download", REPO, "--revision", "v9")) == (
        f"{REPO} has no revision 'v9'; give a branch, tag or commit that exists."
    )
    assert "neither an alias" in error(mistral(env, "download", "not a repo"))


def test_a_revision_gets_its_own_snapshot_and_ref(hub, env, hf_files):
    repo = hub.add_repo(REPO, hf_files)
    config = json.loads(hf_files["config.json"])
    tagged = repo.commit({**hf_files, "config.json": json.dumps({**config, "rms_norm_eps": 1e-6}).encode()}, ref="v1")
    snapshot = ok(mistral(env, "download", REPO, "--revision", "v1"))
    assert snapshot.name == tagged and (storage(env, REPO) / "refs" / "v1").read_text() == tagged
    assert json.loads((snapshot / "config.json").read_text())["rms_norm_eps"] == 1e-6
    hub.clear_log()
    main = ok(mistral(env, "download", REPO))
    assert main.name == repo.refs["main"] != tagged
    assert hub.sent(SHARD1) == 0  # same blob, shared between snapshots


def test_a_connection_cut_mid_file_resumes_with_range_in_the_same_run(hub, env, hf_files):
    hub.add_repo(REPO, hf_files)
    size = len(hf_files[SHARD1])
    hub.cuts[SHARD1] = [size // 3]
    snapshot = ok(mistral(env, "download", REPO))
    assert (snapshot / SHARD1).read_bytes() == hf_files[SHARD1]
    ranges = [r.range for r in hub.requests(SHARD1, method="GET") if r.server == "cdn"]
    assert ranges == [None, f"bytes={size // 3}-"]
    assert hub.sent(SHARD1) == size


def test_a_connection_that_stays_down_keeps_the_bytes_and_the_next_run_resumes(hub, env, hf_files):
    hub.add_repo(REPO, hf_files)
    size = len(hf_files[SHARD1])
    hub.cuts[SHARD1] = [size // 2, 0, 0, 0]  # half the file, then three attempts that get nothing
    message = error(mistral(env, "download", REPO))
    assert "run the same command to resume" in message
    partial = storage(env, REPO) / "blobs" / f"{sha256(hf_files[SHARD1])}.incomplete"
    assert partial.stat().st_size == size // 2
    hub.clear_log()
    snapshot = ok(mistral(env, "download", REPO))
    assert (snapshot / SHARD1).read_bytes() == hf_files[SHARD1]
    assert [r.range for r in hub.requests(SHARD1, method="GET") if r.server == "cdn"] == [f"bytes={size // 2}-"]
    assert hub.sent(SHARD1) == size - size // 2
    assert not partial.exists()


def test_a_corrupted_file_fails_its_checksum_is_removed_and_is_fetched_again(hub, env, hf_files):
    hub.add_repo(REPO, hf_files)
    good = hf_files[SHARD1]
    hub.corrupt[SHARD1] = good[:1000] + bytes(b ^ 0xFF for b in good[1000:1010]) + good[1010:]
    message = error(mistral(env, "download", REPO))
    assert message.startswith(f"{SHARD1} failed its sha256 check") and "was removed" in message
    assert "run the same command to fetch it again" in message
    blobs = storage(env, REPO) / "blobs"
    assert not (blobs / sha256(good)).exists() and not list(blobs.glob("*.incomplete"))
    del hub.corrupt[SHARD1]
    hub.clear_log()
    snapshot = ok(mistral(env, "download", REPO))
    assert (snapshot / SHARD1).read_bytes() == good
    assert hub.sent(SHARD1) == len(good)


def test_ctrl_c_keeps_the_bytes_and_says_that_rerunning_resumes(hub, env, hf_files):
    hub.add_repo(REPO, hf_files)
    hub.throttle = 0.03  # about 4 s for the big shard
    proc = start(env, "download", REPO)
    partial = storage(env, REPO) / "blobs" / f"{sha256(hf_files[SHARD1])}.incomplete"
    deadline = time.monotonic() + 60
    while not (partial.exists() and partial.stat().st_size > 1_000_000):
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and out == "" and "Traceback" not in err
    assert "run the same command to resume" in err.strip().splitlines()[-1]
    kept = partial.stat().st_size
    assert kept > 1_000_000
    hub.throttle = 0
    hub.clear_log()
    snapshot = ok(mistral(env, "download", REPO))
    assert (snapshot / SHARD1).read_bytes() == hf_files[SHARD1]
    assert [r.range for r in hub.requests(SHARD1, method="GET") if r.server == "cdn"] == [f"bytes={kept}-"]


def test_two_downloads_at_once_share_the_work_and_both_succeed(hub, env, hf_files):
    hub.add_repo(REPO, hf_files)
    hub.throttle = 0.02
    procs = [start(env, "download", REPO) for _ in range(2)]
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    assert results[0][0] == results[1][0]
    snapshot = Path(results[0][0].strip())
    for name in NEEDED:
        assert (snapshot / name).read_bytes() == hf_files[name]
    assert hub.sent(SHARD1) == len(hf_files[SHARD1])  # fetched once, not twice


def test_no_network_and_offline_mode(hub, env, hf_files):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    message = error(mistral({**env, "HF_ENDPOINT": dead}, "download", REPO))
    assert message.startswith(f"Cannot reach the Hugging Face Hub at {dead}") and "network connection" in message
    assert error(mistral({**env, "HF_HUB_OFFLINE": "1"}, "download", REPO)).startswith("HF_HUB_OFFLINE is set")

    hub.add_repo(REPO, hf_files)
    snapshot = ok(mistral(env, "download", REPO))
    for offline in ({"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": dead}):
        r = mistral({**env, **offline}, "download", REPO)
        assert ok(r) == snapshot and "without checking for updates" in r.stderr


def test_not_enough_disk_space_is_found_before_any_transfer(hub, env, hf_files):
    repo = hub.add_repo(REPO, hf_files)
    repo.claimed_sizes[SHARD1] = 10**16
    message = error(mistral(env, "download", REPO))
    assert message.startswith("Not enough disk space: the download needs 10") and "HF_HOME" in message
    assert hub.file_gets() == []


def test_a_repo_with_only_bin_weights_is_refused(hub, env, hf_files):
    files = {n: d for n, d in with_extras(hf_files).items() if not n.startswith("model")}
    hub.add_repo(REPO, files)
    assert "only PyTorch .bin weights" in error(mistral(env, "download", REPO))


def test_force_fetches_everything_again(hub, env, hf_files):
    hub.add_repo(REPO, hf_files)
    snapshot = ok(mistral(env, "download", REPO))
    hub.clear_log()
    assert ok(mistral(env, "download", REPO, "--force")) == snapshot
    assert {r.label for r in hub.file_gets()} == set(NEEDED)
    assert hub.sent(SHARD1) == len(hf_files[SHARD1])
    assert (snapshot / SHARD1).read_bytes() == hf_files[SHARD1]


# ------------------------------------------------------------------------------------------------------------ tar


def make_tar(files: dict[str, bytes], prefix: str = "", extra: tuple[tarfile.TarInfo, ...] = ()) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        if prefix:
            folder = tarfile.TarInfo(prefix.rstrip("/"))
            folder.type, folder.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(folder)
        for name, data in files.items():
            info = tarfile.TarInfo(prefix + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info in extra:
            tar.addfile(info, io.BytesIO(b"x" * info.size) if info.isreg() else None)
    return buf.getvalue()


def member(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    info.size = 1 if kind == tarfile.REGTYPE else 0
    return info


@pytest.mark.parametrize("prefix", ["", "mistral-7B-v0.2/"], ids=["flat", "top-level-folder"])
def test_tar_with_or_without_a_top_level_folder(hub, env, native_files, prefix):
    url = hub.add_tar("/mistral-7b-v0-2/tiny.tar", make_tar(native_files, prefix))
    folder = ok(mistral(env, "download", "my-model", "--url", url))
    assert folder == Path(env["MISTRAL_HOME"]) / "my-model"
    for name, data in native_files.items():
        assert (folder / name).read_bytes() == data
    assert json.loads((folder / ".mistral-source.json").read_text())["url"] == url
    assert list((Path(env["MISTRAL_HOME"]) / ".partial").iterdir()) == []  # removed after a good extraction
    assert [p.name for p in Path(env["MISTRAL_HOME"]).iterdir() if not p.name.startswith(".")] == ["my-model"]
    hub.clear_log()
    assert ok(mistral(env, "download", "my-model", "--url", url)) == folder
    assert hub.requests() == []  # installed: nothing to ask the server


def test_tar_without_a_tokenizer_gets_the_v1_tokenizer(hub, env, native_files):
    files = {n: d for n, d in native_files.items() if n != "tokenizer.model"}
    url = hub.add_tar("/mistral-7b-v0-2/mistral-7B-v0.2.tar", make_tar(files, "mistral-7B-v0.2/"))
    r = mistral(env, "download", "mistral-7b-v0.2", "--url", url)
    folder = ok(r)
    assert hashlib.sha256((folder / "tokenizer.model").read_bytes()).hexdigest() == V1_TOKENIZER_SHA256
    assert "the mistral-common package" in r.stderr
    assert "mistral-common" in json.loads((folder / ".mistral-source.json").read_text())["tokenizer"]


UNSAFE = {
    "dotdot": member("../escape.txt", tarfile.REGTYPE),
    "absolute": member("/tmp/absolute.txt", tarfile.REGTYPE),
    "nested-dotdot": member("sub/../../escape.txt", tarfile.REGTYPE),
    "backslash": member("..\\escape.txt", tarfile.REGTYPE),
    "symlink": member("link", tarfile.SYMTYPE, "/etc/passwd"),
    "hardlink": member("hard", tarfile.LNKTYPE, "params.json"),
    "device": member("dev", tarfile.CHRTYPE),
    "fifo": member("fifo", tarfile.FIFOTYPE),
}


@pytest.mark.parametrize("kind", list(UNSAFE))
def test_unsafe_members_are_refused_before_anything_is_written(tmp_path, kind):
    archive = tmp_path / "evil.tar"
    archive.write_bytes(make_tar({"params.json": b"{}"}, extra=(UNSAFE[kind],)))
    target = tmp_path / "out" / "target"
    with pytest.raises(UnsafeArchive, match="member"):
        extract_safely(archive, target, Console(file=io.StringIO()))
    assert not (tmp_path / "out").exists() and not (tmp_path / "escape.txt").exists()


def test_a_tar_with_a_member_that_escapes_is_refused_and_removed(hub, env, tmp_path, native_files):
    url = hub.add_tar("/x/evil.tar", make_tar(native_files, extra=(UNSAFE["dotdot"],)))
    message = error(mistral(env, "download", "evil", "--url", url))
    assert message == (
        "Refused evil.tar: member '../escape.txt' would land outside the target folder; nothing was installed and "
        "the archive was removed."
    )
    home = Path(env["MISTRAL_HOME"])
    assert not (home / "evil").exists() and not (tmp_path / "escape.txt").exists()
    assert [p.name for p in home.iterdir() if p.name.startswith(".unpack")] == []
    assert list((home / ".partial").iterdir()) == []


def test_tar_download_resumes_with_range_and_keeps_the_partial_until_extracted(hub, env, native_files):
    data = make_tar(native_files)
    url = hub.add_tar("/x/tiny.tar", data)
    hub.cuts["/x/tiny.tar"] = [len(data) // 3, 0, 0, 0]
    assert "run the same command to resume" in error(mistral(env, "download", "tiny", "--url", url))
    partial = Path(env["MISTRAL_HOME"]) / ".partial" / "tiny.tar.part"
    assert partial.stat().st_size == len(data) // 3
    hub.clear_log()
    folder = ok(mistral(env, "download", "tiny", "--url", url))
    assert (folder / "consolidated.safetensors").read_bytes() == native_files["consolidated.safetensors"]
    assert [r.range for r in hub.requests("/x/tiny.tar", method="GET")] == [f"bytes={len(data) // 3}-"]
    assert hub.sent("/x/tiny.tar") == len(data) - len(data) // 3
    assert not partial.exists()


def test_tar_with_a_published_md5_is_checked(hub, env, native_files):
    url = hub.add_tar("/mistral-7b-v0-2/Mistral-7B-v0.2-Instruct.tar", make_tar(native_files))
    message = error(mistral(env, "download", "mistral-7b-instruct-v0.2", "--url", url))
    assert message.startswith("Mistral-7B-v0.2-Instruct.tar failed its md5 check (published fbae55bc038f12f010b4")
    assert "run the same command to fetch it again" in message
    assert list((Path(env["MISTRAL_HOME"]) / ".partial").iterdir()) == []
    assert not (Path(env["MISTRAL_HOME"]) / "mistral-7b-instruct-v0.2").exists()


def test_tar_dry_run(hub, env, native_files):
    data = make_tar(native_files)
    url = hub.add_tar("/x/tiny.tar", data)
    r = mistral(env, "download", "tiny", "--url", url, "--dry-run")
    assert r.returncode == 0, r.stderr
    assert url in r.stdout and f"Would fetch {len(data) / 1e6:.2f} MB" in r.stdout
    assert hub.requests(method="GET") == [] and not (Path(env["MISTRAL_HOME"]) / "tiny").exists()


# ---------------------------------------------------------------------------------------------------- end to end


def test_info_and_complete_on_the_downloaded_model_offline(hub, env, hf_files, native_files):
    hub.add_repo(INSTRUCT, hf_files, gated=True)
    snapshot = ok(mistral(env, "download", "--token", GOOD_TOKEN))
    tar_url = hub.add_tar("/mistral-7b-v0-2/mistral-7B-v0.2.tar", make_tar(native_files, "mistral-7B-v0.2/"))
    tar_folder = ok(mistral(env, "download", "mistral-7b-v0.2", "--url", tar_url))
    hub.close()  # from here on there is no server at all
    offline = {**env, "HF_HUB_OFFLINE": "1"}

    r = mistral(offline, "info", "mistral-7b-instruct-v0.2", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert (info["source"], info["folder"], info["revision"]) == ("hub-cache", str(snapshot), snapshot.name)
    assert info["architecture"]["n_layers"] == 2 and info["weights"]["dtype"] == "BF16"
    r = mistral(offline, "info", "mistral-7b-v0.2", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["downloaded_from"]["url"] == tar_url
    listed = json.loads(mistral(offline, "info", "--json").stdout)["models"]
    assert {(m["name"], m["folder"]) for m in listed} == {
        ("mistral-7b-instruct-v0.2", str(snapshot)),
        ("mistral-7b-v0.2", str(tar_folder)),
    }

    pytest.importorskip("mistral_cli.cli.complete")
    for model in ("mistral-7b-instruct-v0.2", "mistral-7b-v0.2"):
        r = mistral(offline, "complete", "Hello", "--model", model, "--max-tokens", "3", "--temperature", "0")
        assert r.returncode == 0, r.stderr
        assert r.stdout.endswith("\n")


# ------------------------------------------------------------------------------------------ chat offers the download


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_chat_on_a_terminal_downloads_a_missing_model_when_asked(hub, env, hf_files, tmp_path):
    """`mistral chat` with a model not on disk asks on a terminal, downloads it in the same process and starts; a
    download that fails says how to try again."""
    from terminal import Tmux

    hub.add_repo(REPO, hf_files)
    env = {**{k: v for k, v in env.items() if k != "TMUX"}, "MISTRAL_CHAT_HISTORY": ""}
    chat = [sys.executable, "-m", "mistral_cli", "chat", "--max-context", "256", "-m"]
    t = Tmux(" ".join([*chat, REPO]), env, tmp_path)
    try:
        t.wait(r"run `mistral download acme/tiny-mistral` to download it")
        t.wait(r"Download it now\? \[y/N\]")
        t.type("y")
        t.keys("Enter")
        t.wait(r"Ctrl-D\s+leaves", timeout=60)  # the banner may wrap there
        assert sorted(p.name for p in next((storage(env, REPO) / "snapshots").iterdir()).iterdir()) == sorted(NEEDED)
        t.type("/exit")
        t.keys("Enter")
        t.wait(r"EXIT=0")
    finally:
        t.close()
    t = Tmux(" ".join([*chat, "acme/not-there"]), env, tmp_path)
    try:
        t.wait(r"Download it now\? \[y/N\]")
        t.type("y")
        t.keys("Enter")
        screen = t.wait(r"EXIT=1", timeout=60)
        assert "The download did not finish; run `mistral download acme/not-there` to try again." in screen
        assert "Traceback" not in screen
    finally:
        t.close()
