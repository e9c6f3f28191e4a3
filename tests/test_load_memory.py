"""Safetensors are read into private buffers, not mapped: the same tensors as the safetensors library gives, and a
peak resident memory (VmHWM, in a fresh process) near the final weights rather than weights plus mapped files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoints import EOS, SHAPES, VOCAB, n_params, write_checkpoint
from mistral_cli.engine.load import load_model
from mistral_cli.errors import MistralError
from mistral_cli.model.checkpoint import SAFETENSORS_DTYPES, WeightFiles, iter_tensors
from mistral_cli.model.placement import Placement
from tiny import write_hf, write_native

CPU = torch.device("cpu")
MIB = 2**20


def _read(path: Path) -> dict[str, torch.Tensor]:
    return {name: t for name, t, _ in iter_tensors(WeightFiles("safetensors", (path,)))}


def test_every_dtype_reads_as_the_library_reads_it(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        dtype_name: (torch.randn(3, 5, generator=g) * 100).to(dtype) for dtype_name, dtype in SAFETENSORS_DTYPES.items()
    }
    tensors |= {"scalar": torch.tensor(2.5), "empty": torch.empty(0, 4, dtype=torch.bfloat16)}
    path = tmp_path / "all.safetensors"
    save_file(tensors, path, metadata={"format": "pt"})
    got, ref = _read(path), load_file(path)
    assert got.keys() == ref.keys()
    for name, t in ref.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape
        assert torch.equal(got[name], t), name


@pytest.mark.parametrize("shards", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_loaded_weights_equal_the_library_tensors(tmp_path, tiny_spec, tiny_sd, dtype, shards):
    folder = write_hf(tmp_path / "m", tiny_spec, tiny_sd, shards=shards, dtype=dtype)
    ref: dict[str, torch.Tensor] = {}
    for path in folder.glob("*.safetensors"):
        ref |= load_file(path)
    state = load_model(folder, Placement(CPU, dtype)).state_dict()
    h = "model.layers.1."
    ours_to_theirs = {
        "tok_embeddings.weight": ["model.embed_tokens.weight"],
        "norm.weight": ["model.norm.weight"],
        "output.weight": ["lm_head.weight"],
        "layers.1.attention_norm.weight": [h + "input_layernorm.weight"],
        "layers.1.attention.wqkv.weight": [h + f"self_attn.{p}_proj.weight" for p in "qkv"],
        "layers.1.attention.wo.weight": [h + "self_attn.o_proj.weight"],
        "layers.1.feed_forward.w13.weight": [h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight"],
        "layers.1.feed_forward.w2.weight": [h + "mlp.down_proj.weight"],
    }
    for ours, theirs in ours_to_theirs.items():
        assert state[ours].dtype == dtype
        assert torch.equal(state[ours], torch.cat([ref[n] for n in theirs])), ours


def test_native_bf16_equals_hf_bf16(tmp_path, tiny_spec, tiny_sd):
    bf16 = Placement(CPU, torch.bfloat16)
    hf = load_model(write_hf(tmp_path / "hf", tiny_spec, tiny_sd, dtype=torch.bfloat16), bf16).state_dict()
    native = load_model(write_native(tmp_path / "n", tiny_spec, tiny_sd, dtype=torch.bfloat16), bf16).state_dict()
    assert hf.keys() == native.keys()
    for name in hf:
        assert torch.equal(hf[name], native[name]), name


def test_random_checkpoint_is_sharded_and_loads(tmp_path):
    folder = write_checkpoint(tmp_path / "m", SHAPES["tiny"], shard_bytes=2_000_000)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[-1].endswith(f"-of-{len(shards):05d}.safetensors")
    assert sorted(p.name for p in folder.glob("*.safetensors")) == shards
    assert index["metadata"]["total_size"] == n_params(SHAPES["tiny"]) * 2
    model = load_model(folder, Placement(CPU, torch.float32))
    assert sum(p.numel() for p in model.parameters()) == n_params(SHAPES["tiny"])
    assert not model.output.weight[EOS].any()  # greedy decoding never picks EOS


# --- the reader's checks ---------------------------------------------------------------------------------------------


def _rewrite(path: Path, edit) -> None:
    """Apply edit(header dict) and write the file back with the same data bytes."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n :])


@pytest.fixture
def small_file(tmp_path) -> Path:
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(4, 4), "b": torch.ones(4, 4), "c": torch.ones(2)}, path)
    return path


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda h: h["b"].update(data_offsets=h["a"]["data_offsets"]), "tensor b starts at byte"),
        (lambda h: h["b"].update(shape=[4, 5]), r"tensor b of shape \[4, 5\] and dtype F32 has 64 bytes"),
        (lambda h: h["b"].update(data_offsets="0-64"), "bad header entry for tensor b"),
    ],
    ids=["overlap", "size", "entry"],
)
def test_inconsistent_header_is_refused(small_file, edit, match):
    _rewrite(small_file, edit)
    with pytest.raises(MistralError, match=f"w.safetensors is truncated or corrupt .*{match}.*; download it again"):
        _read(small_file)


