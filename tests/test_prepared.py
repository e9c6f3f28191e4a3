"""Prepared weights (engine/prepared.py): the same model as from the checkpoint, a valid safetensors file, keyed so
that nothing stale is ever loaded, and every way of failing to write one leaves the run working and nothing behind."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mistral_cli.engine import prepared
from mistral_cli.engine.load import load_engine
from mistral_cli.model import prepared_files
from mistral_cli.model.prepared_files import ROPE, folder, list_prepared
from mistral_cli.options import GenerationOptions, LoadOptions

PROMPT = [1, 415, 5565, 302, 4843, 349]


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A cache folder of the test's own; returns where prepared files go."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("MISTRAL_PREPARE", raising=False)
    return folder()


def run(engine) -> tuple[torch.Tensor, list[int]]:
    engine.reset()
    logits, _ = engine.prefill(PROMPT)
    done = list(engine.generate(PROMPT, GenerationOptions(max_tokens=8, temperature=0)))[-1]
    return logits, done.tokens


@pytest.mark.parametrize("fmt", ["hf", "native"])
@pytest.mark.parametrize(("dtype", "quantize"), [("bf16", "none"), ("fp32", "none"), ("bf16", "int8"),
                                                 ("bf16", "int4"), ("fp32", "int4")])  # fmt: skip
def test_mapped_weights_give_the_same_model(cache, hf_model_dir, native_model_dir, fmt, dtype, quantize):
    model = hf_model_dir if fmt == "hf" else native_model_dir
    options = LoadOptions(device="cpu", dtype=dtype, quantize=quantize, max_context=256)
    plain = load_engine(model, LoadOptions(**{**options.__dict__, "prepare": False}))
    assert not cache.exists()  # --no-prepare writes nothing
    first = load_engine(model, options)
    assert first.weights_note.startswith("read the checkpoint and prepared ")
    second = load_engine(model, options)
    assert second.weights_note.startswith("mapped the prepared weights in ")
    assert second._fused is not None or dtype != "bf16"  # our whole-step kernels run on mapped weights too
    assert first.reading is None and second.reading is not None  # the mapped file is read ahead of the first pass
    assert second.reading.finished.wait(30) and second.reading.done == second.reading.total > 0
    expected = run(plain)
    for engine in (first, second):
        logits, tokens = run(engine)
        assert torch.equal(logits, expected[0]) and tokens == expected[1]
    # mapped, not copied: the weights lie in the mapping of the prepared file
    (path,) = cache.glob(f"*-{quantize}-*.safetensors")
    weight = second.model.layers[0].feed_forward.w2.weight
    assert mapped_from(weight.data_ptr()) == str(path)


def mapped_from(address: int) -> str | None:
    """The file mapped at `address` in this process, from /proc/self/maps."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        span, *_, name = line.split(maxsplit=5) if len(line.split()) >= 6 else (line.split()[0], "")
        begin, end = (int(x, 16) for x in span.split("-"))
        if begin <= address < end:
            return name.strip()
    return None


def test_the_file_is_safetensors_with_large_tensors_on_huge_page_boundaries(cache, hf_model_dir):
    from safetensors import safe_open

    engine = load_engine(hf_model_dir, LoadOptions(device="cpu", dtype="bf16", quantize="int4", max_context=64))
    (path,) = cache.glob("*.safetensors")
    state = engine.model.state_dict()
    with safe_open(str(path), framework="pt") as f:  # the library itself reads what we wrote
        names = [n for n in f.keys() if not n.startswith("__padding_")]  # noqa: SIM118 (not iterable)
        assert sorted(names) == sorted([*state, *ROPE])  # and the RoPE tables the quick path reads
        for name in state:
            assert torch.equal(f.get_tensor(name), state[name]), name
    header_length = int.from_bytes(path.read_bytes()[:8], "little")
    header = json.loads(path.read_bytes()[8 : 8 + header_length])
    start = 8 + header_length
    assert start % prepared.ALIGN == 0
    for name, info in header.items():
        if name != "__metadata__" and not name.startswith("__padding_"):
            begin, end = info["data_offsets"]
            assert (start + begin) % (prepared.ALIGN if end - begin >= prepared.BIG else prepared.SMALL_ALIGN) == 0
    assert any(e - b >= prepared.BIG for b, e in (i["data_offsets"] for i in header.values() if "data_offsets" in i))


