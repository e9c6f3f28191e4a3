"""`mistral rm MODEL`: remove a downloaded model, and only what the tool downloaded.

What goes: the model's entry in the Hugging Face cache, removed as `hf cache delete` removes it (huggingface_hub's
own `delete_revisions`: the snapshots, the blobs no remaining revision uses, their refs, and the repo's folder when no
revision is left); a folder that `mistral download --source tar` unpacked under $MISTRAL_HOME (it holds the
download's record, `.mistral-source.json`) and the archive of an unfinished tar download; and the prepared weights
made from any of them. Any other folder is refused: the tool never deletes files it did not create. It lists what it
would remove and the space freed, and asks on a terminal; without one, `--yes` says to go ahead. No torch here.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mistral_cli.errors import MistralError, UsageError
from mistral_cli.hub.models import (
    ALIASES,
    REPO_ID,
    SOURCE_FILE,
    hf_hub_cache,
    human_bytes,
    models_home,
    repo_cache_folder,
    tar_folder_name,
)
from mistral_cli.model.prepared_files import list_prepared


@dataclass
class Plan:
    shown: list[tuple[int, Path, str]] = field(default_factory=list)  # bytes freed, path, what it is
    hub: Any = None  # huggingface_hub's DeleteCacheStrategy
    sources: list[Path] = field(default_factory=list)  # model folders whose prepared weights go too
    paths: list[Path] = field(default_factory=list)  # removed outright: our folders and files
    both: bool = False  # an alias in the Hugging Face cache and in a tar folder

    @property
    def total(self) -> int:
        return sum(n for n, _, _ in self.shown)


def run_rm(name: str, *, yes: bool, revision: str | None = None) -> None:
    plan = _plan(name, revision)
    if not plan.shown:
        raise MistralError(f"{name} is not on disk; `mistral info` lists the models that are.")
    lines = [f"  {human_bytes(n):>9}  {path}{f'  ({what})' if what else ''}" for n, path, what in plan.shown]
    both = "\nIt is both in the Hugging Face cache and in a folder of a tar download: both go." if plan.both else ""
    sys.stderr.write(f"mistral rm {name} removes:\n" + "\n".join(lines) + f"{both}\nFrees {human_bytes(plan.total)}.\n")
    if not yes:
        if not sys.stdin.isatty():
            raise UsageError("Nothing was removed: pass --yes to remove without a terminal to ask on.")
        sys.stderr.write("Remove them? [y/N] ")
        sys.stderr.flush()
        if sys.stdin.readline().strip().lower() not in ("y", "yes"):
            sys.stderr.write("Nothing was removed.\n")
            return
    _execute(plan)
    sys.stderr.write(f"Removed {name}: {human_bytes(plan.total)} freed.\n")


def _plan(name: str, revision: str | None) -> Plan:
    plan = Plan()
    path = Path(name).expanduser()
    alias = ALIASES.get(name.lower())
    repo_id = alias.repo_id if alias else name if REPO_ID.fullmatch(name) else None
    if revision is not None and (repo_id is None or (alias is None and path.is_dir())):
        raise UsageError("--revision goes with an alias or a Hugging Face repo id.")
    if alias is None and (path.is_dir() or path.is_symlink()):  # a folder first, as everywhere MODEL is read
        snapshot = _snapshot_of(path)  # what `mistral download` printed for a Hub model
        if snapshot is not None:
            _plan_hub(plan, *snapshot)
        else:
            _plan_tar(plan, _ours(path))
        return _with_prepared(plan)
    if repo_id is not None:
        _plan_hub(plan, repo_id, revision)
    if revision is None:
        folder = models_home() / (alias.name if alias else tar_folder_name(name))
        if folder.is_dir() and _made_by_download(folder):
            plan.both = bool(plan.shown)
            _plan_tar(plan, folder)
        elif folder.is_dir() and not plan.shown:
            _ours(folder)  # refused: say why rather than "not on disk"
        partial = folder.parent / ".partial" / f"{folder.name}.tar.part"  # an unfinished tar download
        for p in (partial, partial.with_name(partial.name + ".json")):
            if p.is_file():
                plan.paths.append(p)
                plan.shown.append((_size(p), p, "unfinished tar download" if p == partial else ""))
    return _with_prepared(plan)


def _with_prepared(plan: Plan) -> Plan:
    for source in plan.sources:
        for p in list_prepared(str(source.resolve())):
            plan.paths.append(p.path)
            plan.shown.append((p.size, p.path, "prepared weights"))
    return plan


def _plan_tar(plan: Plan, folder: Path) -> None:
    plan.paths.append(folder)
    plan.sources.append(folder)
    plan.shown.append((_size(folder), folder, "tar download"))


def _made_by_download(folder: Path) -> bool:
    """A folder `mistral download --source tar` unpacked: right in $MISTRAL_HOME (no link out), with its record."""
    home, resolved = models_home().resolve(), folder.resolve()
    return resolved.parent == home and (resolved / SOURCE_FILE).is_file()


def _ours(path: Path) -> Path:
    if not _made_by_download(path):
        raise UsageError(
            f"{path} was not made by `mistral download` (only the folders it unpacked into {models_home()} and its "
            "Hugging Face cache entries are removed by `mistral rm`); delete it yourself if you mean to."
        )
    return path.resolve()


def _snapshot_of(path: Path) -> tuple[str, str] | None:
    """(repo id, commit) when `path` is a snapshot folder of a model in the Hugging Face cache."""
    resolved = path.resolve()
    storage = resolved.parent.parent
    if resolved.parent.name != "snapshots" or not storage.name.startswith("models--"):
        return None
    if storage.parent != hf_hub_cache().resolve():
        return None
    return storage.name.removeprefix("models--").replace("--", "/"), resolved.name


def _plan_hub(plan: Plan, repo_id: str, revision: str | None) -> None:
    storage = repo_cache_folder(repo_id)
    if not storage.is_dir():
        if revision is not None:
            raise MistralError(f"{repo_id} is not in the Hugging Face cache; `mistral info` lists the models that are.")
        return
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.utils import CacheNotFound

    try:
        info = scan_cache_dir(hf_hub_cache())
    except CacheNotFound:
        return
    except OSError as e:
        raise MistralError(f"Cannot read the Hugging Face cache {hf_hub_cache()}: {e.strerror or e}.") from None
    repo = next((r for r in info.repos if r.repo_type == "model" and r.repo_id == repo_id), None)
    every = sorted(repo.revisions, key=lambda r: r.commit_hash) if repo else []
    chosen = [r for r in every if revision is None or revision == r.commit_hash or revision in r.refs]
    if revision is not None and not chosen:
        raise MistralError(
            f"{repo_id} has no revision {revision!r} in the Hugging Face cache; without --revision, every revision "
            "goes."
        )
    if not chosen:  # a download cut before its first snapshot (only blobs, some .incomplete), or a damaged entry
        plan.paths.append(storage)
        plan.shown.append((_size(storage), storage, "Hugging Face cache, no complete revision"))
        return
    # huggingface_hub picks revisions by commit hash in any repo; the same hash can be in two (a copy of a repo)
    plan.hub = replace(info, repos=frozenset({repo})).delete_revisions(*(r.commit_hash for r in chosen))
    plan.sources += [r.snapshot_path for r in chosen]
    if len(chosen) == len(every):
        n = len(chosen)
        plan.shown.append((plan.hub.expected_freed_size, storage, f"Hugging Face cache, {n} revision{'s' * (n != 1)}"))
    else:
        (rev,) = chosen
        refs = ", ".join(sorted(rev.refs)) or rev.commit_hash[:12]
        what = f"Hugging Face cache, revision {refs}; the blobs other revisions use stay"
        plan.shown.append((plan.hub.expected_freed_size, rev.snapshot_path, what))


def _execute(plan: Plan) -> None:
    try:
        if plan.hub is not None:
            with _quiet("huggingface_hub"):  # it logs a permission error and goes on: checked below instead
                plan.hub.execute()
            left = sorted(p for p in (*plan.hub.repos, *plan.hub.snapshots, *plan.hub.refs, *plan.hub.blobs)
                          if os.path.lexists(p))  # fmt: skip
            if left:
                raise MistralError(
                    f"Could not remove {left[0]} (check its permissions); what was listed may be partly removed."
                )
        for p in plan.paths:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)
    except OSError as e:
        where = f" {e.filename}" if e.filename else ""
        raise MistralError(
            f"Could not remove{where}: {e.strerror or e}; what was listed may be partly removed."
        ) from None


@contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _size(path: Path) -> int:
    """Bytes on disk of a file, or of a folder's files (links not followed)."""
    total = 0
    for p in path.rglob("*") if path.is_dir() else (path,):
        with suppress(OSError):
            st = p.lstat()
            total += 0 if stat.S_ISDIR(st.st_mode) else st.st_blocks * 512
    return total
