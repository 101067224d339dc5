"""Turn the project's own errors into one red line and a non-zero exit code.

Only `OlaError` (schemas/errors.py: CacheError, CorpusError, ConfigError, ...) and a
missing file are the user's to fix; any other exception is a bug in olavlm and keeps
its traceback. Cost: code that reports a user error must raise one of those classes.
"""

from __future__ import annotations

import contextlib
import sys

import typer


@contextlib.contextmanager
def user_errors():
    """Expected failures (bad paths, bad data, bad options, spec mismatch) -> message + exit 2, no traceback."""
    from olavlm.schemas.errors import OlaError

    try:
        yield
    except (OlaError, FileNotFoundError) as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        sys.stderr.flush()
        raise typer.Exit(2) from None
