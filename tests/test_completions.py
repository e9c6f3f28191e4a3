"""Shell completion: the checked-in scripts match the generator, and the CLI answers completion requests without
importing torch."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
# The console script's code path (prog name `mistral`, so the hook is _MISTRAL_COMPLETE), reporting whether torch
# got imported: completion runs on every Tab and must stay instant.
PROBE = (
    "import atexit, sys\n"
    "atexit.register(lambda: sys.stderr.write('TORCH IMPORTED' if 'torch' in sys.modules else ''))\n"
    "sys.argv[0] = 'mistral'\n"
    "from mistral_cli.cli.app import main\n"
    "main()\n"
)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MISTRAL_", "_MISTRAL_", "_TYPER_", "COMP_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # the `mistral` the scripts call back into
    return {**env, **extra}


def complete(**env: str) -> list[str]:
    r = subprocess.run([sys.executable, "-c", PROBE], env=_env(**env), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "TORCH IMPORTED" not in r.stderr
    return r.stdout.splitlines()


def test_checked_in_scripts_are_what_the_generator_writes():
    r = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_completions.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, f"stale completion scripts:\n{r.stderr}"
    for name in ("mistral.bash", "_mistral", "mistral.fish"):
        assert "_MISTRAL_COMPLETE=complete_" in (ROOT / "completions" / name).read_text(encoding="utf-8")
    assert (ROOT / "completions" / "_mistral").read_text(encoding="utf-8").startswith("#compdef mistral\n")


def test_bash_completes_subcommands_options_and_choices():
    assert complete(_MISTRAL_COMPLETE="complete_bash", COMP_WORDS="mistral comp", COMP_CWORD="1") == ["complete"]
    assert set(complete(_MISTRAL_COMPLETE="complete_bash", COMP_WORDS="mistral ", COMP_CWORD="1")) >= {
        "complete", "chat", "download", "info",
    }  # fmt: skip
    assert "--temperature" in complete(
        _MISTRAL_COMPLETE="complete_bash", COMP_WORDS="mistral complete --te", COMP_CWORD="2"
    )
    assert complete(_MISTRAL_COMPLETE="complete_bash", COMP_WORDS="mistral chat --device ", COMP_CWORD="3") == [
        "auto", "cpu", "cuda", "mps",
    ]  # fmt: skip


def test_zsh_and_fish_requests():
    zsh = "\n".join(complete(_MISTRAL_COMPLETE="complete_zsh", _TYPER_COMPLETE_ARGS="mistral info --"))
    assert "--json" in zsh and "--max-context" in zsh
    fish = complete(
        _MISTRAL_COMPLETE="complete_fish", _TYPER_COMPLETE_FISH_ACTION="get-args", _TYPER_COMPLETE_ARGS="mistral do"
    )
    assert [line.split("\t")[0] for line in fish] == ["download"]
    # MODEL names: the aliases (and the models on disk) for the argument of info and for --model
    zsh = "\n".join(complete(_MISTRAL_COMPLETE="complete_zsh", _TYPER_COMPLETE_ARGS="mistral info mistral-7b-v"))
    assert "mistral-7b-v0.2" in zsh and "instruct" not in zsh
    fish = complete(_MISTRAL_COMPLETE="complete_fish", _TYPER_COMPLETE_FISH_ACTION="get-args",
                    _TYPER_COMPLETE_ARGS="mistral chat --model mistral-7b-i")  # fmt: skip
    assert [line.split("\t")[0] for line in fish] == ["mistral-7b-instruct-v0.2"]


def _models(tmp_path: Path) -> dict[str, str]:
    """A model of each kind on disk: a repo in the Hugging Face cache, a folder of a tar download; as _env()."""
    snapshot = tmp_path / "hf" / "hub" / "models--acme--Fine-7B" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text('{"model_type": "mistral"}')
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("a" * 40)
    (tmp_path / "models" / "my-model").mkdir(parents=True)
    (tmp_path / "models" / "my-model" / "params.json").write_text("{}")
    env = {k: v for k, v in _env().items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    return {**env, "HF_HOME": str(tmp_path / "hf"), "MISTRAL_HOME": str(tmp_path / "models")}


def test_model_names_complete_without_torch(tmp_path):
    env = _models(tmp_path)

    def bash(line: str) -> list[str]:
        words = line.split(" ")
        return complete(**env, _MISTRAL_COMPLETE="complete_bash", COMP_WORDS=line, COMP_CWORD=str(len(words) - 1))

    assert bash("mistral info ") == ["acme/Fine-7B", "mistral-7b-instruct-v0.2", "mistral-7b-v0.2", "my-model"]
    assert bash("mistral rm a") == ["acme/Fine-7B"]
    assert bash("mistral serve my") == ["my-model"]
    assert bash("mistral complete -m mistral-7b-i") == ["mistral-7b-instruct-v0.2"]
    # download takes the aliases and repo ids (the one in the cache is offered: a newer revision may be out)
    assert bash("mistral download ") == ["acme/Fine-7B", "mistral-7b-instruct-v0.2", "mistral-7b-v0.2"]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_model_names_in_bash(tmp_path):
    program = f"source '{ROOT / 'completions' / 'mistral.bash'}'\n"
    for words, cword in (("mistral info ac", 2), ("mistral info my", 2), ("mistral chat --model mistral-7b-i", 3)):
        program += f"COMP_WORDS=({words}); COMP_CWORD={cword}; _mistral_completion mistral\n"
        program += 'printf "%s\\n" "${COMPREPLY[@]}"\n'
    r = subprocess.run(["bash", "--norc", "-c", program], env=_models(tmp_path), capture_output=True, text=True,
                       timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["acme/Fine-7B", "my-model", "mistral-7b-instruct-v0.2"]


@pytest.mark.skipif(shutil.which("fish") is None, reason="needs fish")
def test_model_names_in_fish(tmp_path):
    script = ROOT / "completions" / "mistral.fish"
    program = f"source '{script}'; " + "; ".join(
        f"complete -C'{line}'" for line in ("mistral info ac", "mistral info my", "mistral chat --model mistral-7b-i")
    )
    r = subprocess.run(["fish", "--no-config", "-c", program], env=_models(tmp_path), capture_output=True,
                       text=True, timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert [line.split("\t")[0] for line in r.stdout.splitlines()] == [
        "acme/Fine-7B", "my-model", "mistral-7b-instruct-v0.2",
    ]  # fmt: skip


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_the_bash_script_round_trip():
    # Source the checked-in script and press Tab the way bash does: COMP_WORDS/COMP_CWORD, then the function.
    program = (
        f"source '{ROOT / 'completions' / 'mistral.bash'}'\n"
        "COMP_WORDS=(mistral complete --max-t); COMP_CWORD=2; _mistral_completion mistral\n"
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    r = subprocess.run(["bash", "--norc", "-c", program], env=_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["--max-tokens"]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_show_and_install_completion_under_bash(tmp_path):
    mistral = shutil.which("mistral", path=str(BIN))
    if mistral is None:
        pytest.skip("the mistral console script is not installed next to this interpreter")
    env = _env(HOME=str(tmp_path))
    checked_in = (ROOT / "completions" / "mistral.bash").read_text(encoding="utf-8")
    body = "".join(line for line in checked_in.splitlines(keepends=True) if not line.startswith("# Generated"))
    # `; true` keeps bash as the parent process, which is how Typer detects the shell
    shown = subprocess.run(
        ["bash", "--norc", "-c", f"'{mistral}' --show-completion; true"], env=env, capture_output=True, text=True
    )
    assert shown.stdout == body, shown.stderr
    installed = subprocess.run(
        ["bash", "--norc", "-c", f"'{mistral}' --install-completion; true"], env=env, capture_output=True, text=True
    )
    assert "bash completion installed" in installed.stdout, installed.stderr
    assert (tmp_path / ".bash_completions" / "mistral.sh").read_text(encoding="utf-8") + "\n" == body
    assert "source" in (tmp_path / ".bashrc").read_text(encoding="utf-8")


@pytest.mark.skipif(shutil.which("fish") is None, reason="needs fish")
def test_the_fish_script_in_fish():
    # fish's own completion machinery (`complete -C` completes a command line) over the checked-in script
    script = ROOT / "completions" / "mistral.fish"
    program = f"source '{script}'; complete -C'mistral complete --max-t'; complete -C'mistral info --device '"
    r = subprocess.run(["fish", "--no-config", "-c", program], env=_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    offered = [line.split("\t")[0] for line in r.stdout.splitlines()]
    assert offered == ["--max-tokens", "auto", "cpu", "cuda", "mps"]


@pytest.mark.skipif(shutil.which("zsh") is None or shutil.which("tmux") is None, reason="needs zsh and tmux")
@pytest.mark.parametrize("how", ["checked-in", "installed"])
def test_zsh_completes_from_the_first_tab(tmp_path, how):
    """Tab in a real interactive zsh, with the checked-in _mistral in $fpath (as the wheel installs it) or after
    `mistral --install-completion` (~/.zfunc and ~/.zshrc); the first Tab of the session completes too."""
    if shutil.which("mistral", path=str(BIN)) is None:
        pytest.skip("the mistral console script is not installed next to this interpreter")
    from terminal import Tmux

    env = {**_models(tmp_path), "HOME": str(tmp_path), "TERM": "xterm-256color"}
    if how == "installed":
        r = subprocess.run(["zsh", "-f", "-c", "mistral --install-completion; true"], env=env, capture_output=True,
                           text=True, timeout=60)  # fmt: skip
        assert "zsh completion installed" in r.stdout, r.stderr
        setup = "PS1='> '"  # ~/.zshrc, as --install-completion wrote it, has set up completion
        shell = "zsh -i"
    else:
        setup = f"fpath=('{ROOT / 'completions'}' $fpath); autoload -U compinit; compinit -u -D; PS1='> '"
        shell = "zsh -f -i"
    t = Tmux(shell, env, tmp_path)
    try:
        t.type(setup)
        t.keys("Enter")
        t.wait(r"(?m)^> *$")  # the new prompt: the completion system is loaded and the line editor is reading
        t.type("mistral complete --max-t")
        t.keys("Tab")
        t.wait(r"> mistral complete --max-tokens ")
        t.keys("C-u")
        t.type("mistral info --device ")
        t.keys("Tab")
        screen = t.wait(r"cuda")
        assert {"auto", "cpu", "cuda", "mps"} <= set(screen.split())
        # model names: one on disk, an alias
        for line, completed in (
            ("mistral info ac", "mistral info acme/Fine-7B "),
            ("mistral chat --model mistral-7b-i", "mistral chat --model mistral-7b-instruct-v0.2 "),
        ):
            t.keys("C-u")
            t.type(line)
            t.keys("Tab")
            t.wait(f"> {re.escape(completed)}")
    finally:
        t.close()


@pytest.mark.skipif(shutil.which("zsh") is None, reason="needs zsh")
def test_zsh_descriptions_keep_their_apostrophes():
    """zsh evals what the completion hook prints; Typer's '' for an apostrophe vanished there ("a models weights")."""
    if shutil.which("mistral", path=str(BIN)) is None:
        pytest.skip("the mistral console script is not installed next to this interpreter")
    program = '_arguments() { print -r -- "$@" }; eval $(mistral)'
    env = _env(_MISTRAL_COMPLETE="complete_zsh", _TYPER_COMPLETE_ARGS="mistral ")
    r = subprocess.run(["zsh", "-f", "-c", program], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert '"info":"Show a model\'s architecture' in r.stdout, r.stdout


@pytest.mark.skipif(shutil.which("fish") is None, reason="needs fish")
def test_fish_install_follows_xdg_config_home(tmp_path):
    mistral = shutil.which("mistral", path=str(BIN))
    if mistral is None:
        pytest.skip("the mistral console script is not installed next to this interpreter")
    env = _env(HOME=str(tmp_path / "home"), XDG_CONFIG_HOME=str(tmp_path / "config"))
    r = subprocess.run(["fish", "--no-config", "-c", f"'{mistral}' --install-completion; true"], env=env,
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert "fish completion installed" in r.stdout, r.stderr
    script = tmp_path / "config" / "fish" / "completions" / "mistral.fish"
    assert "_MISTRAL_COMPLETE=complete_fish" in script.read_text(encoding="utf-8")
    assert not (tmp_path / "home" / ".config").exists()
