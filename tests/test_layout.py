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


def test_public_maths_is_importable_from_the_top_level_package():
    import uprlhf
    from uprlhf.rl.penalties import penalize
    from uprlhf.selection.influence import influence_scores

    assert uprlhf.penalize is penalize and uprlhf.influence_scores is influence_scores
    for name in uprlhf.__all__:
        assert callable(getattr(uprlhf, name)), name


JOB_MODULES = sorted(p.stem for p in (ROOT / "jobs").glob("*.py") if p.stem not in ("__init__", "common"))


@pytest.mark.parametrize("layer", ["jobs", "tune"])
def test_no_job_or_sweep_module_imports_a_job_entry_point(layer):
    """Job entry points (python -m jobs.X) are leaves: what they share lives in jobs.drivers and jobs.common."""
    for path in (ROOT / layer).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            bad = [n for n in names if n.split(".")[:2] in [["jobs", j] for j in JOB_MODULES]]
            assert not bad, f"{path.relative_to(ROOT)} imports job entry point {bad}"
