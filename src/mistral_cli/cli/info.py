"""`mistral info`: what a model is, where its files are and what running it would take, from headers alone.

Never loads weights and never imports torch (nor huggingface_hub): configs and safetensors headers are read by hand,
and the device that would be used is guessed from the machine (driver files, the torch build on disk), so the
answer comes in a few tens of milliseconds. With --server: the models that server lists (GET /v1/models).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import sys
from contextlib import suppress
from dataclasses import asdict
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mistral_cli.errors import MistralError, UsageError
from mistral_cli.hardware import KERNELS_ENV, c_compiler, cpu_flags, dtype_name, kernels_blocker
from mistral_cli.hub.models import (
    SOURCE_FILE,
    V1_TOKENIZER_SHA256,
    ModelPaths,
    describe_weights,
    download_command,
    human_bytes,
    list_local_models,
    resolve_model,
)
from mistral_cli.model.config import ModelConfig
from mistral_cli.model.layout import layer_mode, linear_bytes
from mistral_cli.model.prepared_files import list_prepared, resident_bytes

if TYPE_CHECKING:
    from mistral_cli.cli.settings import Settings
    from mistral_cli.options import LoadOptions
    from mistral_cli.remote.client import RemoteEngine

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


def run_info(
    *,
    model: str | None,
    json_out: bool,
    loading: LoadOptions,
    settings: Settings | None = None,
    prune: bool = False,
    remote: RemoteEngine | None = None,
) -> None:
    if remote is not None:
        if prune:
            raise UsageError("--prune removes prepared weights from this machine; leave it out with --server.")
        _print_served(remote, json_out)
        return
    if prune:
        _prune(model)
        return
    if model is None:
        _print_list(json_out)
        return
    data = gather(resolve_model(model), loading)
    if settings is not None:
        data["config_file"] = {"path": str(settings.config_path), "found": settings.config_found}
        data["settings"] = settings.to_json()
        if loading.device != "auto":
            data["device"]["reason"] = f"asked for: {settings.values['device'].source}"
    if json_out:
        print(json.dumps(data, indent=2, allow_nan=False))
    else:
        _print_table(data)
    if data["problems"]:
        n = len(data["problems"])
        raise MistralError(f"{model} cannot be loaded; see the {'problems' if n > 1 else 'problem'} above.")


def gather(paths: ModelPaths, loading: LoadOptions) -> dict[str, Any]:
    """Everything `mistral info MODEL` shows, as one JSON-ready object, for a run with these load options."""
    config = ModelConfig.from_folder(paths.folder)
    files = describe_weights(paths.weights)
    counted = [f.n_params for f in files]
    n_params = sum(n for n in counted if n is not None) if all(n is not None for n in counted) else None
    dtypes: dict[str, int] = {}
    for f in files:
        for name, n in f.dtypes.items():
            dtypes[name] = dtypes.get(name, 0) + n
    weight_bytes = sum(f.bytes for f in files)
    dev_name, dev_reason = detect_device(loading.device)
    compute = dtype_name(loading.dtype, dev_name, config.n_params)
    context = loading.max_context or config.max_context
    kernels = _kernels(dev_name)
    data: dict[str, Any] = {
        "name": paths.name,
        "repo_id": paths.repo_id,
        "source": paths.source,
        "folder": str(paths.folder),
        "revision": paths.revision,
        "format": paths.format,
        "architecture": config.to_dict(),
        "parameters": n_params if n_params is not None else config.n_params,
        "weights": {
            # None for a .pth: its dtypes sit in a pickle, not in a header we can read
            "dtype": max(dtypes, key=dtypes.__getitem__) if dtypes else None,
            "dtypes": dtypes,
            "bytes": weight_bytes,
            "files": [
                {
                    "name": f.path.name,
                    "path": str(f.path),
                    "stored_at": str(f.path.resolve()),
                    "bytes": f.bytes,
                    "parameters": f.n_params,
                    "dtypes": f.dtypes,
                }
                for f in files
            ],
        },
        "tokenizer": _tokenizer(paths.tokenizer, config),
        "memory": memory_needed(config, compute, loading.quantize, context, ours=bool(kernels and kernels["ours"])),
        "device": {"name": dev_name, "reason": dev_reason, "dtype": compute, "kernels": kernels},
    }
    problems = [
        config.size_problem(sum(f.bytes for f in files), paths.folder),
        data["tokenizer"].pop("problem"),
        config.context_problem(loading.max_context),
        device_problem(loading.device),
    ]
    data["problems"] = [p for p in problems if p]  # what loading would refuse, found from the headers alone
    data["prepared"] = [
        {
            "path": str(f.path),
            "bytes": f.size,
            "dtype": f.made_of.get("dtype"),
            "quantize": f.made_of.get("quantize"),
            "layout": f.made_of.get("layout"),
            "in_memory_bytes": resident_bytes(f.path),  # in the page cache: a load maps it without reading the disk
        }
        for f in list_prepared(str(paths.folder.resolve()))
    ]
    record = paths.folder / SOURCE_FILE
    if record.is_file():
        with suppress(ValueError):
            data["downloaded_from"] = json.loads(record.read_text(encoding="utf-8"))
    return data


def _prune(model: str | None) -> None:
    """Remove the prepared weights of one model (by its folder), or all of them."""
    from mistral_cli.model.prepared_files import folder

    source = None if model is None else str(resolve_model(model).folder.resolve())
    files = list_prepared(source)
    freed = 0
    for f in files:
        try:
            f.path.unlink()
        except FileNotFoundError:
            continue
        freed += f.size
    for tmp in folder().glob(".*.tmp") if model is None and folder().is_dir() else []:
        with suppress(OSError):  # left by a preparation that was killed
            freed += tmp.stat().st_blocks * 512
            tmp.unlink()
    whose = f"of {model} " if model else ""
    n = len(files)
    print(f"Removed {n} prepared weight file{'s' * (n != 1)} {whose}({human_bytes(freed)}) from {folder()}.")


def memory_needed(config: ModelConfig, dtype: str, quantize: str, context: int, ours: bool = False) -> dict[str, Any]:
    """Weights at the compute dtype (linear layers at the quantized width) plus the KV cache for the context.
    `ours`: quantized layers in our CPU kernels' layouts."""
    size = DTYPE_BYTES[dtype]
    qkv = (config.n_heads + 2 * config.n_kv_heads) * config.head_dim
    # the linear layers of a block as (output rows, input columns), in the layouts of model/layout.py
    shapes = [(qkv, config.dim), (config.dim, config.n_heads * config.head_dim)]
    shapes += [(2 * config.hidden_dim, config.dim), (config.dim, config.hidden_dim)]
    blocks = config.n_layers * sum(linear_bytes(N, K, quantize, size, ours) for N, K in shapes)
    head = linear_bytes(config.vocab_size, config.dim, layer_mode("output", quantize), size, ours)
    embed = config.vocab_size * config.dim
    norms = (2 * config.n_layers + 1) * config.dim
    weights = blocks + head + (embed + norms) * size
    kv = config.kv_bytes_per_token(size) * context
    return {
        "dtype": dtype,
        "quantize": quantize,
        "context": context,
        "weights_bytes": weights,
        "kv_cache_bytes": kv,
        "total_bytes": weights + kv,
    }


