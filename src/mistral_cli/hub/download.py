"""`mistral download`: the weights and tokenizer from the Hugging Face Hub or the vendor's tar archive.

Hub: metadata and the small files go through huggingface_hub, into the standard Hugging Face cache. The large (LFS)
files are streamed here, into `blobs/<sha256>.incomplete` in that same cache, because huggingface_hub deletes its
partial file when a download fails: ours stays, so Ctrl-C or a dropped connection costs nothing. Each is checked
against the sha256 the Hub publishes, renamed to its blob, and huggingface_hub then links it into the snapshot.

Tar: the archive is streamed with Range resume into `$MISTRAL_HOME/.partial`, checked against the vendor's md5 where
one is published, unpacked member by member (regular files and folders only, nothing outside the target) and moved
into `$MISTRAL_HOME/<name>`. An archive without tokenizer.model gets the v1 tokenizer (see `supply_v1_tokenizer`).

stdout gets one line, the model folder; everything else (progress, notes) goes to stderr.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import re
import shutil
import tarfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from rich.console import Console

from mistral_cli import __version__, atomic
from mistral_cli.errors import MistralError
from mistral_cli.hub.models import (
    ALIASES,
    REPO_ID,
    SOURCE_FILE,
    V1_TOKENIZER_SHA256,
    cached_snapshots,
    hf_hub_cache,
    human_bytes,
    models_home,
    repo_cache_folder,
    tar_folder_name,
)
from mistral_cli.model.files import model_files

CHUNK = 1 << 20
TIMEOUT = 30  # seconds without a byte before a connection counts as dropped
RETRIES = 3  # attempts in a row that bring no new byte before giving up (the bytes so far stay on disk)
TAR_MD5 = {a.tar_name: a.tar_md5 for a in ALIASES.values() if a.tar_md5}
V1_TOKENIZER_REPO = "mistral-community/Mistral-7B-v0.2"  # not gated, same v1 tokenizer.model
TAR_HEADERS = {"User-Agent": f"mistral-cli/{__version__}"}


class Interrupted(MistralError):
    exit_code = 130


def run_download(
    *, model: str, revision: str | None, token: str | None, source: str, url: str | None, dry_run: bool, force: bool
) -> None:
    console = Console(stderr=True, highlight=False, soft_wrap=True)
    try:
        if url is not None or source == "tar":
            if revision is not None:
                raise MistralError("--revision applies to Hub downloads only; drop it for a tar archive.")
            folder = download_tar(model, url, console=console, dry_run=dry_run, force=force)
        else:
            folder = download_hub(model, revision, token, console=console, dry_run=dry_run, force=force)
    except KeyboardInterrupt:
        raise Interrupted(
            "Interrupted; the bytes downloaded so far are kept: run the same command to resume."
        ) from None
    if folder is not None:
        print(folder, flush=True)


# ------------------------------------------------------------------------------------------------ resumable transfer


class Dropped(Exception):
    """The connection failed RETRIES times in a row; `have` bytes are on disk."""

    def __init__(self, url: str, have: int, size: int | None, reason: str) -> None:
        super().__init__(reason)
        self.url, self.have, self.size, self.reason = url, have, size, reason


class _KeepSameOriginAuth(urllib.request.HTTPRedirectHandler):
    """Authorization is sent as an unredirected header (never to a CDN); keep it for redirects on the same origin."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        auth = req.unredirected_hdrs.get("Authorization")
        if new is not None and auth and _origin(newurl) == _origin(req.full_url):
            new.add_unredirected_header("Authorization", auth)
        return new


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    return parts.scheme, (parts.hostname or "").lower(), parts.port


_opener = urllib.request.build_opener(_KeepSameOriginAuth)


def _request(url: str, headers: dict[str, str], method: str = "GET") -> urllib.request.Request:
    req = urllib.request.Request(url, method=method)
    for key, value in headers.items():
        if key.lower() == "authorization":
            req.add_unredirected_header("Authorization", value)
        else:
            req.add_header(key, value)
    return req


