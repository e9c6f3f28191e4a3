"""The built wheel is complete on its own: installed into a fresh virtualenv it gives a working `mistral`."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

import mistral_cli

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "src" / "mistral_cli"


def run(*args: str | Path, **kw: object) -> subprocess.CompletedProcess:
    r = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=120, **kw)
    assert r.returncode == 0, f"{args}:\n{r.stdout}\n{r.stderr}"
    return r


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    # --no-isolation: the build backend comes from the test extras, so no network is needed
    run(sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", out, ROOT)
    (path,) = out.glob("mistral_cli-*.whl")
    return path


def test_the_wheel_holds_the_package_and_the_completions_and_no_tests(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    data = f"mistral_cli-{mistral_cli.__version__}.data/data/share/"
    modules = {f"mistral_cli/{p.relative_to(PACKAGE).as_posix()}" for p in PACKAGE.rglob("*.py")}
    assert modules <= set(names)
    assert "mistral_cli/native/kernels.c" in names  # our CPU kernels are built from it on first use
    assert {f"{data}bash-completion/completions/mistral", f"{data}zsh/site-functions/_mistral",
            f"{data}fish/vendor_completions.d/mistral.fish"} <= set(names)  # fmt: skip
    allowed = ("mistral_cli/", f"mistral_cli-{mistral_cli.__version__}.dist-info/", data)
    assert [n for n in names if not n.startswith(allowed)] == []
    assert not [n for n in names if "test" in n.lower() or "conftest" in n or n.endswith(("tiny.py", "bench.py"))]
    with zipfile.ZipFile(wheel) as z:
        entry_points = z.read(f"mistral_cli-{mistral_cli.__version__}.dist-info/entry_points.txt").decode()
    assert "mistral = mistral_cli.cli.app:main" in entry_points


def test_the_installed_wheel_runs_in_a_fresh_virtualenv(wheel, tmp_path, hf_model_dir):
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv)
    bindir = venv / ("Scripts" if os.name == "nt" else "bin")
    python = bindir / ("python.exe" if os.name == "nt" else "python")
    # The dependencies (torch and the rest) come from this environment rather than the network. `--system-site-packages`
    # would give the base interpreter's packages, not this virtualenv's, so a .pth file adds them instead; a .pth
    # line is only a path, so this environment's editable install of the package is not picked up through it.
    # numpy is left out, as in a real install: mistral-cli does not depend on it (only the test extras pull it in).
    deps = tmp_path / "deps"
    deps.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not entry.name.lower().startswith("numpy"):
            (deps / entry.name).symlink_to(entry)
    site = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip())
    (site / "deps-from-test-env.pth").write_text(f"{deps}\n", encoding="utf-8")
    run(python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--force-reinstall", wheel)

    env = {k: v for k, v in os.environ.items() if not k.startswith(("MISTRAL_", "HF_", "PYTHON"))}
    (tmp_path / "config.toml").write_text("", encoding="utf-8")  # the user's own config must not leak in
    env.update(MISTRAL_CONFIG=str(tmp_path / "config.toml"), HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    assert subprocess.run([python, "-c", "import numpy"], capture_output=True, env=env).returncode != 0
    where = run(python, "-c", "import mistral_cli; print(mistral_cli.__file__)", env=env, cwd=tmp_path).stdout
    assert Path(where.strip()).is_relative_to(venv)
    mistral = bindir / ("mistral.exe" if os.name == "nt" else "mistral")

    assert run(mistral, "--version", env=env, cwd=tmp_path).stdout.strip() == f"mistral-cli {mistral_cli.__version__}"
    help_text = run(mistral, "--help", env=env, cwd=tmp_path).stdout
    assert all(command in help_text for command in ("complete", "chat", "download", "info"))
    info = run(mistral, "info", hf_model_dir, env=env, cwd=tmp_path).stdout
    assert "2 layers, width 64" in info and "model.safetensors" in info
    # a completion from the installed wheel, with our CPU kernels built from its own copy of kernels.c
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    args = ("complete", "-m", hf_model_dir, "-n", "4", "-t", "0", "--verbose", "Roses are")
    done = run(mistral, *args, env=env, cwd=tmp_path)
    from mistral_cli.native import kernels

    assert done.stdout and (" kernels, " in done.stderr) == (kernels.native() is not None), done.stderr
    assert "Warning" not in done.stderr, done.stderr  # e.g. torch's about numpy, which this environment lacks
    share = venv / "share"
    assert (share / "bash-completion" / "completions" / "mistral").is_file()
