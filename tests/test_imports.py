"""Imports flow one way (DESIGN.md): ``orchestration -> pipelines -> datagen`` and
``orchestration -> training -> model``. The bridge between the halves is ``datagen.schema``,
``datagen.shards`` and ``datagen.cameras``; ``model/`` is plain PyTorch.

Checked on the source with ``ast``, so function-level (lazy) imports count too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TRAINING_MAY_USE = {"datagen.schema", "datagen.shards", "datagen.cameras"}


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """``(line, dotted module)`` of every import in a file, ``from a import b`` counted as
    ``a.b`` (``b`` may be a module or a name in ``a``: both are checked as prefixes)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the file's package
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


def _files(folder: str) -> list[Path]:
    files = sorted((REPO / folder).rglob("*.py"))
    assert files, folder
    return files


def _top(module: str) -> str:
    return module.split(".", 1)[0]


def _violations(folder: str, allowed) -> list[str]:
    return [
        f"{path.relative_to(REPO)}:{line}: imports {module}"
        for path in _files(folder)
        for line, module in imported_modules(path)
        if not allowed(module)
    ]


def _training_allows(module: str) -> bool:
    if _top(module) in ("pipelines", "orchestration"):
        return False
    if _top(module) == "datagen":
        return any(module == m or module.startswith(f"{m}.") for m in TRAINING_MAY_USE)
    return True


def _model_allows(module: str) -> bool:
    banned = ("lightning", "pytorch_lightning", "ray", "training", "datagen", "pipelines")
    return _top(module) not in (*banned, "orchestration")


def test_training_imports_only_the_bridge_from_datagen_and_nothing_from_pipelines():
    assert _violations("training", _training_allows) == []


def test_model_imports_neither_lightning_nor_ray_nor_the_upper_layers():
    assert _violations("model", _model_allows) == []


@pytest.mark.parametrize(
    ("source", "allowed"),
    [
        ("from datagen.shards import ShardReader", True),
        ("from datagen import shards, schema", True),
        ("import datagen.cameras", True),
        ("from datagen import sources", False),
        ("from datagen.io import read_bytes", False),
        ("import datagen", False),
        ("from pipelines.dag import flat_params", False),
        ("def f():\n    from orchestration import cli", False),
    ],
)
def test_the_check_sees_what_it_should(tmp_path, monkeypatch, source, allowed):
    """The checker itself: lazy imports, ``from package import module`` and bare packages."""
    folder = tmp_path / "training"
    folder.mkdir()
    (folder / "x.py").write_text(source + "\n")
    monkeypatch.setattr(f"{__name__}.REPO", tmp_path)
    assert (_violations("training", _training_allows) == []) is allowed


def _project_imports(path: Path) -> list[tuple[int, str, str]]:
    """``(line, module, name)`` of every ``from <project module> import <name>``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        project = ("datagen", "pipelines", "orchestration", "training", "model")
        if (
            isinstance(node, ast.ImportFrom)
            and not node.level
            and _top(node.module or "") in project
        ):
            found += [(node.lineno, node.module, a.name) for a in node.names]
    return found


def test_no_private_names_are_imported_across_modules():
    """A ``_name`` is its module's own business: no other module imports it."""
    bad = [
        f"{path.relative_to(REPO)}:{line}: from {module} import {name}"
        for folder in ("training", "model", "datagen", "pipelines", "orchestration")
        for path in _files(folder)
        for line, module, name in _project_imports(path)
        if name.startswith("_") and not name.startswith("__")
    ]
    assert bad == []


def _training_graph() -> dict[str, set[str]]:
    """training module -> the training modules it imports (lazy imports included)."""
    graph: dict[str, set[str]] = {}
    names = {p.stem for p in _files("training")}
    for path in _files("training"):
        deps = set()
        for _, module in imported_modules(path):
            parts = module.split(".")
            if parts[0] == "training" and len(parts) > 1:
                deps.add(parts[1] if parts[1] in names else "")
        graph[path.stem] = {d for d in deps if d and d != path.stem}
    return graph


def test_training_modules_import_each_other_without_a_circle():
    graph = _training_graph()
    state: dict[str, int] = {}
    circles: list[list[str]] = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                circles.append([*trail[trail.index(dep) :], dep])
            elif dep not in state:
                visit(dep, [*trail, dep])
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    assert circles == []