def fetch(
    url: str,
    partial: Path,
    *,
    size: int | None,
    headers: dict[str, str],
    algo: str | None,
    advance: Callable[[int], None],
    validator: str | None = None,
) -> str | None:
    """Stream `url` into `partial`, resuming from the bytes already there; returns the digest of the whole file.

    `validator` (an ETag) goes out as If-Range, so a file that changed on the server restarts from zero.
    """
    hasher = _hasher(algo)
    have = partial.stat().st_size if partial.exists() else 0
    if size is not None and have > size:
        partial.unlink()
        have = 0
    if hasher and have:
        with open(partial, "rb") as f:
            while block := f.read(CHUNK):
                hasher.update(block)
    failures = 0
    while size is None or have < size:
        req = _request(url, headers)
        if have:
            req.add_header("Range", f"bytes={have}-")
            if validator:
                req.add_header("If-Range", validator)
        try:
            with _opener.open(req, timeout=TIMEOUT) as resp:
                start = _range_start(resp) if resp.status == 206 else 0
                if start != have:  # the server sent the whole file (or another range): start over
                    advance(-have)
                    have, hasher = 0, _hasher(algo)
                total = _total_size(resp, start)
                if size is None:
                    size = total
                elif total is not None and total != size:
                    raise MistralError(f"{url} is {total} bytes on the server, not the {size} announced; run again.")
                with _LocalFile(partial, append=have > 0) as out:
                    while chunk := resp.read(CHUNK):
                        out.write(chunk)
                        have += len(chunk)
                        if hasher:
                            hasher.update(chunk)
                        advance(len(chunk))
                        failures = 0
                if size is None:  # no length announced: the end of the stream is the end of the file
                    size = have
                elif have < size:
                    raise http.client.IncompleteRead(b"", size - have)
        except urllib.error.HTTPError as exc:
            if exc.code == 416 and have:  # our partial is longer than the file now is
                advance(-have)
                partial.unlink()
                have, hasher = 0, _hasher(algo)
                continue
            if exc.code not in (408, 429, 500, 502, 503, 504):
                raise
            failures = _retry(failures, url, have, size, f"HTTP {exc.code}")
        except (OSError, http.client.HTTPException) as exc:
            failures = _retry(failures, url, have, size, _reason(exc))
    return hasher.hexdigest() if hasher else None


def _hasher(algo: str | None):  # type: ignore[no-untyped-def]
    return hashlib.new(algo, usedforsecurity=False) if algo else None


class _LocalFile:
    """The partial file; its errors (disk full, permissions) become a MistralError, never a network retry."""

    def __init__(self, path: Path, *, append: bool) -> None:
        self.path = path
        try:
            self.f = open(path, "ab" if append else "wb")  # noqa: SIM115 (closed in __exit__)
        except OSError as exc:
            raise self._error(exc) from None

    def write(self, data: bytes) -> None:
        try:
            self.f.write(data)
        except OSError as exc:
            raise self._error(exc) from None

    def _error(self, exc: OSError) -> MistralError:
        return MistralError(
            f"Cannot write {self.path} ({exc.strerror or exc}); free some space or fix its permissions, then run "
            "the same command to resume."
        )

    def __enter__(self) -> _LocalFile:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.f.close()
        except OSError as err:
            raise self._error(err) from None


def _retry(failures: int, url: str, have: int, size: int | None, reason: str) -> int:
    if failures >= RETRIES:
        raise Dropped(url, have, size, reason)
    time.sleep(0.2 * 2**failures)
    return failures + 1


def _reason(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.URLError) and not isinstance(exc, urllib.error.HTTPError):
        exc = exc.reason if isinstance(exc.reason, BaseException) else exc
    if isinstance(exc, http.client.IncompleteRead):
        return "the connection was cut mid-file"
    return str(exc) or type(exc).__name__


def _range_start(resp: http.client.HTTPResponse) -> int:
    value = resp.headers.get("Content-Range", "")  # "bytes 100-199/200"
    try:
        return int(value.split()[1].split("-")[0])
    except (IndexError, ValueError):
        return -1


def _total_size(resp: http.client.HTTPResponse, start: int) -> int | None:
    if resp.headers.get("Content-Encoding", "identity") != "identity":
        return None
    value = resp.headers.get("Content-Range")
    if value and "/" in value and not value.endswith("/*"):
        return int(value.rsplit("/", 1)[1])
    length = resp.headers.get("Content-Length")
    return start + int(length) if length is not None else None


def _free_space(path: Path) -> tuple[Path, int]:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate, shutil.disk_usage(candidate).free
    return path, 0


def _check_disk(need: int, where: Path, hint: str) -> None:
    at, free = _free_space(where)
    if need > free:
        raise MistralError(
            f"Not enough disk space: the download needs {human_bytes(need)} more but {at} has {human_bytes(free)} "
            f"free; free some space or {hint}."
        )


@contextmanager
def _exclusive(lock_path: Path, what: str, console: Console) -> Iterator[None]:
    """One download of a model at a time; a second one waits, then finds the files there."""
    from filelock import FileLock, Timeout

    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        console.print(f"Another download of {what} is running; waiting for it to finish.")
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


