"""The dependency rule (docs/ARCHITECTURE.md), checked on every module's imports, function-level ones included.

cli -> pipeline, trainer, bench -> schemas; bench may import pipeline and trainer; pipeline and trainer
never import each other; schemas imports neither torch, ray nor transformers (it is the on-disk contract).
Inside the folders: no import circle between any two modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("schemas", "pipeline", "trainer", "cli", "bench")
FORBIDDEN = {
    "schemas": {
        "olavlm.pipeline",
        "olavlm.trainer",
        "olavlm.cli",
        "olavlm.bench",
        "torch",
        "ray",
        "transformers",
    },
    "pipeline": {"olavlm.trainer", "olavlm.cli", "olavlm.bench"},
    "trainer": {"olavlm.pipeline", "olavlm.cli", "olavlm.bench"},
    "bench": {"olavlm.cli"},
    "cli": set(),
}


def module_name(path: Path, root: Path = ROOT) -> str:
    """`trainer/data/loader.py` -> `olavlm.trainer.data.loader` (a package's `__init__.py` -> the package)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    return "olavlm." + ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, name: str, known: set[str] = frozenset()) -> set[str]:
    """Absolute names of every module that module `name` (file `path`) imports, anywhere in it.

    Relative imports are resolved from the module's own package; `from pkg import leaf` also names
    `pkg.leaf` when that is one of the `known` modules.
    """
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rsplit(".", 1)[0]
            module = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
            names.add(module)
            names.update(f"{module}.{a.name}" for a in node.names if f"{module}.{a.name}" in known)
    return names


def modules() -> dict[str, Path]:
    return {
        module_name(path): path for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))
    }


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_point_one_way(package):
    broken = []
    for name, path in modules().items():
        if name.split(".")[1] != package:
            continue
        for imported in sorted(imports(path, name)):
            if any(imported == bad or imported.startswith(bad + ".") for bad in FORBIDDEN[package]):
                broken.append(f"{path.relative_to(ROOT)} imports {imported}")
    assert not broken, "\n".join(broken)


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_circle_between_any_two_modules():
    found = modules()
    known = set(found)
    graph = {name: (imports(path, name, known) & known) - {name} for name, path in found.items()}
    assert import_cycles(graph) == []


def test_the_cycle_finder_finds_a_circle_through_three_modules():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert import_cycles(graph) == [["a", "b", "c"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []


def test_the_checker_sees_lazy_and_relative_imports(tmp_path):
    package = tmp_path / "schemas" / "sub"
    package.mkdir(parents=True)
    source = package / "m.py"
    source.write_text(
        "def f():\n    import torch\n    from ...trainer import model\n    from . import cache\n"
        "    from .. import spec\n"
    )
    name = module_name(source, tmp_path)
    assert name == "olavlm.schemas.sub.m"
    known = {"olavlm.schemas.sub.cache", "olavlm.trainer.model"}
    assert imports(source, name, known) == {
        "torch",
        "olavlm.trainer",
        "olavlm.trainer.model",
        "olavlm.schemas.sub",
        "olavlm.schemas.sub.cache",
        "olavlm.schemas",
    }
