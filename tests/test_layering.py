"""The parts of the package import only downwards (docs/design.md, "The house"): the engine
knows neither torch nor the training code; the ops know nothing of training or evaluation;
Triton kernels know nothing of autograd; only the CLI knows click. Checked on the source, so
an import hidden inside a function counts too."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "sku_fast"

# part -> module prefixes it must never import (an entry forbids the module and its children)
FORBIDDEN = {
    "sku_fast/engine": ("torch", "transformers", "peft", "accelerate", "triton", "click",
                        "sku_fast.ops", "sku_fast.unlearn", "sku_fast.eval", "sku_fast.kernels",
                        "sku_fast.commands", "sku_fast.cli"),
    "sku_fast/ops": ("transformers", "peft", "accelerate", "click", "sku_fast.unlearn",
                     "sku_fast.eval", "sku_fast.commands", "sku_fast.cli", "sku_fast.engine"),
    "kernels": ("torch.autograd", "sku_fast.ops", "sku_fast.unlearn", "sku_fast.eval",
                "sku_fast.engine", "sku_fast.commands", "sku_fast.cli", "click"),
    "sku_fast/unlearn": ("click", "sku_fast.eval", "sku_fast.commands", "sku_fast.cli"),
    "sku_fast/eval": ("click", "sku_fast.commands", "sku_fast.cli"),
    "sku_fast/errors.py": ("torch", "numpy", "click", "sku_fast.engine", "sku_fast.ops",
                           "sku_fast.unlearn", "sku_fast.eval"),
}  # fmt: skip


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every import in a file, relative imports resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base]) if base else ".".join(parent)
            found.append((node.lineno, base))
            # `from sku_fast import ops` imports the submodule sku_fast.ops
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


def _violations(part: str, forbidden: tuple[str, ...]) -> list[str]:
    target = ROOT / part
    files = [target] if target.is_file() else sorted(target.rglob("*.py"))
    assert files, f"{part} has no Python files"
    bad = []
    for file in files:
        for line, module in imported_modules(file):
            for prefix in forbidden:
                if module == prefix or module.startswith(prefix + "."):
                    bad.append(f"{file.relative_to(ROOT)}:{line} imports {module}")
    return bad


@pytest.mark.parametrize("part", sorted(FORBIDDEN))
def test_part_imports_only_downwards(part):
    assert _violations(part, FORBIDDEN[part]) == []


def test_only_the_cli_knows_click():
    users = {
        str(file.relative_to(ROOT))
        for file in PACKAGE.rglob("*.py")
        if any(m == "click" or m.startswith("click.") for _, m in imported_modules(file))
    }
    assert users and all(
        u == "sku_fast/cli.py" or u.startswith("sku_fast/commands/") for u in users
    )


def test_the_check_sees_imports_inside_functions(tmp_path, monkeypatch):
    """The checker itself: a function-level torch import in an engine-like file is caught."""
    fake = tmp_path / "sku_fast" / "engine"
    fake.mkdir(parents=True)
    (fake / "x.py").write_text("def f():\n    import torch.nn\n    from ..ops import rows\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    assert _violations("sku_fast/engine", ("torch", "sku_fast.ops")) == [
        "sku_fast/engine/x.py:2 imports torch.nn",
        "sku_fast/engine/x.py:3 imports sku_fast.ops",
        "sku_fast/engine/x.py:3 imports sku_fast.ops.rows",
    ]
