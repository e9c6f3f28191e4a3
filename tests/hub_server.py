"""A loopback server that speaks the Hugging Face Hub protocol (docs/FORMAT.md section 6) and serves tar files with Range.

Two listeners on 127.0.0.1: the "hub" (API, /resolve) and a "cdn" on another port, to which /resolve redirects large
(LFS) files as the real Hub does, so a client that forwards its token off the Hub is caught. Tar archives are served
by the cdn. Every request is logged with the bytes of body sent. Faults can be scripted per file: a connection cut
after N bytes, corrupted content, a throttle.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pth", ".model")
CHUNK = 64 * 1024
GOOD_TOKEN = "hf_good_token_0123456789"  # has accepted every gated repo
NOT_ACCEPTED_TOKEN = "hf_valid_but_not_accepted"  # a real account that has not accepted the terms


def git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def is_lfs(path: str, data: bytes) -> bool:
    return path.endswith(LFS_SUFFIXES) or len(data) >= 10_000


@dataclass
class Repo:
    repo_id: str
    gated: bool = False
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)
    claimed_sizes: dict[str, int] = field(default_factory=dict)  # sizes the API announces instead of the real ones

    def commit(self, files: dict[str, bytes], ref: str = "main") -> str:
        digest = hashlib.sha1(json.dumps(sorted((k, hashlib.sha256(v).hexdigest()) for k, v in files.items())).encode())
        sha = hashlib.sha1(digest.digest() + str(len(self.commits)).encode()).hexdigest()
        self.commits[sha] = dict(files)
        self.refs[ref] = sha
        return sha

    def resolve(self, revision: str) -> str | None:
        if revision in self.refs:
            return self.refs[revision]
        return revision if revision in self.commits else None


@dataclass
class Logged:
    server: str  # "hub" | "cdn"
    method: str
    path: str
    label: str | None  # the file served: repo path, or tar path
    range: str | None
    authorization: str | None
    status: int = 0
    sent: int = 0  # body bytes


class HubServer:
    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.tars: dict[str, bytes] = {}
        self.log: list[Logged] = []
        self.cuts: dict[str, list[int]] = {}  # label -> bytes to send before dropping, one entry per GET
        self.corrupt: dict[str, bytes] = {}  # label -> content served instead
        self.throttle = 0.0  # seconds per 64 KiB chunk
        self.tar_etag = True
        self._lock = threading.Lock()
        self._servers = [self._listen("hub"), self._listen("cdn")]
        self.url = f"http://127.0.0.1:{self._servers[0].server_port}"
        self.cdn_url = f"http://127.0.0.1:{self._servers[1].server_port}"
        for srv in self._servers:
            threading.Thread(target=srv.serve_forever, daemon=True).start()

    def close(self) -> None:
        for srv in self._servers:
            srv.shutdown()
            srv.server_close()

    def __enter__(self) -> HubServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- content

    def add_repo(self, repo_id: str, files: dict[str, bytes], *, gated: bool = False) -> Repo:
        repo = Repo(repo_id, gated=gated)
        repo.commit(files)
        self.repos[repo_id] = repo
        return repo

    def add_tar(self, path: str, data: bytes) -> str:
        self.tars[path] = data
        return self.cdn_url + path

    # -- what happened

    def requests(self, label: str | None = None, *, method: str | None = None) -> list[Logged]:
        with self._lock:
            return [
                r for r in self.log if (label is None or r.label == label) and (method is None or r.method == method)
            ]

    def sent(self, label: str) -> int:
        return sum(r.sent for r in self.requests(label))

    def file_gets(self) -> list[Logged]:
        return [r for r in self.requests(method="GET") if r.label is not None and r.status in (200, 206)]

    def clear_log(self) -> None:
        with self._lock:
            self.log.clear()

    # -- plumbing

    def _listen(self, role: str) -> ThreadingHTTPServer:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_HEAD(self) -> None:
                hub._handle(self, role, head=True)

            def do_GET(self) -> None:
                hub._handle(self, role, head=False)

        srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        srv.daemon_threads = True
        return srv

    def _handle(self, h: BaseHTTPRequestHandler, role: str, head: bool) -> None:
        entry = Logged(role, h.command, h.path, None, h.headers.get("Range"), h.headers.get("Authorization"))
        with self._lock:
            self.log.append(entry)
        try:
            if role == "cdn":
                self._cdn(h, entry, head)
            else:
                self._hub(h, entry, head)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away (Ctrl-C in a test)

    def _send(self, h, entry: Logged, status: int, headers: dict[str, str], body: bytes = b"") -> None:
        entry.status = status
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if h.command != "HEAD" and body:
            h.wfile.write(body)
            entry.sent = len(body)

    def _error(self, h, entry: Logged, status: int, code: str | None, message: str, extra: dict | None = None) -> None:
        headers = {"Content-Type": "application/json", "X-Error-Message": message, **(extra or {})}
        if code:
            headers["X-Error-Code"] = code
        self._send(h, entry, status, headers, json.dumps({"error": message}).encode())

    def _auth(self, h, entry: Logged, repo: Repo, *, files: bool) -> bool:
        """Like the Hub: a bad token is refused anywhere; a gated repo's files need a token that has accepted."""
        auth = h.headers.get("Authorization")
        token = auth.removeprefix("Bearer ").strip() if auth else None
        if token is not None and token not in (GOOD_TOKEN, NOT_ACCEPTED_TOKEN):
            self._error(h, entry, 401, None, "Invalid credentials in Authorization header")
            return False
        if files and repo.gated:
            if token is None:
                self._error(h, entry, 401, "GatedRepo", f"Access to model {repo.repo_id} is restricted.")
                return False
            if token != GOOD_TOKEN:
                self._error(h, entry, 403, "GatedRepo", f"Access to model {repo.repo_id} is restricted.")
                return False
        return True

    def _hub(self, h, entry: Logged, head: bool) -> None:
        url = urlsplit(h.path)
        path = unquote(url.path)
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/(.+))?", path):
            return self._api_info(h, entry, m.group(1), m.group(2) or "main", "blobs" in parse_qs(url.query))
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?", path):
            return self._api_tree(h, entry, m.group(1), m.group(2), m.group(3) or "")
        if m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", url.path):
            return self._resolve(h, entry, unquote(m.group(1)), unquote(m.group(2)), unquote(m.group(3)), head)
        self._error(h, entry, 404, None, "Not found")

    def _repo_at(self, h, entry: Logged, repo_id: str, revision: str, *, files: bool) -> tuple[Repo, str] | None:
        repo = self.repos.get(repo_id)
        if repo is None:
            self._error(h, entry, 404, "RepoNotFound", "Repository not found")
            return None
        if not self._auth(h, entry, repo, files=files):
            return None
        sha = repo.resolve(revision)
        if sha is None:
            self._error(h, entry, 404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return None
        return repo, sha

    def _file_meta(self, repo: Repo, path: str, data: bytes, blobs: bool) -> dict:
        size = repo.claimed_sizes.get(path, len(data))
        meta: dict = {"rfilename": path}
        if blobs:
            meta.update(size=size, blobId=git_oid(data))
            if is_lfs(path, data):
                meta["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": size, "pointerSize": 134}
        return meta

    def _api_info(self, h, entry: Logged, repo_id: str, revision: str, blobs: bool) -> None:
        found = self._repo_at(h, entry, repo_id, revision, files=False)
        if found is None:
            return
        repo, sha = found
        files = repo.commits[sha]
        body = {
            "_id": sha[:24],
            "id": repo_id,
            "modelId": repo_id,
            "sha": sha,
            "private": False,
            "gated": "manual" if repo.gated else False,
            "disabled": False,
            "siblings": [self._file_meta(repo, p, d, blobs) for p, d in sorted(files.items())],
        }
        self._send(h, entry, 200, {"Content-Type": "application/json"}, json.dumps(body).encode())

    def _api_tree(self, h, entry: Logged, repo_id: str, revision: str, prefix: str) -> None:
        found = self._repo_at(h, entry, repo_id, revision, files=False)
        if found is None:
            return
        repo, sha = found
        out = []
        for p, d in sorted(repo.commits[sha].items()):
            if prefix and not p.startswith(prefix.rstrip("/") + "/"):
                continue
            size = repo.claimed_sizes.get(p, len(d))
            item = {"type": "file", "oid": git_oid(d), "size": size, "path": p}
            if is_lfs(p, d):
                item["lfs"] = {"oid": hashlib.sha256(d).hexdigest(), "size": size, "pointerSize": 134}
            out.append(item)
        self._send(h, entry, 200, {"Content-Type": "application/json"}, json.dumps(out).encode())

    def _resolve(self, h, entry: Logged, repo_id: str, revision: str, path: str, head: bool) -> None:
        found = self._repo_at(h, entry, repo_id, revision, files=True)
        if found is None:
            return
        repo, sha = found
        entry.label = path
        data = repo.commits[sha].get(path)
        if data is None:
            self._error(h, entry, 404, "EntryNotFound", f"{path} does not exist", {"X-Repo-Commit": sha})
            return
        headers = {"X-Repo-Commit": sha, "Accept-Ranges": "bytes"}
        if is_lfs(path, data):
            sha256 = hashlib.sha256(data).hexdigest()
            headers.update({"X-Linked-Etag": f'"{sha256}"', "X-Linked-Size": str(len(data)), "ETag": f'"{sha256}"'})
            headers["Location"] = f"{self.cdn_url}/blobs/{sha256}?label={path}&signed=1"
            self._send(h, entry, 302, headers)
            return
        headers["ETag"] = f'"{git_oid(data)}"'
        self._serve(h, entry, path, data, headers, head)

    def _cdn(self, h, entry: Logged, head: bool) -> None:
        url = urlsplit(h.path)
        if url.path.startswith("/blobs/"):
            sha256 = url.path.removeprefix("/blobs/")
            label = parse_qs(url.query).get("label", [None])[0]
            data = next(
                (d for r in self.repos.values() for c in r.commits.values() for d in c.values()
                 if hashlib.sha256(d).hexdigest() == sha256),
                None,
            )  # fmt: skip
            if data is None:
                self._error(h, entry, 404, None, "No such blob")
                return
            entry.label = label
            self._serve(h, entry, label, data, {"ETag": f'"{sha256}"', "Accept-Ranges": "bytes"}, head)
            return
        data = self.tars.get(url.path)
        if data is None:
            self._error(h, entry, 404, None, "Not found")
            return
        entry.label = url.path
        headers = {"Accept-Ranges": "bytes", "Content-Type": "application/x-tar"}
        if self.tar_etag:
            headers["ETag"] = f'"{hashlib.md5(data).hexdigest()}"'
        self._serve(h, entry, url.path, data, headers, head)

    def _serve(self, h, entry: Logged, label: str, data: bytes, headers: dict[str, str], head: bool) -> None:
        """The body, with Range and If-Range, and the scripted faults of this label."""
        data = self.corrupt.get(label, data)
        start, end, status = 0, len(data), 200
        rng = h.headers.get("Range")
        if_range = h.headers.get("If-Range")
        if rng and (if_range is None or if_range == headers.get("ETag")):
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())
            if m is None or int(m.group(1)) >= len(data):
                self._send(h, entry, 416, {"Content-Range": f"bytes */{len(data)}"})
                return
            start = int(m.group(1))
            end = min(len(data), int(m.group(2)) + 1) if m.group(2) else len(data)
            status = 206
            headers = {**headers, "Content-Range": f"bytes {start}-{end - 1}/{len(data)}"}
        entry.status = status
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(end - start))
        h.end_headers()
        if head:
            return
        with self._lock:
            cuts = self.cuts.get(label)
            limit = cuts.pop(0) if cuts else None
        pos = start
        while pos < end:
            n = min(CHUNK, end - pos)
            if limit is not None:
                n = min(n, start + limit - pos)
                if n <= 0:
                    h.wfile.flush()
                    h.close_connection = True
                    with contextlib.suppress(OSError):
                        h.connection.shutdown(socket.SHUT_RDWR)
                    return
            h.wfile.write(data[pos : pos + n])
            pos += n
            entry.sent += n
            if self.throttle:
                time.sleep(self.throttle)


def put_in_hf_cache(hub_cache: Path, repo_id: str, files: dict[str, bytes], *, ref: str | None = "main") -> Path:
    """A snapshot laid out as huggingface_hub lays it out (blobs by hash, relative symlinks, refs), without a server."""
    storage = hub_cache / ("models--" + repo_id.replace("/", "--"))
    sha = hashlib.sha1(b"".join(hashlib.sha256(v).digest() for _, v in sorted(files.items()))).hexdigest()
    snapshot = storage / "snapshots" / sha
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        blob_name = hashlib.sha256(data).hexdigest() if is_lfs(name, data) else git_oid(data)
        blob = storage / "blobs" / blob_name
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    if ref:
        (storage / "refs").mkdir(parents=True, exist_ok=True)
        (storage / "refs" / ref).write_text(sha)
    return snapshot


def folder_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}