@pytest.mark.parametrize(
    ("cut", "match"),
    [
        (lambda raw: raw + b"\0" * 16, "the tensors end at byte"),
        (lambda raw: raw[:-3], "the tensors end at byte"),
        (lambda raw: (2**40).to_bytes(8, "little") + raw[8:], "header length"),
        (lambda raw: raw[:2], "too short"),
    ],
    ids=["trailing", "truncated", "length", "short"],
)
def test_wrong_size_is_refused(small_file, cut, match):
    small_file.write_bytes(cut(small_file.read_bytes()))
    with pytest.raises(MistralError, match=f"w.safetensors is truncated or corrupt .*{match}.*; download it again"):
        _read(small_file)


def test_unknown_dtype_is_named(small_file):
    _rewrite(small_file, lambda h: h["c"].update(dtype="F8_E4M3", shape=[8]))
    with pytest.raises(MistralError, match="tensor c has dtype F8_E4M3"):
        _read(small_file)


# --- peak memory ----------------------------------------------------------------------------------------------------

MEASURE = r"""
import json, sys
from pathlib import Path
from mistral_cli.cli.app import huge_pages
huge_pages()  # before torch, as the command does: torch's huge pages for large tensors
import torch
from mistral_cli.engine.load import load_model
from mistral_cli.model.placement import Placement

def status(key):
    line = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith(key + ":"))
    return int(line.split()[1]) * 1024

before = status("VmRSS")
model = load_model(Path(sys.argv[1]), Placement(torch.device("cpu"), torch.bfloat16), quantize=sys.argv[2])
tensors = [*model.parameters(), *model.buffers()]
print(json.dumps({"increase": status("VmHWM") - before, "model_bytes": sum(t.nbytes for t in tensors)}))
"""


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory) -> Path:
    # the benchmark's "small" shape: 175M parameters, 349 MB in bf16, one shard
    return write_checkpoint(tmp_path_factory.mktemp("mem") / "small", SHAPES["small"])


def _load_peak(folder: Path, quantize: str) -> dict[str, int]:
    """VmHWM of a fresh process after loading, less its resident memory just before: the load's own peak."""
    # glibc's mmap threshold pinned: left dynamic, it keeps a varying 0-80 MB of freed small tensors in its heaps
    # (from run to run, with the timing of torch's threads), noise that is large beside this model, not beside 7B
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    proc = subprocess.run(
        [sys.executable, "-c", MEASURE, str(folder), quantize], capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


needs_proc = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")


@needs_proc
def test_bf16_load_peaks_near_the_weights(small_checkpoint):
    weight_bytes = n_params(SHAPES["small"]) * 2
    peak = _load_peak(small_checkpoint, "none")
    assert peak["increase"] <= 1.1 * weight_bytes + 64 * MIB, (peak, weight_bytes)


@needs_proc
def test_int8_load_holds_one_float_tensor_at_a_time(small_checkpoint):
    weight_bytes = n_params(SHAPES["small"]) * 2
    head_bytes = VOCAB * SHAPES["small"]["dim"] * 2  # the largest tensor, last in the file
    peak = _load_peak(small_checkpoint, "int8")
    # the quantized model (its embedding table stays bf16) plus the one bf16 tensor being quantized: about 0.7x
    # of the bf16 weights for this shape, whose vocabulary is a large part of it (0.53x for 7B)
    assert peak["increase"] <= peak["model_bytes"] + head_bytes + 32 * MIB, (peak, head_bytes)
    assert peak["increase"] < weight_bytes, (peak, weight_bytes)


HUGE_PAGES = r"""
from mistral_cli.cli.app import huge_pages
huge_pages()
import torch
t = torch.empty(64 << 20, dtype=torch.uint8).fill_(1)
start, huge, inside = t.data_ptr(), 0, False
for line in open("/proc/self/smaps"):
    field = line.split()
    if "-" in field[0] and not field[0].endswith(":"):
        lo, hi = (int(a, 16) for a in field[0].split("-"))
        inside = lo <= start < hi
    elif inside and field[0] == "AnonHugePages:":
        huge = int(field[1])
print(huge)
"""

THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


@pytest.mark.skipif(
    not THP_MODE.exists() or "[never]" in THP_MODE.read_text(), reason="no transparent huge pages on this system"
)
def test_large_tensors_sit_on_huge_pages():
    """The command's set-up (before torch is imported) turns on torch's huge pages for tensors of 2 MiB and more (a page fault per
    2 MiB, not per 4 KiB, when the weights are loaded); THP_MEM_ALLOC_ENABLE=0 turns that off."""

    def huge_kib(**env: str) -> int:
        environ = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"} | env
        proc = subprocess.run([sys.executable, "-c", HUGE_PAGES], capture_output=True, text=True, env=environ)
        assert proc.returncode == 0, proc.stderr
        return int(proc.stdout)

    assert huge_kib() >= 2048  # at least one huge page of the 64 MiB tensor
    if "[madvise]" in THP_MODE.read_text():  # with "always", the kernel uses them whatever torch asks
        assert huge_kib(THP_MEM_ALLOC_ENABLE="0") == 0
