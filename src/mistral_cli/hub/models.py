"""Which model a name means and where its files are: aliases, the Hugging Face cache, our tar folder, local folders.

Shared by every command. Nothing here touches the network or imports torch: a name resolves from disk alone, and
weight files are described from their safetensors headers (model/safetensors.py), so `mistral info` stays instant.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from mistral_cli.errors import MistralError
from mistral_cli.model.files import model_files, weight_paths
from mistral_cli.model.safetensors import CorruptFile, Entry, read_header

CDN = "https://models.mistralcdn.com/mistral-7b-v0-2"
V1_TOKENIZER_SHA256 = "dadfd56d766715c61d2ef780a525ab43b8e6da4de6865bda3d95fdef5e134055"
V1_TOKENIZER_SIZE = 493_443
SOURCE_FILE = ".mistral-source.json"  # written by `mistral download --source tar` into the model folder


@dataclass(frozen=True)
class Alias:
    name: str
    repo_id: str
    tar_name: str
    tar_md5: str | None  # published by the vendor, where it is

    @property
    def tar_url(self) -> str:
        return f"{CDN}/{self.tar_name}"


ALIASES = {
    a.name: a
    for a in (
        Alias(
            "mistral-7b-instruct-v0.2",
            "mistralai/Mistral-7B-Instruct-v0.2",
            "Mistral-7B-v0.2-Instruct.tar",
            "fbae55bc038f12f010b4251326e73d39",
        ),
        Alias("mistral-7b-v0.2", "mistral-community/Mistral-7B-v0.2", "mistral-7B-v0.2.tar", None),
    )
}
DEFAULT_MODEL = "mistral-7b-instruct-v0.2"
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_SAFE_NAME = re.compile(r"[A-Za-z0-9][\w.-]*")  # a folder name in models_home(): no separators, no ".."


@dataclass(frozen=True)
class ModelPaths:
    folder: Path  # holds the config, the weights and tokenizer.model
    name: str  # as the user gave it
    repo_id: str | None
    revision: str | None  # commit sha, when the model is in the Hugging Face cache
    source: str  # "hub-cache" | "local" | "tar"
    format: str  # "hf" (config.json) | "native" (params.json)
    config: Path
    weights: tuple[Path, ...]
    tokenizer: Path


class ModelNotFound(MistralError):
    """The model is not on disk; `command` is what downloads it (chat may offer to run it)."""

    def __init__(self, message: str, command: list[str]) -> None:
        super().__init__(message)
        self.command = command


# ---------------------------------------------------------------------------------------------------- where things are


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache, with huggingface_hub's own precedence, read at call time."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return _folder(Path(os.path.expandvars(os.environ[var])).expanduser(), var)
    if os.environ.get("HF_HOME"):
        return _folder(Path(os.path.expandvars(os.environ["HF_HOME"])).expanduser() / "hub", "HF_HOME")
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return _folder(Path(cache) / "huggingface" / "hub", "XDG_CACHE_HOME")


def models_home() -> Path:
    """Where tar downloads are unpacked: $MISTRAL_HOME, else the user's data folder."""
    if os.environ.get("MISTRAL_HOME"):
        return _folder(Path(os.environ["MISTRAL_HOME"]).expanduser(), "MISTRAL_HOME")
    from platformdirs import user_data_path

    return _folder(user_data_path("mistral-cli") / "models", "XDG_DATA_HOME")


def _folder(path: Path, variable: str) -> Path:
    """`path`, refused when it (or a folder above it) exists as something other than a folder."""
    for step in (path, *path.parents):
        if step.exists() or step.is_symlink():
            if not step.is_dir():
                where = "" if step == path else f", so models cannot be kept in {path}"
                raise MistralError(f"{step} is a file, not a folder{where}; move it or set {variable} to a folder.")
            break
    return path


def repo_cache_folder(repo_id: str) -> Path:
    return hf_hub_cache() / ("models--" + repo_id.replace("/", "--"))


def tar_folder_name(name: str) -> str:
    return name.replace("/", "--")


def download_command(name: str, *, tar: bool = False) -> list[str]:
    command = ["mistral", "download", name]
    return [*command, "--source", "tar"] if tar else command


# ------------------------------------------------------------------------------------------------------- resolution


def resolve_model(name: str) -> ModelPaths:
    """Find a model on disk: a folder path, then an alias or repo id in the HF cache, then in our tar folder."""
    path = Path(name).expanduser()
    if path.is_dir():
        return _paths(path.resolve(), name, None, None, "local")
    alias = ALIASES.get(name.lower())
    repo_id = alias.repo_id if alias else name if REPO_ID.fullmatch(name) else None
    snapshots = cached_snapshots(repo_id) if repo_id else []
    for sha, folder in snapshots:
        try:
            return _paths(folder, name, repo_id, sha, "hub-cache")
        except MistralError:
            continue  # an older or partial snapshot; a complete one may follow
    folder_name = tar_folder_name(alias.name if alias else name)
    if _SAFE_NAME.fullmatch(folder_name) and (models_home() / folder_name).is_dir():
        return _paths(models_home() / folder_name, name, repo_id, None, "tar")

    if repo_id is None:
        if os.sep in name or name.startswith((".", "~")):
            raise MistralError(f"There is no folder {name}.")
        names = ", ".join(ALIASES)
        raise MistralError(
            f"Unknown model {name!r}: give an alias ({names}), a Hugging Face repo id or a folder "
            "(`mistral info` lists the models on disk)."
        )
    command = download_command(alias.name if alias else repo_id)
    if snapshots:
        raise ModelNotFound(
            f"{repo_id} is only partly in the Hugging Face cache ({snapshots[0][1]}); run `{' '.join(command)}` "
            "to finish the download.",
            command,
        )
    raise ModelNotFound(f"{name} is not on disk; run `{' '.join(command)}` to download it.", command)


