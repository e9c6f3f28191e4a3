"""`mistral download` given a bad source: an address that is not http(s), credentials in it, an empty or broken
archive, a --revision that is not a ref name, a gated repo or an unreachable Hub with --force. Each run is the real
command (a subprocess) against the loopback server of tests/hub_server.py or a tiny one here: one sentence, exit 1, no
traceback, and nothing left behind."""

from __future__ import annotations

import base64
import json
import re
import socket
import tarfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import test_download
from hub_server import GOOD_TOKEN
from mistral_cli.hub.models import SOURCE_FILE
from test_download import INSTRUCT, REPO, make_tar, member, mistral, ok

# the fixtures of test_download.py: a loopback server, an environment pointing at it, tiny models
hub, env, hf_files, native_files = (
    test_download.hub,
    test_download.env,
    test_download.hf_files,
    test_download.native_files,
)


def one_error(r, *words: str) -> str:
    """Exit 1, no traceback, nothing on stdout, and exactly one `mistral: error: ` line, holding `words`."""
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and "Internal error" not in r.stderr and r.stdout == ""
    (line,) = [line for line in r.stderr.splitlines() if line.startswith("mistral: error: ")]
    assert r.stderr.rstrip().endswith(line)  # the last thing said
    for word in words:
        assert word in line, line
    return line.removeprefix("mistral: error: ")


def files_in(folder: Path) -> list[str]:
    """Files under a folder, but lock files (kept, as huggingface_hub keeps its own)."""
    found = [p.relative_to(folder) for p in folder.rglob("*") if p.is_file()] if folder.exists() else []
    return sorted(str(p) for p in found if p.parts[0] != ".locks")


@pytest.fixture
def dead() -> str:
    """The address of a port on 127.0.0.1 that nobody listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


class Bare:
    """A loopback HTTP/1.0 server with one scripted answer, for what hub_server.py does not do: `mode` "no-length"
    answers 200 with no Content-Length and closes at once (a body of no bytes); "announced" says 1000 bytes on HEAD and
    closes without any on GET. Every request's headers are kept."""

    def __init__(self, mode: str) -> None:
        self.mode, self.headers = mode, []
        bare = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_HEAD(self) -> None:
                bare.headers.append(dict(self.headers))
                self.send_response(200)
                if bare.mode == "announced":
                    self.send_header("Content-Length", "1000")
                self.end_headers()

            def do_GET(self) -> None:
                bare.headers.append(dict(self.headers))
                self.send_response(200)
                self.end_headers()  # HTTP/1.0: the body ends where the connection does, here

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/x.tar"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def bare(request) -> Iterator[Bare]:
    server = Bare(request.param)
    yield server
    server.close()


# ---------------------------------------------------------------------------------------------------------- --url


@pytest.mark.parametrize(
    "url", ["not a url", "http:///x.tar", "http://[::1/x.tar", "ftp://127.0.0.1/x.tar", "http://127.0.0.1:port/x"]
)
def test_an_address_that_is_not_http_is_one_sentence(hub, env, url):
    one_error(mistral(env, "download", "tiny", "--url", url), f"--url {url!r} is not an http(s) URL")
    assert hub.requests() == [] and files_in(Path(env["MISTRAL_HOME"])) == []


def test_a_file_url_reads_and_writes_nothing(env, tmp_path, native_files):
    archive = tmp_path / "model.tar"
    archive.write_bytes(make_tar(native_files))  # a good archive: only the scheme is wrong
    url = archive.as_uri()
    one_error(mistral(env, "download", "tiny", "--url", url), f"--url {url!r} is not an http(s) URL")
    assert files_in(Path(env["MISTRAL_HOME"])) == []


def test_credentials_in_the_address_are_basic_auth_and_never_shown(hub, env, native_files):
    url = hub.add_tar("/x/tiny.tar", make_tar(native_files))
    r = mistral(env, "download", "tiny", "--url", url.replace("http://", "http://user:s3cret@"))
    folder = ok(r)
    sent = {q.authorization for q in hub.requests() if q.server == "cdn"}
    assert sent == {"Basic " + base64.b64encode(b"user:s3cret").decode()}  # HEAD and GET, to 127.0.0.1 itself
    assert "s3cret" not in r.stdout + r.stderr
    assert json.loads((folder / SOURCE_FILE).read_text())["url"] == url
    assert not any("s3cret" in p.read_text(errors="replace") for p in Path(env["MISTRAL_HOME"]).rglob("*.json"))
    # nor when the download fails, or the address is refused
    missing = url.replace("http://", "http://user:s3cret@").replace("tiny.tar", "gone.tar")
    assert "s3cret" not in one_error(mistral(env, "download", "gone", "--url", missing), "does not exist")
    refused = one_error(mistral(env, "download", "gone", "--url", "ftp://user:s3cret@127.0.0.1/x.tar"), "***@")
    assert "s3cret" not in refused and "user" not in refused


