"""The command groups of `ola`, handed to every cli module's `register`."""

from __future__ import annotations

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
