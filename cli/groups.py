"""The command groups of `ola`, handed to every cli module's `register`, and the reflow of their help.

Design choice: a command's help is its docstring with each paragraph joined into one line
(`reflow_help`), so that the help renderer wraps it to the terminal; rich keeps a docstring's own
line breaks, which then break lines mid-sentence at any other width. Cost: a help text that needs
its own line breaks indents its paragraph (or starts them with "- ").
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import typer


@dataclass(frozen=True)
class Groups:
    root: typer.Typer
    """Top-level commands: precompute, train, probe, export, generate, demo."""
    corpus: typer.Typer
    """`ola corpus ...`"""
    cache: typer.Typer
    """`ola cache ...`"""
    bench: typer.Typer
    """`ola bench ...`"""


def reflow_help(text: str | None) -> str | None:
    """Each paragraph of `text` on one line, each "- " item on its own; an indented paragraph as it is."""
    if not text:
        return text
    paragraphs = []
    for block in inspect.cleandoc(text).split("\n\n"):
        lines: list[str] = []
        for line in block.splitlines() if not block.startswith((" ", "\b")) else []:
            if lines and not line.lstrip().startswith("- "):
                lines[-1] += " " + line.strip()
            else:
                lines.append(line.rstrip())
        paragraphs.append("\n".join(lines) if lines else block)
    return "\n\n".join(paragraphs)


def reflow_commands(*apps: typer.Typer) -> None:
    """`reflow_help` on the help of every command registered in `apps` (given or from the docstring)."""
    for app in apps:
        for info in app.registered_commands:
            info.help = reflow_help(info.help if info.help is not None else inspect.getdoc(info.callback))
