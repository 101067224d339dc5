"""Dependency metadata: the locks equal the declared dependencies' closure, the extras table matches
pyproject.toml, and a wheel installed into a clean venv with only the runtime lock runs `ola`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import venv
from pathlib import Path

import pytest

from olavlm.schemas.errors import ConfigError
from olavlm.schemas.extras import EXTRAS, require
from tests import _locks

ROOT = Path(__file__).resolve().parents[1]


def test_locks_are_the_closure_of_the_declared_dependencies():
    for path, lines in _locks.compute().items():
        assert path.read_text() == _locks.render(path, lines), (
            f"{path.name} is stale: .venv/bin/python -m tests._locks"
        )
    runtime, dev = _locks.read_lock(_locks.RUNTIME), _locks.read_lock(_locks.DEV)
    assert {"torch", "ray", "transformers", "zarr", "scikit-image"} <= set(runtime)
    assert {"pytest", "ruff", "moto", "s3fs"} <= set(dev) and not set(runtime) & set(dev)


def test_extras_table_matches_pyproject():
    project = _locks._project()
    optional = {
        extra: {line.split(">")[0].split("=")[0].split("[")[0] for line in lines}
        for extra, lines in project["optional-dependencies"].items()
    }
    base = {line.split(">")[0].split("=")[0].split("[")[0] for line in project["dependencies"]}
    for module, (distribution, extra) in EXTRAS.items():
        assert distribution in optional[extra], (module, extra)
        assert distribution not in base, f"{distribution} is both a dependency and in the {extra!r} extra"
    listed = {(d, e) for d, e in EXTRAS.values()}
    for extra, names in optional.items():
        if extra != "dev":
            assert {(name, extra) for name in names} <= listed, f"extra {extra!r} not in schemas/extras.py"


def test_require_names_the_extra_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "skimage.data", None)  # the import fails as if not installed
    with pytest.raises(
        ConfigError,
        match=r"the demo corpus needs the `scikit-image` package: "
        r"pip install 'olavlm\[demo\]'",
    ):
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


def _run(args: list[str], env: dict, cwd: Path, timeout: int) -> subprocess.CompletedProcess:
    done = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(args)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_wheel_installs_into_a_clean_venv_and_runs(tmp_path):
    """The wheel (pip wheel, as `python -m build --wheel` makes it), installed with only
    requirements-lock.txt (torch first, as make install does) into a venv without system site
    packages: `pip check`, then `ola --help`, `ola corpus demo`, `ola precompute --preset tiny`.
    Measured 1 min 54 s on 2 loaded cores (load 5-7), most of it installing torch, ray, pyarrow, scipy."""
    timings = {}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(
        HF_HUB_OFFLINE="1",
        RAY_AUTH_MODE="disabled",
        RAY_USAGE_STATS_ENABLED="0",
        OLAVLM_TEACHERS_DIR=str(tmp_path / "teachers"),
        TOKENIZERS_PARALLELISM="false",
    )
    start = time.perf_counter()
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(ROOT),
        ],
        env,
        tmp_path,
        300,
    )
    (wheel,) = (tmp_path / "dist").glob("olavlm-*.whl")
    timings["wheel_s"] = time.perf_counter() - start

    start = time.perf_counter()
    venv.create(tmp_path / "venv", with_pip=True, system_site_packages=False)
    python, ola = tmp_path / "venv" / "bin" / "python", tmp_path / "venv" / "bin" / "ola"
    pip = [str(python), "-m", "pip", "install", "-q", "--no-compile"]  # .pyc of the imported modules only
    _run([*pip, "torch==2.13.0"], env, tmp_path, 600)
    _run([*pip, "--no-deps", "-r", str(_locks.RUNTIME)], env, tmp_path, 900)
    _run([*pip, "--no-deps", str(wheel)], env, tmp_path, 300)
    _run([str(python), "-m", "pip", "check"], env, tmp_path, 120)
    timings["venv_s"] = time.perf_counter() - start
    dev_only = [
        n
        for n in ("pytest", "ruff", "moto", "s3fs")
        if any((tmp_path / "venv").glob(f"lib/python*/site-packages/{n}"))
    ]
    assert not dev_only, f"dev packages in the runtime venv: {dev_only}"

    start = time.perf_counter()
    assert "precompute" in _run([str(ola), "--help"], env, tmp_path, 120).stdout
    _run([str(ola), "corpus", "demo", "corpus", "--samples", "8", "--shard-size", "4"], env, tmp_path, 300)
    done = _run(
        [str(ola), "precompute", "corpus", "cache", "--preset", "tiny", "--json", "--no-progress"],
        env,
        tmp_path,
        600,
    )
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["shards"] == 2 and summary["images"] == 8 and summary["errors"] == 0, summary
    assert (tmp_path / "cache").is_dir()
    timings["commands_s"] = time.perf_counter() - start
    print("wheel test timings:", {k: round(v, 1) for k, v in timings.items()})
