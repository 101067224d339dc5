"""The two locks, computed from pyproject.toml and the installed packages' metadata.

requirements-lock.txt       olavlm[demo]'s dependency closure: what `ola` and `make demo` run on
requirements-dev-lock.txt   the rest of olavlm[dev]'s closure: test, lint and build tools, s3fs, moto

Each dependency is followed through the installed distributions' own requirements (markers
evaluated for this interpreter, extras followed), so a lock holds exactly what the declared
dependencies pull in: a package the code imports but pyproject does not declare is missing from
the runtime lock, and the wheel test (test_packaging.py), which installs only that lock, fails.
Cost: the installed environment must hold every package (make install does); requirements that
apply only to other Pythons (a `python_version` marker) are kept from the current lock, with their
marker, since nothing here can resolve them.

Regenerate after changing dependencies: `.venv/bin/python -m tests._locks` (writes both files);
test_packaging.py fails while they differ from what this computes.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
RUNTIME, DEV = ROOT / "requirements-lock.txt", ROOT / "requirements-dev-lock.txt"
HEADERS = {
    RUNTIME: "olavlm[demo]'s dependency closure (tests/_locks.py): make install and the wheel test install it\n"
    "# with --no-deps after torch, which comes first and pinned (Makefile).",
    DEV: "the rest of olavlm[dev]'s dependency closure (tests/_locks.py): test and lint tools, s3fs, moto.",
}
OTHER_PYTHONS = {"python_version": "3.10", "python_full_version": "3.10.0"}
"""The oldest Python that requires-python allows: requirements only it needs keep their marker line."""


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _requirements(name: str, extra: str) -> list[Requirement]:
    """The requirements `name` declares for `extra` ('' = its base), olavlm's read from pyproject.toml."""
    if canonicalize_name(name) == "olavlm":
        project = _project()
        lines = project["dependencies"] if not extra else project["optional-dependencies"][extra]
        return [Requirement(line) for line in lines]
    return [Requirement(line) for line in metadata.requires(name) or []]


def _marker_line(req: Requirement, version: str | None, current: dict[str, str]) -> str | None:
    """The lock line of a requirement whose marker is false here but true on another allowed Python."""
    if not req.marker.evaluate({**OTHER_PYTHONS, "extra": ""}):
        return None
    name = canonicalize_name(req.name)
    if version is None:
        kept = current.get(name)
        return kept if kept and ";" in kept else None
    return f"{name}=={version} ; {req.marker}"


def closure(roots: list[tuple[str, str]], current: dict[str, str]) -> dict[str, str]:
    """canonical name -> lock line for everything `roots` [(distribution, extra)] pull in."""
    lines: dict[str, str] = {}
    todo, seen = list(roots), set()
    while todo:
        name, extra = todo.pop()
        if (canonicalize_name(name), extra) in seen:
            continue
        seen.add((canonicalize_name(name), extra))
        for req in _requirements(name, extra):
            dep = canonicalize_name(req.name)
            try:
                version = metadata.version(req.name).split("+")[0]  # 2.13.0+cpu -> 2.13.0
            except metadata.PackageNotFoundError:
                version = None
            if req.marker is not None and not req.marker.evaluate({"extra": extra}):
                line = _marker_line(req, version, current)
                if line:
                    lines.setdefault(dep, line)
                continue
            if dep != "olavlm":
                if version is None:
                    raise SystemExit(f"{name} needs {req}, which is not installed: run make install first")
                lines[dep] = f"{dep}=={version}"
            todo.extend([(req.name, "")] + [(req.name, e) for e in req.extras])
    lines.pop("olavlm", None)
    return lines


def read_lock(path: Path) -> dict[str, str]:
    """canonical name -> line, comments dropped."""
    if not path.exists():
        return {}
    lines = [line.strip() for line in path.read_text().splitlines()]
    return {
        canonicalize_name(re.split(r"[=<>; ]", line, maxsplit=1)[0]): line
        for line in lines
        if line and not line.startswith("#")
    }


def compute() -> dict[Path, dict[str, str]]:
    current = {**read_lock(DEV), **read_lock(RUNTIME)}
    runtime = closure([("olavlm", ""), ("olavlm", "demo")], current)
    dev = closure([("olavlm", "dev")], current)
    return {RUNTIME: runtime, DEV: {n: line for n, line in dev.items() if n not in runtime}}


def render(path: Path, lines: dict[str, str]) -> str:
    return f"# {HEADERS[path]}\n# Regenerate: .venv/bin/python -m tests._locks\n" + "".join(
        line + "\n" for _, line in sorted(lines.items())
    )


if __name__ == "__main__":
    for path, lines in compute().items():
        path.write_text(render(path, lines))
        print(f"{path.name}: {len(lines)} packages", file=sys.stderr)
