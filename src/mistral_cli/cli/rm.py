"""`mistral rm MODEL`: remove a downloaded model, and only what the tool downloaded.

What goes: the model's entry in the Hugging Face cache, removed as `hf cache delete` removes it (huggingface_hub's
own `delete_revisions`: the snapshots, the blobs no other revision uses, the refs, and the repo's folder when no
revision is left); a folder that `mistral download --source tar` unpacked under $MISTRAL_HOME (it holds the
download's record, `.mistral-source.json`); and the prepared weights made from either. Any other folder is refused:
the tool never deletes files it did not create. It lists what it would remove and the space freed, and asks on a
terminal; without one, `--yes` says to go ahead.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass, field
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
from mistral_cli.model.prepared_files import PreparedFile, list_prepared


@dataclass
class Plan:
    hub: Any = None  # huggingface_hub's DeleteCacheStrategy for the repo's revisions
    hub_repo: str | None = None
    hub_bytes: int = 0
    snapshots: list[Path] = field(default_factory=list)
    folders: list[tuple[Path, int]] = field(default_factory=list)  # tar folders and their sizes
    prepared: list[PreparedFile] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.hub_bytes + sum(n for _, n in self.folders) + sum(p.size for p in self.prepared)

    def empty(self) -> bool:
        return self.hub is None and not self.folders and not self.prepared


def run_rm(name: str, *, yes: bool) -> None:
    plan = _plan(name)
    if plan.empty():
        raise MistralError(f"{name} is not on disk; `mistral info` lists the models that are.")
    lines = []
    if plan.hub is not None:
        lines.append(f"  {human_bytes(plan.hub_bytes):>9}  {repo_cache_folder(plan.hub_repo or '')}  "
                     f"(Hugging Face cache: {len(plan.snapshots)} revision{'s' * (len(plan.snapshots) != 1)})")  # fmt: skip
    lines += [f"  {human_bytes(size):>9}  {folder}" for folder, size in plan.folders]
    lines += [f"  {human_bytes(p.size):>9}  {p.path}  (prepared weights)" for p in plan.prepared]
    sys.stderr.write(f"mistral rm {name} removes:\n" + "\n".join(lines) + f"\nfreeing {human_bytes(plan.total)}.\n")
    if not yes:
        if not sys.stdin.isatty():
            raise UsageError("Nothing was removed: pass --yes to remove without a terminal to ask on.")
        try:
            answer = input("Remove them? [y/N] ").strip().lower()
        except EOFError:
            answer = ""
        if answer not in ("y", "yes"):
            sys.stderr.write("Nothing was removed.\n")
            return
    _execute(plan)
    sys.stderr.write(f"Removed {name} ({human_bytes(plan.total)} freed).\n")


def _plan(name: str) -> Plan:
    plan = Plan()
    path = Path(name).expanduser()
    alias = ALIASES.get(name.lower())
    if path.is_dir() and alias is None and not REPO_ID.fullmatch(name):
        plan.folders.append((_ours(path), _size(path)))
    else:
        repo_id = alias.repo_id if alias else name if REPO_ID.fullmatch(name) else None
        if repo_id is not None:
            _plan_hub(plan, repo_id)
        folder = models_home() / (alias.name if alias else tar_folder_name(name))
        if folder.is_dir() and (folder / SOURCE_FILE).is_file():
            plan.folders.append((folder, _size(folder)))
    sources = [*plan.snapshots, *(f for f, _ in plan.folders)]
    for source in sources:
        plan.prepared += list_prepared(str(source.resolve()))
    return plan


def _ours(path: Path) -> Path:
    """`path` if `mistral download` made it (a folder of $MISTRAL_HOME holding its record), else refused."""
    home, folder = models_home().resolve(), path.resolve()
    if folder.parent != home or not (folder / SOURCE_FILE).is_file():
        raise UsageError(
            f"{path} was not made by `mistral download` (only folders it unpacked into {home} are removed by "
            "`mistral rm`); delete it yourself if you mean to."
        )
    return folder


def _plan_hub(plan: Plan, repo_id: str) -> None:
    if not repo_cache_folder(repo_id).is_dir():
        return
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        info = scan_cache_dir(hf_hub_cache())
    except CacheNotFound:
        return
    except OSError as e:
        raise MistralError(f"Cannot read the Hugging Face cache {hf_hub_cache()}: {e.strerror or e}.") from None
    for repo in info.repos:
        if repo.repo_type == "model" and repo.repo_id == repo_id:
            revisions = sorted(repo.revisions, key=lambda r: r.commit_hash)
            plan.hub = info.delete_revisions(*(r.commit_hash for r in revisions))
            plan.hub_repo, plan.hub_bytes = repo_id, plan.hub.expected_freed_size
            plan.snapshots = [r.snapshot_path for r in revisions]


def _execute(plan: Plan) -> None:
    try:
        for p in plan.prepared:
            p.path.unlink(missing_ok=True)
        if plan.hub is not None:
            plan.hub.execute()
            leftover = repo_cache_folder(plan.hub_repo or "")
            if leftover.is_dir() and not any(leftover.rglob("*")):
                shutil.rmtree(leftover)
        for folder, _ in plan.folders:
            shutil.rmtree(folder)
    except OSError as e:
        where = f" {e.filename}" if e.filename else ""
        raise MistralError(
            f"Could not remove{where}: {e.strerror or e}; what was listed may be partly removed."
        ) from None


def _size(folder: Path) -> int:
    total = 0
    for p in folder.rglob("*"):
        try:
            if p.is_file() and not p.is_symlink():
                total += p.stat().st_blocks * 512
        except OSError:
            pass
    return total