def _kernels(device: str) -> dict[str, Any] | None:
    """Whether decode steps on the CPU would run on our kernels (kernels.c) or torch's, and why."""
    if device != "cpu":
        return None
    blocker = kernels_blocker()
    if blocker is None:
        flags = cpu_flags()  # what -march=native enables, as kernels.label() names it once built
        extra = [name for flag, name in (("avx512_bf16", "AVX512-BF16"), ("avx512_vnni", "AVX512-VNNI"))
                 if {flag, "avx512f", "avx512bw"} <= flags]  # fmt: skip
        if os.environ.get(KERNELS_ENV, "").strip().lower() == "avx2":
            extra = []  # asked for the AVX2 build
        paths = " + ".join(["AVX2", *extra])
        return {
            "ours": True,
            "reason": f"{paths}, compiled for this CPU on first use with {' '.join(c_compiler() or [])}",
        }
    return {"ours": False, "reason": blocker}


def device_problem(requested: str) -> str | None:
    """Why a device asked for by name cannot be used here (guessed as `detect_device` does), or None."""
    if requested in ("auto", "cpu") or detect_device()[0] == requested:
        return None
    if requested == "cuda":
        return f"--device cuda was asked for, but PyTorch would see no CUDA GPU here ({detect_device()[1]})."
    return f"--device {requested} was asked for, but this machine has no Apple Metal GPU."


