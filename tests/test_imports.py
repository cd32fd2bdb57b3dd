"""Imports flow one way (DESIGN.md): ``orchestration -> pipelines -> datagen`` and
``orchestration -> training -> model``. The bridge between the halves is ``datagen.schema``,
``datagen.shards`` and ``datagen.cameras``, the scene format readers (``onegen eval`` reads
GSO / CO3D renders with them) and the face check's detector (its ID scores); ``model/`` is plain PyTorch.

Checked on the source with ``ast``, so function-level (lazy) imports count too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TRAINING_MAY_USE = {
    "datagen.schema",
    "datagen.shards",
    "datagen.cameras",
    "datagen.sources.scenes.formats",
    "datagen.sources.base",
    "datagen.stages.models.face",
}


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


PACKAGES = ("common", "datagen", "pipelines", "orchestration", "training", "model")
# Who may import whom: each layer only downwards (DESIGN.md). ``common`` is the neutral floor.
MAY_IMPORT = {
    "common": set(),
    "model": {"common"},
    "datagen": {"common"},
    "pipelines": {"common", "datagen"},
    "training": {"common", "datagen", "model"},
    "orchestration": {"common", "datagen", "pipelines", "training", "model"},
}


def _project_graph(root: Path | None = None) -> dict[str, set[str]]:
    """project module -> the project modules it imports (lazy imports included). ``from a
    import b`` is an edge to ``a.b`` when that is a module, else to ``a`` (its ``__init__``).
    A package's ``__init__`` running before its submodules is Python's doing, not an edge."""
    root = root or REPO
    files = [
        p for pkg in PACKAGES if (root / pkg).is_dir() for p in sorted((root / pkg).rglob("*.py"))
    ]
    modules = {_module_name_in(root, p): p for p in files}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = set()
        for _, dotted in _imported_in(root, path):
            while dotted and dotted not in modules:
                dotted = dotted.rpartition(".")[0]
            if dotted and dotted != name:
                deps.add(dotted)
        graph[name] = deps
    return graph


def _module_name_in(root: Path, path: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported_in(root: Path, path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    name = _module_name_in(root, path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
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
    return circles


def test_no_module_of_the_project_imports_itself_through_a_circle():
    assert _circles(_project_graph()) == []


def test_imports_only_point_down_the_layers():
    upward = [
        f"{module} imports {dep}"
        for module, deps in _project_graph().items()
        for dep in sorted(deps)
        if _top(dep) != _top(module) and _top(dep) not in MAY_IMPORT[_top(module)]
    ]
    assert upward == []


def test_the_circle_check_sees_circles_through_a_package_init(tmp_path):
    """The checker itself: a submodule importing its package's ``__init__``, which imports
    the submodule back, is a circle; importing a sibling module is not."""
    pkg = tmp_path / "datagen" / "sources"
    pkg.mkdir(parents=True)
    (tmp_path / "datagen" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("from datagen.sources.folders import image_folder\n")
    (pkg / "base.py").write_text("X = 1\n")
    (pkg / "folders.py").write_text("from datagen.sources.base import X\n")
    assert _circles(_project_graph(tmp_path)) == []
    (pkg / "base.py").write_text("def f():\n    from datagen.sources import image_folder\n")
    assert _circles(_project_graph(tmp_path)) == [
        ["datagen.sources", "datagen.sources.folders", "datagen.sources.base", "datagen.sources"]
    ]
