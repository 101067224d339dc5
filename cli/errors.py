"""Turn the project's expected errors into one red line and a non-zero exit code."""

from __future__ import annotations

import contextlib
import sys

import typer


@contextlib.contextmanager
def user_errors():
    """Expected failures (bad paths, bad data, spec mismatch) -> message + exit 2, no traceback."""
    from olavlm.schemas.cache import CacheError
    from olavlm.schemas.corpus import CorpusError

    try:
        yield
    except (CacheError, CorpusError, FileNotFoundError, ValueError, KeyError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
        sys.stderr.flush()
        raise typer.Exit(2) from None
