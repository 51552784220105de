"""The packages of segx form layers: a module imports only from its own layer or the ones below it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SEGX = Path(__file__).resolve().parents[1] / "segx"
LAYERS = ["core", "runs", "tracking", "data", "models", "metrics", "inference", "training", "search", "report", "bench",
          "cli"]


def _layer(module: str) -> int:
    parts = module.split(".")
    if len(parts) < 2 or parts[0] != "segx" or parts[1] not in LAYERS:
        raise AssertionError(f"{module} is in no layer: add its package to LAYERS")
    return LAYERS.index(parts[1])


def _imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("segx"):
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.startswith("segx")]
    return found


MODULES = sorted(p for p in SEGX.rglob("*.py") if p.parent != SEGX)


def test_segx_top_level_holds_only_packages():
    loose = sorted(p.name for p in SEGX.glob("*.py") if p.name != "__init__.py")
    assert loose == [], f"modules outside a layer package: {loose}"
    assert sorted(p.name for p in SEGX.iterdir() if p.is_dir() and (p / "__init__.py").exists()) == sorted(LAYERS)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.relative_to(SEGX).as_posix())
def test_imports_point_down(path: Path):
    own = _layer("segx." + path.relative_to(SEGX).parts[0])
    upward = [f"line {line}: {module}" for line, module in _imports(path) if _layer(module) > own]
    assert upward == [], f"{path.relative_to(SEGX)} imports from a higher layer: {upward}"
