"""The layering of the package (README, "Architecture"), read from the source: which subpackage may import which,
a network of plain torch, and no terminal output below the command line."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "mistral_cli"
BASE = {"errors", "options", "hardware", "atomic", "userfiles"}  # torch-free basics every layer may use
# What each layer may import from the package, besides itself; the command line (cli/) may import everything.
ALLOWED = {
    "errors": set(),
    "options": {"errors"},
    "hardware": set(),
    "atomic": set(),
    "userfiles": {"errors"},
    "text": BASE,
    "model": BASE,
    "hub": BASE | {"model"},
    "native": BASE | {"model"},
    "engine": BASE | {"model", "native", "text"},
    "remote": BASE | {"text", "engine"},
    "serve": BASE | {"engine", "text"},
}
NETWORK = ("model/transformer.py", "model/cache.py", "model/config.py")


def _layer(path: Path) -> str:
    part = path.relative_to(PACKAGE).parts[0]
    return part.removesuffix(".py")


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every import of the file, relative ones resolved."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.lineno, node.module))
    return found


def _sources() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__main__.py")


def test_each_layer_imports_only_the_layers_below_it():
    wrong = []
    for path in _sources():
        layer = _layer(path)
        if layer in ("cli", "__init__"):
            continue
        for line, module in _imports(path):
            if module.startswith("mistral_cli."):
                target = module.split(".")[1]
                if target != layer and target not in ALLOWED[layer]:
                    wrong.append(f"{path.relative_to(PACKAGE)}:{line} imports {module}")
    assert wrong == []


def test_the_network_is_plain_torch():
    """model/transformer.py and what it builds on: no C binding, no terminal, no command line."""
    for name in NETWORK:
        modules = {m for _, m in _imports(PACKAGE / name)}
        assert not {m for m in modules if m.split(".")[0] in ("ctypes", "rich", "typer", "click")}, name
        assert not {m for m in modules if m.startswith(("mistral_cli.native", "mistral_cli.cli", "mistral_cli.hub"))}
    code = (
        "import sys; import mistral_cli.model.transformer; "
        "print(sorted(m for m in sys.modules if m.startswith(('mistral_cli.native', 'mistral_cli.cli', 'rich'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _writes(path: Path) -> list[str]:
    """Calls that write to the terminal (print, sys.stdout/stderr, Rich), outside an `if __name__ == "__main__"`."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    main_blocks = [
        node
        for node in tree.body
        if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test) and "__name__" in ast.unparse(node.test)
    ]
    inside = {id(n) for block in main_blocks for n in ast.walk(block)}
    found = []
    for node in ast.walk(tree):
        if id(node) in inside:
            continue
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
            found.append(f"{path.name}:{node.lineno} print()")
        elif isinstance(node, ast.Attribute) and node.attr in ("stdout", "stderr") and ast.unparse(node.value) == "sys":
            found.append(f"{path.name}:{node.lineno} sys.{node.attr}")
    found += [f"{path.name}:{line} imports {m}" for line, m in _imports(path) if m.split(".")[0] == "rich"]
    return found


@pytest.mark.parametrize(
    "layer",
    [
        "model",
        "native",
        "engine",
        "text",
        "remote",
        "serve",
        "options.py",
        "errors.py",
        "hardware.py",
        "atomic.py",
        "userfiles.py",
    ],
)
def test_below_the_command_line_nothing_writes_to_the_terminal(layer):
    """The engine yields tokens and never prints; the command line owns all terminal I/O."""
    root = PACKAGE / layer
    paths = [root] if root.is_file() else sorted(root.rglob("*.py"))
    assert [w for p in paths for w in _writes(p)] == []


def test_the_command_line_starts_without_torch():
    code = "import sys; import mistral_cli.cli.app; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_the_readme_describes_every_module():
    """README's "Architecture" section names each module of the tree (and nothing that is gone)."""
    readme = (PACKAGE.parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Architecture") :]
    modules = {p.name for p in PACKAGE.rglob("*.py") if p.name not in ("__init__.py", "__main__.py")}
    modules |= {p.name for p in PACKAGE.rglob("*.c")}
    missing = sorted(name for name in modules if f"`{name}`" not in section)
    assert missing == []
    named = set(re.findall(r"`([a-z_]+\.(?:py|c))`", section))
    assert named - modules <= {"__init__.py", "bench.py"}, named - modules
