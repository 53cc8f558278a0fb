"""The house's import plan: arrows point one way, no loop, no private Ray module."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# What each pipeline package may import of the others (README's folder table).
ALLOWED = {
    "core": set(),
    "data": {"core"},
    "token_cache": {"core", "data"},
    "generation": {"core", "data"},
    "evaluation": {"core", "data", "generation"},
    "train": {"core", "data", "token_cache", "generation", "evaluation"},
    "chain": {"core", "data", "token_cache", "generation", "train", "evaluation"},
}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_pipeline_packages_import_only_downwards():
    wrong = []
    for path in sorted((REPO / "pipeline").rglob("*.py")):
        package = path.relative_to(REPO / "pipeline").parts[0]
        if package.endswith(".py"):
            continue
        for module in _imports(path):
            parts = module.split(".")
            if parts[0] == "pipeline" and len(parts) > 1 and parts[1] != package and parts[1] not in ALLOWED[package]:
                wrong.append(f"{path.relative_to(REPO)} imports {module}")
    assert wrong == []
    assert set(ALLOWED) == {path.name for path in (REPO / "pipeline").iterdir() if path.is_dir()
                            and path.name != "__pycache__"}


def test_var_model_knows_no_cluster_and_nothing_imports_ray_internals():
    for path in sorted((REPO / "var_model").rglob("*.py")):
        for module in _imports(path):
            top = module.split(".")[0]
            assert top in {"torch", "numpy", "var_model"} or top in sys.stdlib_module_names, \
                f"{path.relative_to(REPO)} imports {module}"
    for path in sorted((REPO / "pipeline").rglob("*.py")):
        assert not [module for module in _imports(path) if module.startswith("ray") and ("._internal" in module or "._private" in module)], path