def detect_device(requested: str = "auto") -> tuple[str, str]:
    """The device `auto` would pick, guessed without importing torch: a CUDA build of torch plus a GPU driver, else
    Apple silicon, else the CPU."""
    if requested != "auto":
        return requested, "asked for with --device"
    torch_lib = _torch_lib()
    if torch_lib is None:
        return "cpu", "torch is not installed"
    cuda_build = any(torch_lib.glob("libtorch_cuda*")) or any(torch_lib.glob("libtorch_hip*"))
    driver = Path("/proc/driver/nvidia/version").exists() or Path("/dev/kfd").exists() or shutil.which("nvidia-smi")
    if cuda_build and driver:
        return "cuda", "a GPU driver and a CUDA build of torch are installed"
    if sys.platform == "darwin" and platform.machine() == "arm64":
        return "mps", "Apple silicon"
    if driver:
        return "cpu", "a GPU driver is installed but torch is a CPU-only build"
    return "cpu", "no GPU driver found"


def _torch_lib() -> Path | None:
    spec = find_spec("torch")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "lib"


def _tokenizer(path: Path, config: ModelConfig) -> dict[str, Any]:
    digest = hashlib.sha256(path.read_bytes()).hexdigest()  # half a megabyte: a millisecond
    if digest == V1_TOKENIZER_SHA256:
        kind, problem = "v1 SentencePiece, 32000 pieces", config.vocab_problem(32000, path)
    else:
        from mistral_cli.text.tokenizer import Tokenizer  # SentencePiece: a small library, and only for other files

        try:
            pieces = Tokenizer(path).vocab_size
            kind, problem = f"SentencePiece, {pieces} pieces (not the v1 file)", config.vocab_problem(pieces, path)
        except MistralError as e:
            kind, problem = "unreadable", str(e)
    return {"path": str(path), "bytes": path.stat().st_size, "sha256": digest, "kind": kind, "problem": problem}


# ---------------------------------------------------------------------------------------------------------- printing


def _print_table(d: dict[str, Any]) -> None:
    from rich.markup import escape
    from rich.table import Table

    a, w, m, dev = d["architecture"], d["weights"], d["memory"], d["device"]
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    where = d["repo_id"] or d["folder"]
    table.add_row("model", f"{d['name']} ({d['source']}: {where})")
    table.add_row("folder", d["folder"])
    if d["revision"]:
        table.add_row("revision", d["revision"])
    if "downloaded_from" in d:
        table.add_row("downloaded from", str(d["downloaded_from"].get("url")))
    table.add_row("format", "HF (config.json)" if d["format"] == "hf" else "native (params.json)")
    table.add_row(
        "architecture",
        f"{a['n_layers']} layers, width {a['dim']}, {a['n_heads']} heads, {a['n_kv_heads']} kv heads, "
        f"head size {a['head_dim']}, MLP {a['hidden_dim']}, vocab {a['vocab_size']}",
    )
    window = a["sliding_window"] or "none"
    table.add_row("attention", f"rope theta {a['rope_theta']:g}, sliding window {window}, context {a['max_context']}")
    table.add_row("parameters", f"{d['parameters'] / 1e9:.2f} B ({d['parameters']:,})")
    dtype = w["dtype"] or "unknown (.pth: not read)"
    table.add_row(
        "weights", f"{dtype}, {human_bytes(w['bytes'])} in {len(w['files'])} file" + "s" * (len(w["files"]) != 1)
    )
    for f in w["files"]:
        stored = f" -> {f['stored_at']}" if f["stored_at"] != f["path"] else ""
        table.add_row("", f"{f['name']}  {human_bytes(f['bytes'])}{stored}")
    t = d["tokenizer"]
    table.add_row("tokenizer", f"{t['kind']}, {t['path']}")
    table.add_row(
        "memory",
        f"about {human_bytes(m['total_bytes'])}: weights {human_bytes(m['weights_bytes'])} "
        f"({m['dtype']}, quantize {m['quantize']}) + KV cache {human_bytes(m['kv_cache_bytes'])} "
        f"({m['context']} tokens)",
    )
    table.add_row("device", f"{dev['name']} {dev['dtype']} ({dev['reason']})")
    for i, p in enumerate(d["prepared"]):
        dtype = {"BF16": "bf16", "F16": "fp16", "F32": "fp32"}.get(p["dtype"], p["dtype"])
        what = f"{dtype}, quantize {p['quantize']}, {p['layout']}"
        held = p["in_memory_bytes"]  # of the file's length; the padding between tensors is a hole on disk
        memory = f" ({min(1.0, held / p['bytes']):.0%} in memory)" if held is not None and p["bytes"] else ""
        table.add_row("prepared" if i == 0 else "", f"{what}: {human_bytes(p['bytes'])}{memory}, {p['path']}")
    if not d["prepared"]:
        table.add_row("prepared", "none yet (the first load writes them; `mistral info --prune` removes them)")
    if dev["kernels"]:
        k = dev["kernels"]
        table.add_row("kernels", f"ours ({k['reason']})" if k["ours"] else f"torch's ({k['reason']})")
    _settings_rows(table, d)
    for i, problem in enumerate(d.get("problems", [])):
        table.add_row("problem" if i == 0 else "", f"[red]{escape(problem)}[/]")
    _emit(table)


