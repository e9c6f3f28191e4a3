"""Broken model folders: each gets one clear sentence naming the file, at the API and at the CLI (no traceback)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mistral_cli.engine.load import load_model
from mistral_cli.errors import MistralError
from mistral_cli.model.placement import Placement
from tiny import TinySpec, write_hf, write_native

FP32 = Placement(torch.device("cpu"), torch.float32)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _cli(*args: str, stdin: str | None = "hello") -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "mistral_cli", *args], input=stdin, capture_output=True, text=True, env=env, timeout=120
    )


def _assert_one_sentence(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], proc.stderr


def test_not_a_model_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(MistralError, match="neither params.json nor config.json"):
        load_model(tmp_path, FP32)
    _assert_one_sentence(_cli("complete", "-m", str(tmp_path), "hi"), str(tmp_path))


def test_missing_tokenizer(tmp_path, tiny_spec, tiny_sd):
    folder = write_hf(tmp_path / "m", tiny_spec, tiny_sd, tokenizer=False)
    _assert_one_sentence(_cli("complete", "-m", str(folder), "hi"), "tokenizer.model")


def test_truncated_safetensors(tmp_path, hf_model_dir):
    folder = _copy(hf_model_dir, tmp_path / "m")
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(MistralError, match="truncated or corrupt"):
        load_model(folder, FP32)
    _assert_one_sentence(_cli("complete", "-m", str(folder), "hi"), str(weights), "truncated or corrupt")


def test_corrupted_safetensors_header(tmp_path, hf_model_dir):
    folder = _copy(hf_model_dir, tmp_path / "m")
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:40] = b"#" * 32  # garbage inside the JSON header
    weights.write_bytes(bytes(data))
    with pytest.raises(MistralError, match=r"model\.safetensors is truncated or corrupt"):
        load_model(folder, FP32)


def test_shape_mismatch(tmp_path, tiny_sd):
    # weights of the default tiny model, config claiming a wider MLP
    folder = write_hf(tmp_path / "m", TinySpec(), tiny_sd)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["intermediate_size"] = 256
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MistralError, match=r"mlp\.\w+_proj\.weight has shape \[\d+, \d+\] but the config expects"):
        load_model(folder, FP32)
    _assert_one_sentence(_cli("complete", "-m", str(folder), "hi"), "model.safetensors", "shape")


def test_missing_tensor(tmp_path, tiny_spec, tiny_sd):
    sd = {k: v for k, v in tiny_sd.items() if k != "model.layers.1.mlp.up_proj.weight"}
    folder = write_hf(tmp_path / "m", tiny_spec, sd)
    with pytest.raises(MistralError, match=r"lacks tensor layers\.1\.feed_forward\.w3\.weight"):
        load_model(folder, FP32)


class _Evil:
    def __reduce__(self):
        return (print, ("this ran arbitrary code",))


def test_pth_that_needs_arbitrary_pickle(tmp_path, tiny_spec, tiny_sd):
    folder = write_native(tmp_path / "m", tiny_spec, tiny_sd, fmt="pth")
    state = torch.load(folder / "consolidated.00.pth", weights_only=True)
    state["evil"] = _Evil()
    torch.save(state, folder / "consolidated.00.pth", pickle_protocol=pickle.HIGHEST_PROTOCOL)
    with pytest.raises(MistralError, match="unsafe pickle"):
        load_model(folder, FP32)
    proc = _cli("complete", "-m", str(folder), "hi")
    _assert_one_sentence(proc, "consolidated.00.pth", "unsafe pickle")
    assert "arbitrary code" not in proc.stdout


def test_truncated_pth(tmp_path, tiny_spec, tiny_sd):
    folder = write_native(tmp_path / "m", tiny_spec, tiny_sd, fmt="pth")
    path = folder / "consolidated.00.pth"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(MistralError, match="truncated or corrupt"):
        load_model(folder, FP32)


def test_no_weights(tmp_path, hf_model_dir):
    folder = _copy(hf_model_dir, tmp_path / "m")
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(MistralError, match="only PyTorch .bin files"):
        load_model(folder, FP32)


def test_missing_shard(tmp_path, tiny_spec, tiny_sd):
    folder = write_hf(tmp_path / "m", tiny_spec, tiny_sd, shards=2)
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(MistralError, match=r"model-00002-of-00002\.safetensors is missing"):
        load_model(folder, FP32)


def test_invalid_config_json(tmp_path, hf_model_dir):
    folder = _copy(hf_model_dir, tmp_path / "m")
    (folder / "config.json").write_text("{not json")
    _assert_one_sentence(_cli("complete", "-m", str(folder), "hi"), "config.json", "not a valid model config")


def test_help_version_and_no_torch_import():
    assert _cli("--version").stdout.startswith("mistral-cli ")
    helptext = _cli("--help").stdout
    for command in ("complete", "chat", "download", "info"):
        assert command in helptext
    code = "import sys, mistral_cli.cli.app; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
