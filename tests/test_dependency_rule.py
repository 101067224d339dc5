"""The dependency rule of design.md, checked on every module's imports (function-level ones included).

cli -> pipeline, trainer, bench -> schemas; bench may import pipeline and trainer; pipeline and trainer
never import each other; schemas imports neither torch, ray nor transformers (it is the on-disk contract).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("schemas", "pipeline", "trainer", "cli", "bench")
FORBIDDEN = {
    "schemas": {"olavlm.pipeline", "olavlm.trainer", "olavlm.cli", "olavlm.bench", "torch", "ray", "transformers"},
    "pipeline": {"olavlm.trainer", "olavlm.cli", "olavlm.bench"},
    "trainer": {"olavlm.pipeline", "olavlm.cli", "olavlm.bench"},
    "bench": {"olavlm.cli"},
    "cli": set(),
}


def imports(path: Path, package: str) -> set[str]:
    """Absolute names of every module `path` imports, anywhere in it (relative imports resolved)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = f"olavlm.{package}" if node.level == 1 else "olavlm"
                module = f"{base}.{node.module}" if node.module else base
                names.update([module] if node.module else [f"{base}.{a.name}" for a in node.names])
            else:
                names.add(node.module)
    return names


def modules():
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            yield package, path


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_point_one_way(package):
    broken = []
    for pkg, path in modules():
        if pkg != package:
            continue
        for name in sorted(imports(path, pkg)):
            if any(name == bad or name.startswith(bad + ".") for bad in FORBIDDEN[pkg]):
                broken.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not broken, "\n".join(broken)


def test_the_checker_sees_lazy_and_relative_imports(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n    import torch\n    from ..trainer import model\n    from . import cache\n")
    assert imports(source, "schemas") == {"torch", "olavlm.trainer", "olavlm.schemas.cache"}
