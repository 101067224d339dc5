"""The house rules a newcomer relies on, checked on the tree (docs/ARCHITECTURE.md, "Reading the code").

Small rooms (at most 16 modules a folder, 450 lines a file), short module docstrings that say what a
module is for (at most 25 lines; docstrings under 15 % of the code), no history or figures in code
(issue numbers, ISO dates), no issue numbers in the Markdown docs either (a measurement's date
stays there), and no reference to notes outside the repository.
"""

from __future__ import annotations

import ast
import fnmatch
import re
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CODE = ("schemas", "pipeline", "trainer", "cli", "bench")
OUTSIDE_NOTES = re.compile(r"\.\./shared|(?<![A-Z/])\b(?:method|design)\.md\b")
ISSUE = re.compile(r"\bissues?[ -]#?\d+\b", re.IGNORECASE)
HISTORY = re.compile(rf"{ISSUE.pattern}|\b20\d\d-\d\d-\d\d\b", re.IGNORECASE)


def code_files() -> list[Path]:
    return sorted(path for package in CODE for path in (ROOT / package).rglob("*.py"))


def markdown_files() -> list[Path]:
    """README.md, */README.md and docs/**/*.md, outside hidden, ignored or vendored folders."""
    ignored = [line.strip().strip("/") for line in (ROOT / ".gitignore").read_text().splitlines()]
    ignored = [pattern for pattern in ignored if pattern and not pattern.startswith("#")]
    found = [*ROOT.glob("*.md"), *ROOT.glob("*/README.md"), *(ROOT / "docs").rglob("*.md")]
    return sorted(
        path
        for path in found
        if not any(
            part.startswith(".") or any(fnmatch.fnmatch(part, pattern) for pattern in ignored)
            for part in path.relative_to(ROOT).parts[:-1]
        )
    )


def docstring_lines(tree: ast.Module) -> tuple[int, int]:
    """(lines of the module docstring, lines of all docstrings) of one parsed module."""
    module = total = 0
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        first = node.body[0] if node.body else None
        if (
            isinstance(first, ast.Expr)
            and isinstance(first.value, ast.Constant)
            and isinstance(first.value.value, str)
        ):
            lines = first.end_lineno - first.lineno + 1
            total += lines
            module = lines if isinstance(node, ast.Module) else module
    return module, total


def test_no_folder_holds_more_than_16_modules():
    counts = Counter(path.parent.relative_to(ROOT) for path in code_files() if path.name != "__init__.py")
    assert {str(folder): n for folder, n in counts.items() if n > 16} == {}


def test_no_code_file_is_over_450_lines():
    long = {str(p.relative_to(ROOT)): n for p in code_files() if (n := len(p.read_text().splitlines())) > 450}
    assert long == {}


def test_docstrings_are_short():
    too_long, doc, lines = {}, 0, 0
    for path in code_files():
        source = path.read_text()
        module, total = docstring_lines(ast.parse(source))
        if module > 25:
            too_long[str(path.relative_to(ROOT))] = module
        doc, lines = doc + total, lines + len(source.splitlines())
    assert too_long == {}
    assert doc / lines < 0.15, f"docstrings are {doc} of {lines} lines of code"


def test_code_carries_no_history_and_no_outside_notes():
    found = []
    for path in [*code_files(), *sorted((ROOT / "tests").glob("*.py"))]:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if path.name != "test_house.py" and (OUTSIDE_NOTES.search(line) or HISTORY.search(line)):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert found == []


def test_docs_refer_to_nothing_outside_the_repository():
    docs = [*ROOT.glob("*.md"), *(ROOT / "docs").rglob("*"), *ROOT.glob("*/README.md")]
    found = [
        f"{path.relative_to(ROOT)}: {line.strip()}"
        for path in docs
        if path.is_file()
        for line in path.read_text().splitlines()
        if OUTSIDE_NOTES.search(line)
    ]
    assert found == []
    for name in ("LICENSE", "docs/METHOD.md", "docs/ARCHITECTURE.md"):
        assert (ROOT / name).is_file(), name


def test_docs_carry_no_issue_numbers():
    found = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in markdown_files()
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if ISSUE.search(line)
    ]
    assert found == []


def test_the_patterns_catch_what_they_are_for():
    assert OUTSIDE_NOTES.search("see ../shared/method.md") and OUTSIDE_NOTES.search("(design.md)")
    assert not OUTSIDE_NOTES.search("docs/METHOD.md") and not OUTSIDE_NOTES.search("docs/ARCHITECTURE.md")
    assert HISTORY.search("before issue 14") and HISTORY.search("measured 2026-11-26")
    assert not HISTORY.search("shards 0-14") and not HISTORY.search("version 2")
    assert ISSUE.search("before Issue #9") and ISSUE.search("the issue-14 target")
    assert ISSUE.search("this day's issues 11, 12, 14") and HISTORY.search("the issue-14 target")
    assert not ISSUE.search("measured 2026-11-26") and not ISSUE.search("the issue's target row")
    docs = {str(path.relative_to(ROOT)) for path in markdown_files()}
    assert {"README.md", "schemas/README.md", "docs/BENCHMARKS.md"} <= docs
    assert not [name for name in docs if name.startswith((".", "build/")) or ".egg-info" in name]
