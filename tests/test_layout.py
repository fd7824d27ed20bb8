"""Imports point inward only: tune → jobs → actors → uprlhf; the library never imports Ray."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["uprlhf", "actors", "jobs", "tune"]


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("layer", LAYERS)
def test_layer_imports_only_inner_layers(layer):
    outer = set(LAYERS[LAYERS.index(layer) + 1 :])
    for path in (ROOT / layer).rglob("*.py"):
        assert not (_imports(path) & outer), f"{path.relative_to(ROOT)} imports an outer layer"


def test_library_never_imports_ray():
    for path in (ROOT / "uprlhf").rglob("*.py"):
        assert "ray" not in _imports(path), f"{path.relative_to(ROOT)} imports ray"
