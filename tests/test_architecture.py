"""The layering the tree promises: the adapter core never imports the trainer or the
command line, and plugins use only the library's public modules."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lora_anywhere"
CORE = sorted(p for p in PACKAGE.glob("*.py") if p.name != "__init__.py") + sorted((PACKAGE / "rules").glob("*.py"))


def imported_modules(path: Path) -> set[str]:
    """Absolute names of every module `path` imports, relative imports resolved."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join([*base, node.module] if node.module else base)
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("path", CORE, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_the_core_imports_neither_training_nor_cli(path: Path) -> None:
    bad = sorted(n for n in imported_modules(path) if n.startswith(("lora_anywhere.training", "lora_anywhere.cli")))
    assert not bad, f"{path.name} imports {bad}"


def test_training_never_imports_the_cli() -> None:
    for path in (PACKAGE / "training").glob("*.py"):
        assert not [n for n in imported_modules(path) if n.startswith("lora_anywhere.cli")], path.name


def test_plugins_use_public_modules_only() -> None:
    public = ("lora_anywhere", "lora_anywhere.rule", "lora_anywhere.rules.torch_nn", "lora_anywhere.testing")
    for path in (ROOT / "plugins").rglob("*.py"):
        ours = {n for n in imported_modules(path) if n.split(".")[0] == "lora_anywhere"}
        private = sorted(n for n in ours if not any(n == p or n.startswith(p + ".") and n.count(".") == p.count(".") + 1 for p in public))
        assert not private, f"{path.relative_to(ROOT)} imports {private}"