def test_a_changed_checkpoint_or_layout_never_loads_a_stale_file(cache, hf_model_dir, tmp_path, monkeypatch):
    model = Path(shutil.copytree(hf_model_dir, tmp_path / "m"))
    options = LoadOptions(device="cpu", dtype="bf16", max_context=64)
    load_engine(model, options)
    (old,) = cache.glob("*.safetensors")
    weights = model / "model.safetensors"
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: maybe rewritten
    engine = load_engine(model, options)
    assert engine.weights_note.startswith("read the checkpoint and prepared ")
    (new,) = cache.glob("*.safetensors")  # the stale one was removed when its successor was written
    assert new != old
    monkeypatch.setattr(prepared_files, "LAYOUT_VERSION", prepared_files.LAYOUT_VERSION + 1)
    assert load_engine(model, options).weights_note.startswith("read the checkpoint and prepared ")
    monkeypatch.undo()
    # another config on the same weights is another model
    config = json.loads((model / "config.json").read_text())
    config["rms_norm_eps"] = 1e-6
    (model / "config.json").write_text(json.dumps(config))
    assert load_engine(model, options).weights_note.startswith("read the checkpoint and prepared ")


def test_a_corrupt_prepared_file_is_prepared_again(cache, hf_model_dir):
    options = LoadOptions(device="cpu", dtype="bf16", max_context=64)
    expected = run(load_engine(hf_model_dir, options))
    (path,) = cache.glob("*.safetensors")
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
    engine = load_engine(hf_model_dir, options)
    assert engine.weights_warning.startswith(f"the prepared weights in {path} could not be used (")
    assert run(engine)[1] == expected[1]
    assert load_engine(hf_model_dir, options).weights_note.startswith("mapped")


def mistral(*args: str, env: dict[str, str], shell: str = "") -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "mistral_cli", *args]
    if shell:
        command = ["bash", "-c", shell.replace("CMD", " ".join(f"'{a}'" for a in command))]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture
def env(tmp_path) -> dict[str, str]:
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("MISTRAL_", "HF_"))}
    return {**keep, "XDG_CACHE_HOME": str(tmp_path / "cache"), "MISTRAL_CONFIG": os.devnull, "HF_HUB_OFFLINE": "1"}


def _unprivileged() -> str:
    if os.geteuid() != 0:
        return "CMD"
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: permissions cannot be tested")
    return "setpriv --bounding-set=-all --inh-caps=-all CMD"


