"""`mistral info`: architecture, files, memory and device from headers alone; the list of local models."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hub_server import folder_files, put_in_hf_cache
from inprocess import mistral
from mistral_cli.cli.info import memory_needed
from mistral_cli.model.config import ModelConfig
from tiny import TinySpec, random_state_dict, write_native

INSTRUCT = "mistralai/Mistral-7B-Instruct-v0.2"


@pytest.fixture
def env(tmp_path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "MISTRAL_"))}
    env.update(HF_HOME=str(tmp_path / "hf"), MISTRAL_HOME=str(tmp_path / "models"), HF_HUB_OFFLINE="1")
    return env


def info_json(env: dict[str, str], *args: str) -> dict:
    r = mistral(env, "info", *args, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_json_describes_architecture_weights_tokenizer_memory_and_device(env, hf_model_dir, tiny_spec, tiny_sd):
    d = info_json(env, str(hf_model_dir), "--dtype", "bf16", "--max-context", "1024")
    a = d["architecture"]
    assert (a["n_layers"], a["dim"], a["n_heads"], a["n_kv_heads"], a["head_dim"]) == (2, 64, 4, 2, 16)
    assert (a["hidden_dim"], a["vocab_size"], a["rope_theta"], a["sliding_window"]) == (128, 32000, 1e6, None)
    assert a["max_context"] == 32768
    assert d["parameters"] == sum(t.numel() for t in tiny_sd.values())
    weights = d["weights"]
    assert weights["dtype"] == "F32" and weights["bytes"] == (hf_model_dir / "model.safetensors").stat().st_size
    assert [f["name"] for f in weights["files"]] == ["model.safetensors"]
    assert d["tokenizer"]["kind"].startswith("v1") and d["tokenizer"]["bytes"] == 493_443
    assert (d["source"], d["format"], d["folder"], d["revision"]) == ("local", "hf", str(hf_model_dir), None)
    m = d["memory"]
    assert (m["dtype"], m["quantize"], m["context"]) == ("bf16", "none", 1024)
    assert m["kv_cache_bytes"] == 2 * 2 * 2 * 16 * 2 * 1024  # layers x (k, v) x kv heads x head size x bytes x tokens
    assert m["weights_bytes"] == d["parameters"] * 2
    assert m["total_bytes"] == m["weights_bytes"] + m["kv_cache_bytes"]
    assert d["device"]["name"] in ("cpu", "cuda", "mps") and d["device"]["reason"]


def test_the_table_shows_the_same_facts(env, hf_model_dir):
    r = mistral(env, "info", str(hf_model_dir))
    assert r.returncode == 0, r.stderr
    for text in ("2 layers, width 64, 4 heads, 2 kv heads, head size 16, MLP 128, vocab 32000", "rope theta 1e+06",
                 "sliding window none", "context 32768", "F32", "model.safetensors", "v1 SentencePiece", "memory",
                 "device"):  # fmt: skip
        assert text in r.stdout
    assert all(line == line.rstrip() for line in r.stdout.splitlines())  # no padding in a pipe


def test_a_native_pth_checkpoint(env, tmp_path, tiny_spec, tiny_sd):
    folder = write_native(tmp_path / "pth", tiny_spec, tiny_sd, fmt="pth", dtype=torch.bfloat16)
    d = info_json(env, str(folder))
    assert d["format"] == "native" and d["weights"]["dtype"] is None
    assert d["parameters"] == ModelConfig.from_folder(folder).n_params == sum(t.numel() for t in tiny_sd.values())
    assert d["weights"]["bytes"] == (folder / "consolidated.00.pth").stat().st_size


def test_memory_for_quantization_and_the_real_model():
    config = ModelConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128, hidden_dim=14336,
                         vocab_size=32000, rope_theta=1e6)  # fmt: skip
    bf16 = memory_needed(config, "bf16", "none", 32768)
    assert bf16["weights_bytes"] == 14_483_464_192  # docs/FORMAT.md section 7: the index's total_size
    assert bf16["kv_cache_bytes"] == 4 * 2**30  # 128 KiB a token, 32K tokens
    int8 = memory_needed(config, "bf16", "int8", 32768)
    int4 = memory_needed(config, "bf16", "int4", 32768)
    assert 0.5 < int8["weights_bytes"] / bf16["weights_bytes"] < 0.56
    assert 0.27 < int4["weights_bytes"] / bf16["weights_bytes"] < 0.32
    assert memory_needed(config, "fp32", "none", 1)["weights_bytes"] == 2 * bf16["weights_bytes"]


def test_an_alias_in_the_cache(env, tmp_path, hf_model_dir):
    snapshot = put_in_hf_cache(tmp_path / "hf" / "hub", INSTRUCT, folder_files(hf_model_dir))
    d = info_json(env, "mistral-7b-instruct-v0.2")
    assert (d["source"], d["repo_id"], d["revision"], d["folder"]) == (
        "hub-cache",
        INSTRUCT,
        snapshot.name,
        str(snapshot),
    )
    stored = Path(d["weights"]["files"][0]["stored_at"])
    assert stored.parent.name == "blobs" and stored.read_bytes() == (hf_model_dir / "model.safetensors").read_bytes()


def test_without_a_model_it_lists_local_models(env, tmp_path, hf_model_dir, native_model_dir):
    r = mistral(env, "info")
    assert r.returncode == 0 and r.stdout == "" and "mistral download" in r.stderr
    assert info_json(env) == {"models": []}
    snapshot = put_in_hf_cache(tmp_path / "hf" / "hub", INSTRUCT, folder_files(hf_model_dir))
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "mistral-7b-v0.2").symlink_to(native_model_dir)
    rows = {m["name"]: m for m in info_json(env)["models"]}
    assert rows["mistral-7b-instruct-v0.2"]["folder"] == str(snapshot)
    assert rows["mistral-7b-instruct-v0.2"]["bytes"] == (hf_model_dir / "model.safetensors").stat().st_size
    assert rows["mistral-7b-v0.2"]["source"] == "tar"
    table = mistral(env, "info").stdout
    assert "mistral-7b-instruct-v0.2" in table and str(snapshot) in table and "hub-cache" in table


def test_a_model_not_on_disk(env):
    r = mistral(env, "info", "mistral-7b-v0.2")
    assert r.returncode == 1
    assert r.stderr.strip() == (
        "mistral: error: mistral-7b-v0.2 is not on disk; run `mistral download mistral-7b-v0.2` to download it."
    )


def test_info_is_instant_and_never_imports_torch(env, tmp_path):
    spec = TinySpec()
    folder = write_native(tmp_path / "m", spec, random_state_dict(spec), dtype=torch.bfloat16)
    probe = (
        "import sys, time, io, contextlib\n"
        "from mistral_cli.cli.app import main\n"
        "best = 9.0\n"
        "for _ in range(3):\n"
        "    t = time.perf_counter()\n"
        "    sys.argv = ['mistral', 'info', sys.argv[1], '--json']\n"
        "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "        main()\n"
        "    best = min(best, time.perf_counter() - t)\n"
        "print(best, *(name in sys.modules for name in ('torch', 'huggingface_hub', 'pydantic')))\n"
    )
    r = subprocess.run([sys.executable, "-c", probe, str(folder)], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    seconds, *heavy = r.stdout.split()
    assert heavy == ["False"] * 3  # torch alone takes 1-2 s to import, pydantic (Typer 0.29's) 0.15 s
    assert float(seconds) < 0.1


@pytest.mark.parametrize(
    ("machine", "flags", "free", "want"),
    [
        ("x86_64", {"sse4_2", "avx2", "fma"}, 64e9, "bf16"),  # AVX2: bf16 decodes faster even without bf16 math
        ("x86_64", {"avx512f", "avx512_bf16"}, 64e9, "bf16"),
        ("x86_64", {"sse4_2"}, 64e9, "fp32"),  # no SIMD bf16 conversion: fp32 when it fits
        ("x86_64", {"sse4_2"}, 20e9, "bf16"),  # ... and bf16 when fp32 (29 GB) would not
        ("aarch64", {"fp", "asimd"}, 64e9, "bf16"),
    ],
)
def test_auto_dtype_on_a_cpu(monkeypatch, machine, flags, free, want):
    from mistral_cli import hardware

    monkeypatch.setattr(hardware.platform, "machine", lambda: machine)
    monkeypatch.setattr(hardware.platform, "system", lambda: "Linux")
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(hardware, "available_memory", lambda: int(free))
    for cached in (hardware.cpu_has_fast_bf16, hardware.cpu_bf16_decode_ok):
        cached.cache_clear()
    try:
        assert hardware.auto_dtype("cpu", 7_241_732_096) == want
        assert hardware.auto_dtype("cuda", 7_241_732_096) == "bf16" and hardware.auto_dtype("mps", 1) == "fp16"
    finally:
        for cached in (hardware.cpu_has_fast_bf16, hardware.cpu_bf16_decode_ok):
            cached.cache_clear()


def test_cpu_flags_are_read_from_this_machine():
    from mistral_cli import hardware

    if not Path("/proc/cpuinfo").exists():
        pytest.skip("no /proc/cpuinfo")
    flags = hardware.cpu_flags()
    assert flags, "no flags line found in /proc/cpuinfo"
    # the answer agrees with what torch itself detects for its vectorized kernels
    capability = torch.backends.cpu.get_cpu_capability()
    if capability in ("AVX2", "AVX512"):
        assert hardware.cpu_bf16_decode_ok()


def test_info_says_whether_our_cpu_kernels_decode(env, hf_model_dir):
    from mistral_cli.hardware import kernels_blocker

    d = info_json(env, str(hf_model_dir), "--device", "cpu")
    assert d["device"]["name"] == "cpu"
    here = kernels_blocker()
    assert d["device"]["kernels"]["ours"] == (here is None), d["device"]
    table = mistral(env, "info", str(hf_model_dir), "--device", "cpu").stdout
    ours = re.search(r"kernels       ours \(AVX2( \+ AVX512-[A-Z0-9]+)*, compiled", table) is not None
    assert ours == (here is None), table
    off = info_json({**env, "MISTRAL_KERNELS": "off"}, str(hf_model_dir), "--device", "cpu")
    assert off["device"]["kernels"] == {"ours": False, "reason": "switched off with $MISTRAL_KERNELS"}
    if here is None:  # an AVX2 CPU: without a compiler, torch's kernels, and info says why
        no_cc = info_json({**env, "CC": "/nonexistent/cc"}, str(hf_model_dir), "--device", "cpu")
        assert no_cc["device"]["kernels"] == {
            "ours": False,
            "reason": "no C compiler to build them ($CC, cc, gcc or clang)",
        }
