"""The quick path of `mistral complete` (engine/quick.py): a short prompt answered from the prepared weights through
our C library without importing torch, with the same reply as the full path, which it leaves every run it cannot
take."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mistral_cli.engine.quick import FIRST_ROOM, QUICK_PROMPT, torch_version
from mistral_cli.hardware import default_threads, torch_vector_halves
from mistral_cli.native import library

pytestmark = pytest.mark.skipif(library.library() is None, reason=f"our kernels: {library.status()}")

QUICK = "quick path: no torch"
# runs the command line in this interpreter, then says whether torch was imported
NO_TORCH = (
    "import sys\nfrom mistral_cli.cli.app import main\nsys.argv = ['mistral', *sys.argv[1:]]\n"
    "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\nelse:\n    code = 0\n"
    "sys.stderr.write(f'\\ntorch imported: {\"torch\" in sys.modules}\\n')\nsys.exit(code)\n"
)


@pytest.fixture
def env(tmp_path) -> dict[str, str]:
    """A cache folder of the test's own, and no switches of ours from the caller's environment."""
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("MISTRAL_", "HF_", "OMP_"))}
    return {**keep, "XDG_CACHE_HOME": str(tmp_path / "cache"), "MISTRAL_CONFIG": os.devnull, "HF_HUB_OFFLINE": "1"}


def complete(env: dict[str, str], *args: str, quick: bool = True) -> tuple[dict, str]:
    """`mistral complete --json ARGS`: its JSON result and stderr (which ends with whether torch was imported)."""
    env = env if quick else {**env, "MISTRAL_QUICK": "off"}
    proc = subprocess.run([sys.executable, "-c", NO_TORCH, "complete", "--json", "--verbose", *args], env=env,
                          capture_output=True, text=True, timeout=180)  # fmt: skip
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    return json.loads(proc.stdout), proc.stderr


def same_reply(a: dict, b: dict) -> bool:
    return (a["text"], a["finish_reason"], a["usage"]) == (b["text"], b["finish_reason"], b["usage"])


@pytest.mark.parametrize("quantize", ["none", "int8", "int4"])
def test_a_short_prompt_is_answered_without_torch_as_the_full_path_answers_it(env, hf_model_dir, quantize):
    args = ("-m", str(hf_model_dir), "-q", quantize, "-n", "12")
    first, err = complete(env, *args, "--seed", "4", "Once upon")
    assert "torch imported: True" in err and QUICK not in err and "prepared" in err  # the first call prepares
    for options in (["--seed", "4"], ["-t", "0"], ["--seed", "9", "--top-k", "20", "--top-p", "0.9",
                                                  "--repeat-penalty", "1.3", "--stop", "e"]):  # fmt: skip
        quick, err = complete(env, *args, *options, "Once upon")
        assert QUICK in err and "torch imported: False" in err, err
        full, err = complete(env, *args, *options, "Once upon", quick=False)
        assert "torch imported: True" in err
        assert same_reply(quick, full), (options, quick, full)
        assert quick["usage"]["completion_tokens"] > 0
    assert same_reply(first, complete(env, *args, "--seed", "4", "Once upon")[0])  # before and after preparing
    assert same_reply(quick, complete(env, *args, *options, "--threads", "1", "Once upon")[0])


def test_the_end_of_the_context_and_the_instruct_format(env, native_model_dir):
    args = ("-m", str(native_model_dir), "-t", "0", "-q", "int4")
    complete(env, *args, "-n", "1", "Hi")  # prepares
    # the context past the cache's first reservation (FIRST_ROOM): it grows, the positions so far copied
    for extra in (["--max-context", "9", "Hi"], ["--instruct", "--system", "Be brief.", "-n", "5", "Hi"],
                  ["--max-context", str(FIRST_ROOM + 90), "Hi"]):  # fmt: skip
        quick, err = complete(env, *args, *extra)
        assert QUICK in err
        assert same_reply(quick, complete(env, *args, *extra, quick=False)[0])
    assert quick["finish_reason"] == "context" and quick["usage"]["completion_tokens"] > FIRST_ROOM
    ended, _ = complete(env, *args, "--max-context", "9", "Hi")
    assert ended["finish_reason"] == "context"
    framed, _ = complete(env, *args, "--instruct", "--system", "Be brief.", "-n", "5", "Hi")
    assert framed["usage"]["prompt_tokens"] > 5  # the instruct frame is part of the prompt


def test_what_the_quick_path_leaves_to_the_full_path(env, hf_model_dir, tmp_path):
    model = Path(shutil.copytree(hf_model_dir, tmp_path / "m"))
    args = ("-m", str(model), "-t", "0", "-n", "4")
    complete(env, *args, "Hi")  # prepares
    long_prompt = " ".join(["word"] * (QUICK_PROMPT["none"] + 4))
    for extra, why in [
        ([long_prompt], f"loading torch (a prompt of {QUICK_PROMPT['none'] + 5} tokens)"),
        (["--format", "json", "Hi"], None),
        (["--logprobs", "2", "Hi"], None),
        (["--no-prepare", "Hi"], "prepared weights are off"),
        (["--dtype", "fp32", "Hi"], "the dtype is not bf16"),
        (["-q", "int8", "Hi"], "no prepared weights yet"),
    ]:
        _, err = complete(env, *args, *extra)
        assert QUICK not in err and "torch imported: True" in err, (extra, err)
        assert why is None or why in err, (extra, err)
    _, err = complete({**env, "MISTRAL_KERNELS": "off"}, *args, "Hi")
    assert QUICK not in err
    # a touched checkpoint may have changed: its prepared file is not the one any more
    weights = model / "model.safetensors"
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    _, err = complete(env, *args, "Hi")
    assert "no prepared weights yet" in err and "prepared" in err
    assert QUICK in complete(env, *args, "Hi")[1]


def test_a_damaged_prepared_file_sends_the_run_to_the_full_path(env, hf_model_dir):
    args = ("-m", str(hf_model_dir), "-t", "0", "-n", "4")
    expected, _ = complete(env, *args, "Hi")
    (path,) = Path(env["XDG_CACHE_HOME"], "mistral-cli", "prepared").glob("*.safetensors")
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
    got, err = complete(env, *args, "Hi")
    assert QUICK not in err and "could not be used" in err  # the full path prepares it again, and says so
    assert same_reply(got, expected)
    path = next(path.parent.glob("*.safetensors"))
    header = bytearray(path.read_bytes()[:4096])
    header[8:20] = b"{not json!!!"
    with open(path, "r+b") as f:
        f.write(header)
    got, err = complete(env, *args, "Hi")
    assert QUICK not in err and same_reply(got, expected)


def test_what_torch_would_say_is_told_without_it(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    code = (
        "import json, torch; from mistral_cli.native import kernels\n"
        "print(json.dumps([torch.__version__, torch.get_num_threads(), kernels._torch_vector_halves()]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == [torch_version(), default_threads(), torch_vector_halves()]