@pytest.mark.parametrize("fault", ["read-only cache folder", "full disk", "killed while writing"])
def test_a_preparation_that_cannot_finish_leaves_the_run_working_and_nothing_behind(env, hf_model_dir, tmp_path,
                                                                                    fault):  # fmt: skip
    args = ["complete", "-m", str(hf_model_dir), "-n", "4", "-t", "0", "--max-context", "64", "--json", "Hello"]
    expected = json.loads(mistral(*args, "--no-prepare", env=env).stdout)["text"]
    target = tmp_path / "cache" / "mistral-cli" / "prepared"
    assert not target.exists()
    if fault == "read-only cache folder":
        target.mkdir(parents=True)
        target.chmod(0o555)
        r = mistral(*args, env=env, shell=_unprivileged())
        target.chmod(0o755)
        assert "Permission denied" in r.stderr
    elif fault == "full disk":  # a file-size limit: the write fails as on a full disk
        r = mistral(*args, env=env, shell="ulimit -f 2048; CMD")
        assert "File too large" in r.stderr
    else:  # SIGKILL after the first tensor: no cleanup runs at all
        plant = (
            "import os, signal, sys; from mistral_cli.engine import prepared\n"
            "real = prepared._write_tensor\n"
            "def dying(f, t): real(f, t); os.kill(os.getpid(), signal.SIGKILL)\n"
            "prepared._write_tensor = dying\n"
            f"sys.argv = ['mistral', *{args!r}]\n"
            "from mistral_cli.cli.app import main; main()\n"
        )
        r = subprocess.run([sys.executable, "-c", plant], env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == -9
        assert [p.name for p in target.iterdir() if not p.name.startswith(".")] == []  # only the temporary file
        r = mistral(*args, env=env)  # the next run prepares anew
        assert r.returncode == 0 and r.stderr == "", r.stderr
        assert json.loads(r.stdout)["text"] == expected
        return
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["text"] == expected
    (line,) = r.stderr.splitlines()
    assert line.startswith("mistral: warning: prepared weights not written: ") and "MISTRAL_PREPARE=off" in line
    assert list(target.iterdir()) == []  # no temporary file left


def test_switched_off_nothing_is_written(env, hf_model_dir, tmp_path):
    args = ["complete", "-m", str(hf_model_dir), "-n", "2", "--max-context", "64", "Hello"]
    assert mistral(*args, env={**env, "MISTRAL_PREPARE": "off"}).returncode == 0
    assert mistral(*args, "--no-prepare", env=env).returncode == 0
    assert not (tmp_path / "cache" / "mistral-cli" / "prepared").exists()


def test_verbose_says_how_the_weights_were_loaded_and_info_lists_and_prunes_them(env, hf_model_dir):
    args = ["complete", "-m", str(hf_model_dir), "-n", "2", "--max-context", "64", "-q", "int8", "-v", "Hello"]
    assert "(read the checkpoint and prepared " in mistral(*args, env=env).stderr
    assert "(mapped the prepared weights in " in mistral(*args, env=env).stderr
    data = json.loads(mistral("info", "--json", str(hf_model_dir), env=env).stdout)
    (entry,) = data["prepared"]
    assert entry["quantize"] == "int8" and entry["dtype"] == "BF16" and Path(entry["path"]).is_file()
    table = mistral("info", str(hf_model_dir), env=env).stdout
    assert "prepared" in table and "bf16, quantize int8" in table
    # how much of it is in memory: nearly all after a run (the embedding rows of tokens never seen may not be), none
    # once pushed out of the page cache
    if sys.platform.startswith("linux"):
        import re

        assert entry["in_memory_bytes"] >= 0.9 * entry["bytes"]
        assert int(re.search(r"\((\d+)% in memory\)", table).group(1)) >= 90
        with open(entry["path"], "rb") as f:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        if prepared_files.resident_bytes(Path(entry["path"])) == 0:  # not a filesystem that keeps files in memory
            # info reads the header alone (no read-ahead of the weights behind it; a filesystem with large folios
            # brings in up to 2 MiB around it)
            held = json.loads(mistral("info", "--json", str(hf_model_dir), env=env).stdout)["prepared"][0]
            assert held["in_memory_bytes"] <= 2 << 20
            table = mistral("info", str(hf_model_dir), env=env).stdout
            assert int(re.search(r"\((\d+)% in memory\)", table).group(1)) <= 100 * (2 << 20) / held["bytes"] + 1
    r = mistral("info", "--prune", str(hf_model_dir), env=env)
    assert r.returncode == 0 and r.stdout.startswith(f"Removed 1 prepared weight file of {hf_model_dir} (")
    assert not Path(entry["path"]).exists()
    assert json.loads(mistral("info", "--json", str(hf_model_dir), env=env).stdout)["prepared"] == []


def test_listing_ignores_other_models(cache, hf_model_dir, native_model_dir):
    load_engine(hf_model_dir, LoadOptions(device="cpu", max_context=64))
    load_engine(native_model_dir, LoadOptions(device="cpu", max_context=64))
    assert len(list_prepared()) == 2
    (mine,) = list_prepared(str(hf_model_dir.resolve()))
    assert mine.made_of["folder"] == str(hf_model_dir.resolve())


# ---------------------------------------------------------------------------------------------- reading ahead


def test_the_reading_order_is_the_passs():
    """Blocks in number order (the file holds them in name order: 0, 1, 10, 11, 2, ...), each block's tensors in the
    order a step uses them, then the final norm and the head; the embedding and RoPE rows are left to the pass."""
    from mistral_cli.model.safetensors import Entry

    parts = ["attention.wo.weight", "attention.wqkv.scales", "attention.wqkv.weight", "attention_norm.weight",
             "feed_forward.w13.weight", "feed_forward.w2.weight", "ffn_norm.weight"]  # fmt: skip
    names = sorted([f"layers.{i}.{p}" for i in range(12) for p in parts]
                   + ["norm.weight", "output.weight", "rope.cos", "tok_embeddings.weight"])  # fmt: skip
    entries = [Entry(n, "BF16", (8,), 16 * i, 16 * i + 16) for i, n in enumerate(names)]
    at = {(e.begin, e.end): e.name for e in entries}
    order = [at[span] for span in prepared_files.reading_order(reversed(entries))]
    expected = [f"layers.{i}.{p}" for i in range(12) for p in
                ["attention_norm.weight", "attention.wqkv.scales", "attention.wqkv.weight", "attention.wo.weight",
                 "ffn_norm.weight", "feed_forward.w13.weight", "feed_forward.w2.weight"]]  # fmt: skip
    assert order == [*expected, "norm.weight", "output.weight"]


def _resident(libc, base: int, size: int) -> list[bool]:
    """Which pages of a mapping are in memory (mincore(2))."""
    import ctypes

    pages = (size + 4095) // 4096
    vec = (ctypes.c_ubyte * pages)()
    assert libc.mincore(ctypes.c_void_p(base), ctypes.c_size_t(size), vec) == 0
    return [bool(v & 1) for v in vec]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise(MADV_POPULATE_READ) is Linux's")
def test_reading_ahead_brings_the_spans_into_memory(tmp_path, monkeypatch):
    """A file pushed out of the page cache, mapped, and read ahead in the pass's order: every page of the spans is
    then in memory. Where there is not room for the file and a margin, nothing is read ahead."""
    import ctypes

    path, size = tmp_path / "weights", 24 << 20
    path.write_bytes(os.urandom(size))
    libc = prepared_files.libc()
    with open(path, "rb") as f:
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        base = prepared_files.map_shared(f.fileno(), size)
    if any(_resident(libc, base, size)):
        pytest.skip("this filesystem keeps the file in memory (tmpfs?): nothing to read ahead")
    spans = [(20 << 20, 22 << 20), (1 << 20, (3 << 20) + 100)]

    def advise(offset: int, n: int) -> int:
        return libc.madvise(ctypes.c_void_p(base + offset), ctypes.c_size_t(n), prepared_files.POPULATE)

    monkeypatch.setattr(prepared_files, "_available_memory", lambda: size)  # no room for the file and a margin
    assert prepared_files.read_ahead(advise, spans, size) is None
    monkeypatch.undo()
    reading = prepared_files.read_ahead(advise, spans, size)
    assert reading is not None and reading.total == sum(e - b for b, e in spans)
    assert reading.finished.wait(60)
    assert reading.done == reading.total
    if advise(0, 4096) != 0 and ctypes.get_errno() == 22:
        pytest.skip("this kernel has no MADV_POPULATE_READ (Linux 5.14)")
    resident = _resident(libc, base, size)
    assert all(all(resident[b // 4096 : -(-e // 4096)]) for b, e in spans)
    assert not all(resident)  # what no span asked for stayed on disk (read-around takes a little more)
    libc.munmap(ctypes.c_void_p(base), ctypes.c_size_t(size))


def test_a_file_read_from_disk_shows_its_bytes_on_a_terminal():
    """The bar of a mapped file read ahead from disk: shown with bytes and a percentage once the reading takes
    longer than a file already in memory would, and gone once taken down; a reading already through shows nothing."""
    import io
    import re
    import time

    from rich.console import Console

    from mistral_cli.cli import loading

    def terminal() -> Console:
        return Console(file=io.StringIO(), force_terminal=True, width=120)

    through = prepared_files.ReadAhead(100 << 20)
    through.finished.set()
    err = terminal()
    with loading.reading_shown(through, err):
        time.sleep(loading.READING_SHOWN_AFTER + 0.3)
    assert err.file.getvalue() == ""

    cold = prepared_files.ReadAhead(100 << 20)
    cold.done = 25 << 20
    err = terminal()
    with loading.reading_shown(cold, err) as take_down:
        deadline = time.monotonic() + 20
        while "25%" not in err.file.getvalue() and time.monotonic() < deadline:
            time.sleep(0.05)
        shown = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", err.file.getvalue())
        take_down()
        after = err.file.getvalue()
        time.sleep(0.3)
        assert err.file.getvalue() == after  # nothing drawn once taken down
    assert re.search(r"Reading the weights from disk.*26\.2/104\.9 MB +25%", shown), shown
    assert after.endswith("\x1b[2K") and "\x1b[?25h" in after  # the bar's line erased, the cursor shown again
