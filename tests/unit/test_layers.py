"""The project's layers import downwards only: models <- loom <- tasks <- flows <- app.

A module may import its own layer and the ones below it; an import of a layer above, even one deferred into
a function, is a dependency cycle waiting to happen and is refused here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from loom.config import PROJECT_ROOT

LAYERS = ("models", "loom", "tasks", "flows", "app")


def imported_packages(path: Path) -> set[str]:
    """Top-level names of every import in a file, at module level or inside functions."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("layer", LAYERS[:-1])
def test_no_module_imports_a_layer_above_its_own(layer: str) -> None:
    above = set(LAYERS[LAYERS.index(layer) + 1 :])
    offenders = {
        str(path.relative_to(PROJECT_ROOT)): sorted(imported_packages(path) & above)
        for path in sorted((PROJECT_ROOT / layer).rglob("*.py"))
        if imported_packages(path) & above
    }
    assert not offenders, f"{layer}/ imports a layer above it: {offenders}"


def test_the_check_sees_a_deferred_import(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from flows.flywheel import flywheel_round\n    import tasks.train\n")
    assert imported_packages(module) == {"flows", "tasks"}