# ------------------------------------------------------------------------------------------------------ archives


def test_an_empty_answer_is_one_sentence_and_leaves_nothing(hub, env):
    url = hub.add_tar("/x/empty.tar", b"")  # 200, Content-Length: 0
    one_error(mistral(env, "download", "tiny", "--url", url), f"{url} sent an empty file, not a tar archive")
    assert files_in(Path(env["MISTRAL_HOME"])) == []


@pytest.mark.parametrize("bare", ["no-length"], indirect=True)
def test_a_connection_closed_with_no_bytes_is_an_empty_archive(env, bare):
    r = mistral(env, "download", "tiny", "--url", bare.url)
    one_error(r, f"{bare.url} sent an empty file, not a tar archive")
    assert files_in(Path(env["MISTRAL_HOME"])) == []


@pytest.mark.parametrize("bare", ["announced"], indirect=True)
def test_a_connection_that_never_sends_the_announced_bytes_leaves_nothing(env, bare):
    one_error(mistral(env, "download", "tiny", "--url", bare.url), "The download from 127.0.0.1 failed")
    assert files_in(Path(env["MISTRAL_HOME"])) == []  # no byte to resume from: not even the record of the transfer


def test_a_body_that_is_not_a_tar_is_refused_and_removed(hub, env):
    url = hub.add_tar("/x/page.tar", b"<html>Sign in to download</html>\n" * 40)
    one_error(mistral(env, "download", "tiny", "--url", url), "Refused page.tar: it is not a readable tar archive")
    assert files_in(Path(env["MISTRAL_HOME"])) == []  # resuming could not mend it: fetched afresh next time


def test_a_member_under_a_file_is_refused_and_nothing_is_left(hub, env, native_files):
    extra = (member("a", tarfile.REGTYPE), member("a/b", tarfile.REGTYPE))
    url = hub.add_tar("/x/tree.tar", make_tar(native_files, extra=extra))
    one_error(
        mistral(env, "download", "tree", "--url", url),
        "Refused tree.tar: member 'a/b' lies under 'a', which is a file;",
        "nothing was installed and the archive was removed.",
    )
    home = Path(env["MISTRAL_HOME"])
    assert not (home / "tree").exists() and files_in(home) == []
    assert [p.name for p in home.iterdir() if p.name.startswith((".unpack", ".old"))] == []


# ------------------------------------------------------------------------------------------------------------ hub


@pytest.mark.parametrize("revision", ["../../x", "refs/../../x", "-rf", "a b", "x.lock", "main~1", "a//b", "@", ""])
def test_a_revision_that_is_not_a_ref_name_is_refused_before_any_request(hub, env, hf_files, revision):
    repo = hub.add_repo(REPO, hf_files)
    repo.refs[revision] = repo.refs["main"]  # a mirror that would answer for it
    one_error(mistral(env, "download", REPO, "--revision", revision), f"--revision {revision!r} is not a branch")
    assert hub.requests() == [] and files_in(Path(env["HF_HOME"])) == []


def test_force_on_a_gated_repo_is_the_same_sentence(hub, env, hf_files):
    hub.add_repo(INSTRUCT, hf_files, gated=True)
    gated = one_error(mistral(env, "download"), f"{INSTRUCT} is gated: accept its terms at", "--token")
    assert one_error(mistral(env, "download", "--force")) == gated
    ok(mistral(env, "download", "--token", GOOD_TOKEN))
    assert one_error(mistral(env, "download", "--force")) == gated  # the files on disk change nothing


def test_force_without_the_hub_fails_and_keeps_the_cached_copy(hub, env, hf_files, dead):
    hub.add_repo(REPO, hf_files)
    snapshot = ok(mistral(env, "download", REPO))
    message = one_error(mistral({**env, "HF_ENDPOINT": dead}, "download", REPO, "--force"))
    assert re.fullmatch(
        rf"Cannot reach the Hugging Face Hub at {re.escape(dead)} \([^()]+\), so --force cannot fetch a fresh copy; "
        r"check your network connection \(or HF_ENDPOINT\) and run again\.",
        message,
    ), message
    one_error(mistral({**env, "HF_HUB_OFFLINE": "1"}, "download", REPO, "--force"), "HF_HUB_OFFLINE is set, so --force")
    assert ok(mistral({**env, "HF_HUB_OFFLINE": "1"}, "download", REPO)) == snapshot  # untouched


def test_without_the_hub_the_cached_copy_comes_with_one_clean_note(hub, env, hf_files, dead):
    hub.add_repo(REPO, hf_files)
    snapshot = ok(mistral(env, "download", REPO))
    r = mistral({**env, "HF_ENDPOINT": dead}, "download", REPO)
    assert ok(r) == snapshot
    assert re.fullmatch(
        rf"Cannot reach the Hugging Face Hub at {re.escape(dead)} \([^()]+\); using the copy in the Hugging Face "
        r"cache without checking for updates\.\n",
        r.stderr,
    ), r.stderr
