"""Placeholder: commands are added by the issue that owns this module."""

from __future__ import annotations

from .groups import Groups


def register(groups: Groups) -> None:
    """Add this module's commands to `groups`."""