class Transfer:
    """Rich progress on stderr: every byte still to fetch (speed, time left) and the current file."""

    def __init__(self, console: Console, total: int) -> None:
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self.console = console
        self.progress = Progress(
            TextColumn("{task.description}", style="bold"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=console,
            disable=not console.is_terminal,
        )
        self.overall = self.progress.add_task("total", total=total)
        self.current: object | None = None
        self.fetched = 0
        self.started = time.monotonic()

    def __enter__(self) -> Transfer:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def start_file(self, name: str, size: int | None, have: int, verb: str = "Fetching") -> Callable[[int], None]:
        if self.current is not None:
            self.progress.remove_task(self.current)  # type: ignore[arg-type]
        self.current = self.progress.add_task(name, total=size, completed=have)
        if not self.console.is_terminal:
            extra = f", resuming after {human_bytes(have)}" if have else ""
            self.console.print(f"{verb} {name} ({human_bytes(size) if size else 'size unknown'}{extra})")

        def advance(n: int) -> None:
            self.fetched += n
            self.progress.advance(self.overall, n)
            self.progress.advance(self.current, n)  # type: ignore[arg-type]

        return advance

    def summary(self) -> None:
        took = time.monotonic() - self.started
        if self.fetched > 0:
            speed = human_bytes(self.fetched / took) if took > 0 else "?"
            self.console.print(f"Downloaded {human_bytes(self.fetched)} in {took:.1f} s ({speed}/s).")


# ---------------------------------------------------------------------------------------------------------------- hub


@dataclass(frozen=True)
class HubFile:
    path: str
    size: int
    sha256: str | None  # the LFS oid the Hub publishes; None for small files kept in git


WEIGHTS_HELP = "model*.safetensors with config.json, or consolidated.safetensors / consolidated.00.pth with params.json"


def choose_files(names: list[str]) -> list[str]:
    """What inference needs from a repo listing: one weight format (safetensors first), its config, the tokenizer."""
    top = set(names)
    shards = sorted(n for n in top if n.startswith("model-") and n.endswith(".safetensors"))
    if "model.safetensors.index.json" in top and shards:
        chosen = ["config.json", "model.safetensors.index.json", *shards]
    elif "model.safetensors" in top:
        chosen = ["config.json", "model.safetensors"]
    elif "consolidated.safetensors" in top:
        chosen = ["params.json", "consolidated.safetensors"]
    elif "consolidated.00.pth" in top:
        chosen = ["params.json", "consolidated.00.pth"]
    elif any(n.endswith(".bin") for n in top):
        raise MistralError(f"The repo has only PyTorch .bin weights, which mistral-cli does not load ({WEIGHTS_HELP}).")
    else:
        raise MistralError(f"The repo has no weights mistral-cli can load ({WEIGHTS_HELP}).")
    missing = [n for n in (*chosen, "tokenizer.model") if n not in top]
    if missing:
        raise MistralError(f"The repo has no {missing[0]}, which inference needs next to the weights.")
    return [*chosen, "tokenizer.model"]


def hub_repo_id(model: str) -> str:
    alias = ALIASES.get(model.lower())
    if alias:
        return alias.repo_id
    if REPO_ID.fullmatch(model):
        return model
    raise MistralError(f"{model!r} is neither an alias ({', '.join(ALIASES)}) nor a Hugging Face repo id (org/name).")


def download_hub(
    model: str, revision: str | None, token: str | None, *, console: Console, dry_run: bool, force: bool
) -> Path | None:
    repo_id = hub_repo_id(model)
    if revision is not None:
        check_revision(revision)  # before any path is built from it or any request made
    hf_hub_cache()  # a cache path that cannot be a folder is refused before anything else
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        if force:
            raise MistralError(
                "HF_HUB_OFFLINE is set, so --force cannot fetch a fresh copy; unset it, or drop --force."
            )
        return _offline_copy(model, repo_id, revision, console, "HF_HUB_OFFLINE is set")
    try:
        with _hub_errors(repo_id, revision):
            from huggingface_hub import HfApi

            info = HfApi(token=token).model_info(repo_id, revision=revision, files_metadata=True)
    except _NetworkDown as exc:
        if force:  # a fresh copy was asked for: the one in the cache is not the answer
            raise MistralError(
                f"{exc.reason}, so --force cannot fetch a fresh copy; check your network connection (or HF_ENDPOINT) "
                "and run again."
            ) from None
        return _offline_copy(model, repo_id, revision, console, exc.reason)
    sha = info.sha
    if not sha or info.siblings is None:
        raise MistralError(f"The Hub at {constants.ENDPOINT} sent no file list for {repo_id}; check HF_ENDPOINT.")
    listing = {s.rfilename: _hub_file(s) for s in info.siblings}
    files = [listing[n] for n in choose_files(list(listing))]
    storage = repo_cache_folder(repo_id)
    snapshot = storage / "snapshots" / sha
    if dry_run:
        _print_plan(repo_id, revision or "main", sha, files, listing, storage, force)
        if info.gated:
            print(
                f"Gated: the token must belong to an account that accepted the terms at {constants.ENDPOINT}/{repo_id}."
            )
        return None

    with _exclusive(hf_hub_cache() / ".locks" / "mistral-cli" / f"{storage.name}.lock", repo_id, console):
        todo = [f for f in files if force or not _cached(storage, snapshot, f)]
        need = sum(f.size - _partial_size(storage, f) for f in todo)
        _check_disk(need, storage, "point HF_HOME (or HF_HUB_CACHE) at a larger disk")
        with _hub_errors(repo_id, revision):
            if todo:
                with Transfer(console, need) as transfer:
                    # small files first: a gated repo or a bad token fails before any large transfer
                    for f in sorted(todo, key=lambda f: f.sha256 is not None):
                        if f.sha256 is None:
                            advance = transfer.start_file(f.path, f.size, 0)
                            _hf_download(repo_id, f.path, sha, token, force=force)
                            advance(f.size)
                        else:
                            _fetch_blob(repo_id, sha, f, storage, token, transfer, force)
                transfer.summary()
            for f in files:  # huggingface_hub links each blob into this snapshot (no bytes: the blob is there)
                if not (snapshot / f.path).exists():
                    _hf_download(repo_id, f.path, sha, token, force=False)
        _write_ref(storage, revision or "main", sha)
    model_files(snapshot)  # a last check that the snapshot is a loadable model folder
    return snapshot


def _hub_file(sibling: Any) -> HubFile:
    if sibling.lfs is not None:
        return HubFile(sibling.rfilename, sibling.lfs.size, sibling.lfs.sha256)
    return HubFile(sibling.rfilename, sibling.size or 0, None)


def _cached(storage: Path, snapshot: Path, f: HubFile) -> bool:
    return (snapshot / f.path).exists() or (f.sha256 is not None and (storage / "blobs" / f.sha256).is_file())


def _partial_size(storage: Path, f: HubFile) -> int:
    if f.sha256 is None:
        return 0
    partial = storage / "blobs" / f"{f.sha256}.incomplete"
    return partial.stat().st_size if partial.is_file() else 0


def _print_plan(
    repo_id: str, revision: str, sha: str, files: list[HubFile], listing: dict[str, HubFile], storage: Path, force: bool
) -> None:
    snapshot = storage / "snapshots" / sha
    print(f"{repo_id} at {sha[:12]} ({revision}), into {snapshot}:")
    need = 0
    width = max(len(f.path) for f in files)
    for f in files:
        have = _partial_size(storage, f)
        if _cached(storage, snapshot, f) and not force:
            state = "on disk"
        else:
            state = "to fetch" + (f" ({human_bytes(have)} already on disk)" if have else "")
            need += f.size - have
        print(f"  {f.path:<{width}}  {human_bytes(f.size):>10}  {state}")
    skipped = sorted(set(listing) - {f.path for f in files})
    if skipped:
        skipped_bytes = sum(listing[n].size for n in skipped)
        print(f"Not needed, not fetched: {len(skipped)} files ({human_bytes(skipped_bytes)}): {', '.join(skipped)}")
    at, free = _free_space(storage)
    print(f"Would fetch {human_bytes(need)}; {human_bytes(free)} free at {at}.")


def _fetch_blob(
    repo_id: str, sha: str, f: HubFile, storage: Path, token: str | None, transfer: Transfer, force: bool
) -> None:
    """A large file into blobs/<sha256>, resumable, verified; the same lock huggingface_hub takes for that blob."""
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers

    assert f.sha256 is not None
    blob = storage / "blobs" / f.sha256
    partial = blob.with_name(blob.name + ".incomplete")
    lock = hf_hub_cache() / ".locks" / storage.name / f"{f.sha256}.lock"
    with _exclusive(lock, f.path, transfer.console):
        if blob.is_file() and not force:
            return
        blob.parent.mkdir(parents=True, exist_ok=True)
        if force:
            partial.unlink(missing_ok=True)
        have = partial.stat().st_size if partial.exists() else 0
        advance = transfer.start_file(f.path, f.size, have)
        url = hf_hub_url(repo_id, f.path, revision=sha)
        headers = build_hf_headers(token=token)
        with _transfer_errors(partial, "the Hugging Face Hub"):
            digest = fetch(url, partial, size=f.size, headers=headers, algo="sha256", advance=advance)
        if digest != f.sha256:
            partial.unlink()
            raise MistralError(
                f"{f.path} failed its sha256 check (the Hub publishes {f.sha256[:12]}…, the bytes received give "
                f"{(digest or '')[:12]}…) and was removed; run the same command to fetch it again."
            )
        os.chmod(partial, 0o644)
        os.replace(partial, blob)


def _hf_download(repo_id: str, filename: str, sha: str, token: str | None, *, force: bool) -> None:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()  # our own bar counts these bytes
    hf_hub_download(repo_id, filename, revision=sha, token=token, cache_dir=hf_hub_cache(), force_download=force)


def _write_ref(storage: Path, revision: str, sha: str) -> None:
    """refs/<branch or tag> -> commit, as huggingface_hub keeps it, so later lookups by name find this snapshot."""
    if revision == sha:
        return
    ref = storage / "refs" / revision
    ref.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(ref, sha)


def _offline_copy(model: str, repo_id: str, revision: str | None, console: Console, why: str) -> Path:
    """Without the Hub, a complete copy already in the cache is still the answer (as `hf download` does)."""
    from mistral_cli.hub.models import resolve_model

    if revision is None:
        try:
            paths = resolve_model(model)
        except MistralError:
            paths = None
        if paths is not None and paths.source == "hub-cache":
            console.print(f"{why}; using the copy in the Hugging Face cache without checking for updates.")
            return paths.folder
    if why.startswith("HF_HUB_OFFLINE"):
        raise MistralError(f"HF_HUB_OFFLINE is set and {repo_id} is not in the cache; unset it to download the model.")
    raise MistralError(f"{why}; check your network connection (or HF_ENDPOINT) and run again.")


class _NetworkDown(MistralError):
    """The Hub cannot be reached; `reason` is the fact alone ("Cannot reach the Hugging Face Hub at X (why)"), to
    build either the error or the note that a cached copy is used instead."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"{reason}; check your network connection (or HF_ENDPOINT) and run again.")
        self.reason = reason


# What `git check-ref-format` refuses in a branch or tag name (a commit id passes), and a leading "-": nothing that
# could leave refs/ as a path or pass for an option.
_BAD_REF = re.compile(r"^[-/]|^@$|\.\.|//|@\{|[\x00-\x20\x7f~^:?*\[\\]|[/.]$|\.lock$|\.lock/|(^|/)\.")


def check_revision(revision: str) -> None:
    """Refuse a --revision that is neither a commit id nor a valid git ref name."""
    if not revision or _BAD_REF.search(revision) or len(revision) > 255:
        raise MistralError(
            f"--revision {revision!r} is not a branch, tag or commit name (no '..', spaces, leading '-' or '/', "
            "or the characters ~^:?*[\\); give one the repository has."
        )


def _transport_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    try:
        import httpx2

        errors.append(httpx2.TransportError)
    except ImportError:  # huggingface_hub before 1.0 used requests
        import requests

        errors.extend([requests.ConnectionError, requests.Timeout])
    return tuple(errors)


@contextmanager
def _hub_errors(repo_id: str, revision: str | None) -> Iterator[None]:
    """huggingface_hub's exceptions, as one sentence that says what to do."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    page = f"{constants.ENDPOINT}/{repo_id}"
    try:
        yield
    except GatedRepoError as exc:
        if exc.response is not None and exc.response.status_code == 403:
            raise MistralError(
                f"Your Hugging Face token has no access to {repo_id} yet: accept its terms at {page} with the same "
                "account, then run again."
            ) from None
        raise MistralError(
            f"{repo_id} is gated: accept its terms at {page}, then pass a token with --token, HF_TOKEN or "
            "`hf auth login`."
        ) from None
    except RepositoryNotFoundError:
        raise MistralError(
            f"{repo_id} was not found on the Hub ({constants.ENDPOINT}); check the name, or pass a token if it is "
            "private."
        ) from None
    except RevisionNotFoundError:
        raise MistralError(
            f"{repo_id} has no revision {revision!r}; give a branch, tag or commit that exists."
        ) from None
    except OfflineModeIsEnabled:
        raise MistralError("HF_HUB_OFFLINE is set; unset it to download.") from None
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status == 401:
            raise MistralError(
                "The Hub rejected the Hugging Face token (401); check --token or HF_TOKEN, or run `hf auth login` again."
            ) from None
        raise MistralError(f"The Hub answered HTTP {status} for {repo_id}; try again later.") from None
    except LocalEntryNotFoundError:
        raise _NetworkDown(f"Cannot reach the Hugging Face Hub at {constants.ENDPOINT}") from None
    except _transport_errors() as exc:
        raise _NetworkDown(f"Cannot reach the Hugging Face Hub at {constants.ENDPOINT} ({_reason(exc)})") from None
    except ValueError as exc:
        # with force_download, huggingface_hub wraps the Hub's answer in "Force download failed due to the above
        # error": the cause is what to report
        cause = exc.__cause__
        if cause is None or isinstance(cause, ValueError):
            raise
        with _hub_errors(repo_id, revision):
            raise cause from None


@contextmanager
def _transfer_errors(partial: Path, server: str) -> Iterator[None]:
    """Errors of our own transfers (`fetch`), as one sentence."""
    try:
        yield
    except Dropped as exc:
        if exc.have == 0:
            raise MistralError(
                f"The download from {urlsplit(exc.url).hostname} failed ({exc.reason}); check your network connection "
                "and run again."
            ) from None
        kept = f"{human_bytes(exc.have)} of {human_bytes(exc.size)}" if exc.size else human_bytes(exc.have)
        raise MistralError(
            f"The download from {urlsplit(exc.url).hostname} failed ({exc.reason}); {kept} are kept in {partial}: "
            "run the same command to resume."
        ) from None
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            raise MistralError(
                f"{server} refused the download (HTTP {exc.code}); check that your token has access, then run again."
            ) from None
        if exc.code == 404:
            raise MistralError(f"{exc.url} does not exist on {server} (HTTP 404); check the name or --url.") from None
        raise MistralError(f"{server} answered HTTP {exc.code} for {exc.url}; try again later.") from None


# ---------------------------------------------------------------------------------------------------------------- tar


def download_tar(model: str, url: str | None, *, console: Console, dry_run: bool, force: bool) -> Path | None:
    alias = ALIASES.get(model.lower())
    name = tar_folder_name(alias.name if alias else model)
    if url is None:
        if alias is None:
            raise MistralError(f"No archive is known for {model!r}; give its address with --url.")
        url = alias.tar_url
    if not name or name.startswith(".") or any(c in name for c in "/\\"):
        raise MistralError(f"{model!r} cannot name a model folder; give a simple name such as my-model.")
    url, headers = checked_url(url)
    archive_name = PurePosixPath(urlsplit(url).path).name or f"{name}.tar"
    md5 = TAR_MD5.get(archive_name)
    home = models_home()
    dest = home / name
    if _is_model(dest) and not force and not dry_run:
        return dest
    partial = home / ".partial" / f"{name}.tar.part"
    meta_path = partial.with_name(partial.name + ".json")
    size, validator = _head(url, headers)

    have = partial.stat().st_size if partial.is_file() else 0
    if dry_run:
        print(f"{url}, into {dest}:")
        state = "on disk" if _is_model(dest) and not force else "to fetch"
        print(f"  {archive_name}  {human_bytes(size) if size else 'size unknown'}  {state}")
        if have:
            print(f"  {human_bytes(have)} of it already downloaded in {partial}")
        print(f"  md5 check: {md5 if md5 else 'none published'}")
        at, free = _free_space(home)
        print(f"Would fetch {human_bytes((size or 0) - have)}; {human_bytes(free)} free at {at}.")
        return None

    with _exclusive(home / ".locks" / f"{name}.lock", name, console):
        if _is_model(dest) and not force:
            return dest
        previous = _read_json(meta_path)
        if previous != {"url": url, "size": size, "validator": validator} or force:
            partial.unlink(missing_ok=True)
            have = 0
        partial.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_text(meta_path, json.dumps({"url": url, "size": size, "validator": validator}))
        if size is not None:  # the archive, then as much again unpacked
            _check_disk(2 * size - have, home, "set MISTRAL_HOME to a folder on a larger disk")

        def discard() -> None:  # the archive cannot become usable by resuming: start from zero next time
            partial.unlink(missing_ok=True)
            meta_path.unlink(missing_ok=True)

        with Transfer(console, (size or 0) - have) as transfer:
            advance = transfer.start_file(archive_name, size, have)
            try:
                with _transfer_errors(partial, urlsplit(url).hostname or url):
                    digest = fetch(url, partial, size=size, headers=headers, algo="md5" if md5 else None,
                                   advance=advance, validator=validator)  # fmt: skip
            except MistralError:
                if not partial.is_file() or partial.stat().st_size == 0:  # nothing to resume: leave nothing behind
                    discard()
                raise
        if not partial.is_file() or partial.stat().st_size == 0:
            discard()
            raise MistralError(f"{url} sent an empty file, not a tar archive; check --url.")
        if md5 and digest != md5:
            discard()
            raise MistralError(
                f"{archive_name} failed its md5 check (published {md5}, received {digest}) and was removed; run the "
                "same command to fetch it again."
            )
        transfer.summary()
        try:
            _install(partial, dest, url=url, md5=md5, console=console)
        except UnsafeArchive as exc:
            discard()  # it would be refused again: no point keeping it
            raise MistralError(
                f"Refused {archive_name}: {exc}; nothing was installed and the archive was removed."
            ) from None
        discard()
    return dest


def checked_url(url: str) -> tuple[str, dict[str, str]]:
    """An archive's address as it may be fetched: http(s) with a host, else one sentence (nothing is read from a
    file:// or any other scheme). Credentials in it (`https://user:secret@host/...`) become HTTP basic auth, sent to
    that host only, and the address without them is what is requested, printed and recorded."""
    url = url.strip()
    shown = re.sub(r"^([^:/?#]*:)?//[^/?#]*@", r"\1//***@", url)  # never print credentials (a user name can be a token)
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 (raises ValueError for a port that is not a number)
    except ValueError:  # "Invalid IPv6 URL", a port out of range
        parts, host = None, None
    # http.client refuses spaces and control characters only once connected: refuse them here too
    if parts is None or parts.scheme.lower() not in ("http", "https") or not host or re.search(r"[\x00-\x20\x7f]", url):
        raise MistralError(
            f"--url {shown!r} is not an http(s) URL with a host name; give one such as https://host/model.tar."
        )
    userinfo, _, netloc = parts.netloc.rpartition("@")
    headers = dict(TAR_HEADERS)
    if userinfo:
        user, _, password = userinfo.partition(":")
        pair = f"{unquote(user)}:{unquote(password)}".encode()
        headers["Authorization"] = "Basic " + base64.b64encode(pair).decode()
        url = urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
    return url, headers


def _head(url: str, headers: dict[str, str]) -> tuple[int | None, str | None]:
    """Size and validator (ETag or date) of the archive, to check the disk and to resume only the same file."""
    try:
        with _opener.open(_request(url, headers, "HEAD"), timeout=TIMEOUT) as resp:
            length = resp.headers.get("Content-Length")
            etag = resp.headers.get("ETag")
            # If-Range needs a strong validator; a weak ETag would make every resume start over
            validator = etag if etag and not etag.startswith("W/") else resp.headers.get("Last-Modified")
            return (int(length) if length else None), validator
    except urllib.error.HTTPError as exc:
        if exc.code in (405, 501):  # no HEAD here: learn the size from the download itself
            return None, None
        if exc.code == 404:
            raise MistralError(f"{url} does not exist (HTTP 404); check --url.") from None
        raise MistralError(f"{urlsplit(url).hostname} answered HTTP {exc.code} for {url}; try again later.") from None
    except (OSError, http.client.HTTPException) as exc:
        raise MistralError(
            f"Cannot reach {urlsplit(url).hostname} ({_reason(exc)}); check your network connection and run again."
        ) from None


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _is_model(folder: Path) -> bool:
    try:
        model_files(folder)
    except MistralError:
        return False
    return (folder / "tokenizer.model").is_file()


def _install(archive: Path, dest: Path, *, url: str, md5: str | None, console: Console) -> None:
    """Unpack into a scratch folder next to dest, find params.json, add the tokenizer if needed, move into place."""
    scratch = dest.with_name(f".unpack-{dest.name}-{os.getpid()}")
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        extract_safely(archive, scratch, console)
        root = _model_root(scratch)
        tokenizer_note = None
        if not (root / "tokenizer.model").is_file():
            tokenizer_note = supply_v1_tokenizer(root / "tokenizer.model", console)
        model_files(root)
        record = {"url": url, "md5": md5, "tokenizer": tokenizer_note or "from the archive"}
        atomic.write_text(root / SOURCE_FILE, json.dumps(record, indent=2) + "\n")
        old = dest.with_name(f".old-{dest.name}-{os.getpid()}")
        if dest.exists():
            dest.rename(old)
        root.rename(dest)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


class UnsafeArchive(Exception):
    """An archive refused as it is (a member that is a link or leaves the folder, a broken tar): refetching it as it
    is cannot help, so it is removed."""


def check_member(member: tarfile.TarInfo) -> PurePosixPath | None:
    """The member's path inside the target folder; UnsafeArchive for links, devices and paths that leave it."""
    path = PurePosixPath(member.name)
    if path.is_absolute() or ".." in path.parts or any(c in member.name for c in "\\:"):
        raise UnsafeArchive(f"member {member.name!r} would land outside the target folder")
    if member.issym() or member.islnk():
        raise UnsafeArchive(f"member {member.name!r} is a link")
    if not (member.isreg() or member.isdir()):
        raise UnsafeArchive(f"member {member.name!r} is a device or special file")
    return path if path.parts else None


def check_tree(members: list[tuple[tarfile.TarInfo, PurePosixPath | None]]) -> None:
    """UnsafeArchive when a member lies under a file, or a folder and a file share a path: what no folder can hold."""
    files: set[PurePosixPath] = set()
    folders: set[PurePosixPath] = set()
    for member, path in members:
        if path is None:
            continue
        above = next((p for p in path.parents if p in files), None)
        if above is not None:
            raise UnsafeArchive(f"member {member.name!r} lies under {str(above)!r}, which is a file")
        if (path in folders and not member.isdir()) or (path in files and member.isdir()):
            raise UnsafeArchive(f"member {member.name!r} is both a file and a folder")
        (folders if member.isdir() else files).add(path)
        folders.update(path.parents)


def extract_safely(archive: Path, target: Path, console: Console) -> None:
    """Regular files and folders only, written by us (no tarfile.extract*): mode 0644/0755, no owners, no links."""
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = [(m, check_member(m)) for m in tar.getmembers()]
            check_tree(members)
            total = sum(m.size for m, _ in members if m.isreg())
            target.mkdir(parents=True)
            with Transfer(console, total) as transfer:
                advance = transfer.start_file(archive.name, total, 0, verb="Unpacking")
                for member, rel in members:
                    if rel is None:
                        continue
                    out = target.joinpath(*rel.parts)
                    if member.isdir():
                        out.mkdir(parents=True, exist_ok=True)
                        continue
                    out.parent.mkdir(parents=True, exist_ok=True)
                    src = tar.extractfile(member)
                    assert src is not None
                    with src, _LocalFile(out, append=False) as dst:
                        while block := src.read(CHUNK):
                            dst.write(block)
                            advance(len(block))
                    os.chmod(out, 0o644)
    except (tarfile.TarError, EOFError) as exc:
        # resuming cannot mend it: refused like an unsafe one (first line only: tarfile lists every method it tried)
        raise UnsafeArchive(f"it is not a readable tar archive ({str(exc).splitlines()[0].rstrip(':')})") from None


def _model_root(scratch: Path) -> Path:
    """The archive's folder holding params.json: the top level or one folder down, depending on the archive."""
    found = sorted(scratch.glob("params.json")) or sorted(scratch.glob("*/params.json"))
    if len(found) != 1:
        problem = "no params.json" if not found else "several params.json"
        raise MistralError(f"The archive has {problem} at its top level or one folder down; it is not a model archive.")
    return found[0].parent


def supply_v1_tokenizer(dest: Path, console: Console) -> str:
    """The v1 tokenizer.model for an archive without one (same for every 7B v0.1/v0.2), checked by sha256.

    From, in order: a copy already in the Hugging Face cache, the `mistral-common` package (it ships the same file as
    data/tokenizer.model.v1), else tokenizer.model of mistral-community/Mistral-7B-v0.2 on the Hub (not gated).
    """
    candidates: list[tuple[str, Callable[[], Path | None]]] = [
        ("the Hugging Face cache", _cached_v1_tokenizer),
        ("the mistral-common package", _mistral_common_tokenizer),
        (f"{V1_TOKENIZER_REPO} on the Hub", _hub_v1_tokenizer),
    ]
    for where, find in candidates:
        path = find()
        if path is not None and _sha256(path) == V1_TOKENIZER_SHA256:
            shutil.copyfile(path, dest)
            console.print(f"The archive has no tokenizer.model; using the v1 tokenizer from {where}.")
            return f"v1 tokenizer from {where}"
    raise MistralError(
        f"The archive has no tokenizer.model and the v1 tokenizer could not be found or fetched; put it in {dest}."
    )


def _cached_v1_tokenizer() -> Path | None:
    for alias in ALIASES.values():
        for _, folder in cached_snapshots(alias.repo_id):
            if (folder / "tokenizer.model").is_file():
                return folder / "tokenizer.model"
    return None


def _mistral_common_tokenizer() -> Path | None:
    from importlib.util import find_spec

    spec = find_spec("mistral_common")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "tokenizer.model.v1"
    return path if path.is_file() else None


def _hub_v1_tokenizer() -> Path | None:
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(V1_TOKENIZER_REPO, "tokenizer.model", cache_dir=hf_hub_cache()))
    except Exception:  # any failure here means "not available"; the caller says what to do
        return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()