def _settings_rows(table: Any, d: dict[str, Any]) -> None:
    """Each effective setting and where it came from: the command line, MISTRAL_*, the config file or the default."""
    if "settings" not in d:
        return  # gather() alone, without the CLI's settings
    config = d["config_file"]
    table.add_row("config file", config["path"] + ("" if config["found"] else " (not present)"))
    for i, (name, s) in enumerate(d["settings"].items()):
        value = "unset" if s["value"] is None else json.dumps(s["value"])
        table.add_row("settings" if i == 0 else "", f"{name} = {value}  ({s['source']})")


def _emit(table: Any) -> None:
    """On a terminal, Rich's own layout; in a pipe, unwrapped lines without the padding Rich adds."""
    from rich.console import Console

    if sys.stdout.isatty():
        Console(highlight=False).print(table)
        return
    console = Console(highlight=False, width=1000, record=True, file=open(os.devnull, "w"))  # noqa: SIM115
    console.print(table)
    console.file.close()
    sys.stdout.write("".join(line.rstrip() + "\n" for line in console.export_text().splitlines()))


def _print_list(json_out: bool) -> None:
    models = list_local_models()
    if json_out:
        rows = [{**asdict(m), "folder": str(m.folder)} for m in models]
        print(json.dumps({"models": rows}, indent=2))
        return
    if not models:
        sys.stderr.write("No models on disk yet; `mistral download` fetches mistral-7b-instruct-v0.2.\n")
        return
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    for column in ("model", "size", "source", "folder"):
        table.add_column(column, overflow="fold")
    for m in models:
        command = " ".join(download_command(m.name, tar=m.source == "tar"))
        name = m.name if m.complete else f"{m.name} (incomplete: run `{command}`)"
        table.add_row(name, human_bytes(m.bytes), m.source, str(m.folder))
    _emit(table)


def _print_served(remote: RemoteEngine, json_out: bool) -> None:
    """The models a server lists (MODEL, when given, alone), with the context each has where the server says
    (vLLM's max_model_len)."""
    models = remote.models()
    if remote.model is not None:
        models = [m for m in models if m["id"] == remote.model]
        if not models:
            raise MistralError(f"The server at {remote.url} lists no model {remote.model!r}.")
    if json_out:
        print(json.dumps({"server": remote.url, "models": models}, indent=2, ensure_ascii=False))
        return
    if not models:
        sys.stderr.write(f"The server at {remote.url} lists no models.\n")
        return
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    for column in ("model", "context", "owned by"):
        table.add_column(column, overflow="fold")
    for m in models:
        context = m.get("max_model_len")
        table.add_row(m["id"], f"{context:,}" if isinstance(context, int) else "-", str(m.get("owned_by") or "-"))
    _emit(table)
