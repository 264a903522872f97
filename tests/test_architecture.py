"""The shape of the package: engine without matplotlib or ipywidgets, render without torch,
widgets without torch (their maths lives in the engine)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "cnnwidgets"

FORBIDDEN = {
    "engine": {"matplotlib", "ipywidgets", "ipympl", "traitlets", "IPython"},
    "render": {"torch", "torchvision", "ipywidgets", "ipympl", "traitlets"},
    "widgets": {"torch", "torchvision"},
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports(layer):
    files = sorted((PACKAGE / layer).rglob("*.py"))
    assert files, f"no files under cnnwidgets/{layer}"
    bad = {str(f.relative_to(PACKAGE)): sorted(_imports(f) & FORBIDDEN[layer]) for f in files}
    bad = {k: v for k, v in bad.items() if v}
    assert not bad, f"cnnwidgets/{layer} must not import {sorted(FORBIDDEN[layer])}: {bad}"


def test_engine_imports_without_matplotlib():
    import subprocess
    import sys

    code = ("import sys, cnnwidgets as cw; cw.load_image; "
            "bad = [m for m in ('matplotlib', 'ipywidgets') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=PACKAGE.parent)
