"""Our changes to Typer's shell completion for zsh and fish (bash uses Typer's as it is).

- Typer's zsh script only defines its function and registers it with `compdef`. That works when the script is
  sourced, but installed in $fpath (the wheel's site-functions folder, or ~/.zfunc) compinit autoloads it on the
  first Tab, which then only registers it and completes nothing. Ours also completes that first Tab.
- zsh ships a completion for OpenStack's clients (`_openstack`) that claims the command name `mistral` too (the
  OpenStack workflow service). compinit keeps the first claim in $fpath order, and Typer's `--install-completion`
  appends ~/.zfunc to $fpath, so OpenStack's wins and Tab answers with an error. Ours puts ~/.zfunc first.
- Typer's zsh completions write an apostrophe in a description as '' inside the single-quoted words zsh evals,
  where it vanishes ("a models weights"); ours writes it as '\\'', which zsh reads as one apostrophe.
- Typer's fish installer writes to ~/.config/fish whatever $XDG_CONFIG_HOME says, where fish reads
  $XDG_CONFIG_HOME/fish; ours follows the variable, and writes the file whole (atomic.py).

All go where Typer reads them (its zsh template, its zsh formatting, its installers), when it still has them;
otherwise Typer's own apply.
"""

from __future__ import annotations

from pathlib import Path

from mistral_cli import atomic

ZSH_SCRIPT = """
#compdef %(prog_name)s

%(complete_func)s() {
  eval $(env _TYPER_COMPLETE_ARGS="${words[1,$CURRENT]}" %(autocomplete_var)s=complete_zsh %(prog_name)s)
}

compdef %(complete_func)s %(prog_name)s
if [[ ${zsh_eval_context[-1]} == loadautofunc ]]; then
  %(complete_func)s "$@"
fi
"""
# ~/.zfunc before zsh's own completions, where _openstack also claims `mistral`
ZSHRC_LINE = "fpath=(~/.zfunc $fpath); autoload -Uz compinit; compinit"


def install_zsh(*, prog_name: str, complete_var: str, shell: str) -> Path:
    """`--install-completion` for zsh: the script into ~/.zfunc, and ZSHRC_LINE into ~/.zshrc once."""
    from typer._completion_shared import get_completion_script

    zshrc = Path.home() / ".zshrc"
    text = zshrc.read_text(encoding="utf-8") if zshrc.is_file() else ""
    if ZSHRC_LINE not in text:
        atomic.write_text(zshrc, f"{text.rstrip()}\n{ZSHRC_LINE}\n".lstrip())
    path = Path.home() / ".zfunc" / f"_{prog_name}"
    path.parent.mkdir(parents=True, exist_ok=True)
    script = get_completion_script(prog_name=prog_name, complete_var=complete_var, shell=shell)
    atomic.write_text(path, script + "\n")
    return path


def install_fish(*, prog_name: str, complete_var: str, shell: str) -> Path:
    """`--install-completion` for fish: the script into fish's completions folder under $XDG_CONFIG_HOME."""
    import os

    from typer._completion_shared import get_completion_script

    config = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    path = config / "fish" / "completions" / f"{prog_name}.fish"
    path.parent.mkdir(parents=True, exist_ok=True)
    script = get_completion_script(prog_name=prog_name, complete_var=complete_var, shell=shell)
    atomic.write_text(path, script + "\n")
    return path


def use_ours() -> None:
    """Put ZSH_SCRIPT and install_zsh where Typer reads them: the completion hook (`_MISTRAL_COMPLETE=source_zsh`),
    `--show-completion` and `--install-completion`."""
    from typer import _completion_classes, _completion_shared

    scripts = getattr(_completion_shared, "_completion_scripts", None)
    if not (hasattr(_completion_classes, "ZshComplete") and isinstance(scripts, dict)):
        return
    _completion_classes.ZshComplete.source_template = ZSH_SCRIPT
    typer_format = _completion_classes.ZshComplete.format_completion
    if not getattr(typer_format, "ours", False):

        def format_completion(self, item):  # type: ignore[no-untyped-def]
            return typer_format(self, item).replace("''", "'\\''")

        format_completion.ours = True  # type: ignore[attr-defined]
        _completion_classes.ZshComplete.format_completion = format_completion
    scripts["zsh"] = ZSH_SCRIPT
    if hasattr(_completion_shared, "install_zsh"):
        _completion_shared.install_zsh = install_zsh
    if hasattr(_completion_shared, "install_fish"):
        _completion_shared.install_fish = install_fish