def cached_snapshots(repo_id: str) -> list[tuple[str, Path]]:
    """Snapshots of a repo in the HF cache, the one `main` points to first, then the newest."""
    storage = repo_cache_folder(repo_id)
    snapshots_dir = storage / "snapshots"
    if not snapshots_dir.is_dir():
        return []
    found = sorted((p for p in snapshots_dir.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True)
    main = storage / "refs" / "main"
    if main.is_file():
        head = main.read_text().strip()
        found.sort(key=lambda p: p.name != head)
    return [(p.name, p) for p in found]


def _paths(folder: Path, name: str, repo_id: str | None, revision: str | None, source: str) -> ModelPaths:
    fmt, config, weights = model_files(folder)
    tokenizer = folder / "tokenizer.model"
    if not tokenizer.is_file():
        raise MistralError(f"{folder} has no tokenizer.model; the v1 tokenizer of Mistral 7B belongs there.")
    return ModelPaths(folder, name, repo_id, revision, source, fmt, config, weights, tokenizer)


# ----------------------------------------------------------------------------------------------------- local models


@dataclass(frozen=True)
class LocalModel:
    name: str  # alias when the repo or folder is one, else the repo id or folder name
    repo_id: str | None
    source: str  # "hub-cache" | "tar"
    folder: Path
    revision: str | None
    bytes: int  # of the weight files
    complete: bool


def list_local_models() -> list[LocalModel]:
    """Mistral models in the HF cache and in our tar folder (the snapshot `main` points to, else the newest)."""
    by_repo = {a.repo_id: a.name for a in ALIASES.values()}
    found: list[LocalModel] = []
    cache = hf_hub_cache()
    if cache.is_dir():
        for storage in sorted(cache.glob("models--*")):
            repo_id = storage.name[len("models--") :].replace("--", "/")
            snapshots = cached_snapshots(repo_id)
            if not snapshots or not _is_mistral(snapshots[0][1]):
                continue
            sha, folder = next(((s, f) for s, f in snapshots if _complete(f)), snapshots[0])
            found.append(
                LocalModel(
                    by_repo.get(repo_id, repo_id),
                    repo_id,
                    "hub-cache",
                    folder,
                    sha,
                    _weight_bytes(folder),
                    _complete(folder),
                )
            )
    home = models_home()
    if home.is_dir():
        for folder in sorted(p for p in home.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if _is_mistral(folder):
                alias = ALIASES.get(folder.name)
                found.append(
                    LocalModel(
                        folder.name,
                        alias.repo_id if alias else None,
                        "tar",
                        folder,
                        None,
                        _weight_bytes(folder),
                        _complete(folder),
                    )
                )
    return found


def model_names(*, folders: bool = True) -> list[str]:
    """What Tab offers for MODEL: the aliases, the repo ids in the Hugging Face cache and (with `folders`) our tar
    folders. A folder that cannot be read only leaves its names out: completion never fails."""
    names = dict.fromkeys(ALIASES)
    try:
        for m in list_local_models():
            if m.repo_id and m.source == "hub-cache":
                names[m.repo_id] = None
            if folders or m.name in ALIASES:
                names[m.name] = None
    except (OSError, MistralError):
        pass
    return sorted(names)


def _is_mistral(folder: Path) -> bool:
    if (folder / "params.json").is_file():
        return True
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and (
        config.get("model_type") == "mistral" or "MistralForCausalLM" in (config.get("architectures") or [])
    )


def _complete(folder: Path) -> bool:
    try:
        _paths(folder, folder.name, None, None, "local")
    except MistralError:
        return False
    return True


def _weight_bytes(folder: Path) -> int:
    try:
        return sum(p.stat().st_size for p in weight_paths(folder))
    except (MistralError, OSError):
        return 0


# ------------------------------------------------------------------------------------------------ weight file headers


@dataclass(frozen=True)
class WeightFile:
    path: Path
    bytes: int  # on disk
    tensors: dict[str, Entry] | None = field(default=None)  # None for .pth: its header is a pickle

    @property
    def n_params(self) -> int | None:
        return None if self.tensors is None else sum(t.numel for t in self.tensors.values())

    @property
    def dtypes(self) -> dict[str, int]:
        """Parameters per dtype."""
        out: dict[str, int] = {}
        for t in (self.tensors or {}).values():
            out[t.dtype] = out.get(t.dtype, 0) + t.numel
        return out


def read_safetensors_header(path: Path) -> dict[str, Entry]:
    """Tensor names, dtypes, shapes and byte offsets of a safetensors file, in the order of its header, checked as
    the loader checks them (model/safetensors.py)."""
    with open(path, "rb", buffering=0) as f:
        try:
            entries = read_header(f, path)
        except CorruptFile as exc:
            if exc.no_header:
                raise MistralError(f"{path} is not a safetensors file or is truncated; download it again.") from None
            raise
    return {e.name: e for e in entries}


def describe_weights(paths: tuple[Path, ...] | list[Path]) -> list[WeightFile]:
    return [
        WeightFile(p, p.stat().st_size, read_safetensors_header(p) if p.suffix == ".safetensors" else None)
        for p in paths
    ]


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError
