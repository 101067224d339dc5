"""Dependency metadata: the locks equal the declared dependencies' closure, the extras table matches
pyproject.toml."""

from __future__ import annotations

import sys

import pytest

from olavlm.schemas.errors import ConfigError
from olavlm.schemas.extras import EXTRAS, require
from tests import _locks


def test_locks_are_the_closure_of_the_declared_dependencies():
    for path, lines in _locks.compute().items():
        assert path.read_text() == _locks.render(path, lines), f"{path.name} is stale: .venv/bin/python -m tests._locks"
    runtime, dev = _locks.read_lock(_locks.RUNTIME), _locks.read_lock(_locks.DEV)
    assert {"torch", "ray", "transformers", "zarr", "scikit-image"} <= set(runtime)
    assert {"pytest", "ruff", "moto", "s3fs"} <= set(dev) and not set(runtime) & set(dev)


def test_extras_table_matches_pyproject():
    project = _locks._project()
    optional = {extra: {line.split(">")[0].split("=")[0].split("[")[0] for line in lines}
                for extra, lines in project["optional-dependencies"].items()}
    base = {line.split(">")[0].split("=")[0].split("[")[0] for line in project["dependencies"]}
    for module, (distribution, extra) in EXTRAS.items():
        assert distribution in optional[extra], (module, extra)
        assert distribution not in base, f"{distribution} is both a dependency and in the {extra!r} extra"
    listed = {(d, e) for d, e in EXTRAS.values()}
    for extra, names in optional.items():
        if extra != "dev":
            assert {(name, extra) for name in names} <= listed, f"extra {extra!r} not in schemas/extras.py"


def test_require_names_the_extra_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "skimage", None)  # `import skimage...` fails as if not installed
    with pytest.raises(ConfigError, match=r"the demo corpus needs the `scikit-image` package: "
                                          r"pip install 'olavlm\[demo\]'"):
        require("skimage.data", "the demo corpus")
    monkeypatch.setitem(sys.modules, "not_an_extra", None)
    with pytest.raises(ImportError):  # a module that is no extra is a bug, not a user error
        require("not_an_extra", "x")


def test_ola_corpus_demo_without_the_demo_extra_is_one_red_line(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from olavlm.cli.app import app

    monkeypatch.setitem(sys.modules, "skimage.data", None)
    result = CliRunner().invoke(app, ["corpus", "demo", str(tmp_path / "demo"), "--samples", "4"])
    assert result.exit_code == 2 and "pip install 'olavlm[demo]'" in result.output, result.output
    assert "Traceback" not in result.output
