"""The project's own error classes: what a user can fix (a path, a config, the data).

`ola` prints these as one red line (cli/errors.py) and lets every other exception
keep its traceback, because anything else is a bug in olavlm. Cost: code that
reports a user error must raise one of these (or a subclass), never a bare
ValueError; the config and data errors also derive from ValueError so that
callers that caught ValueError before keep working.
"""

from __future__ import annotations


class OlaError(Exception):
    """Base of every error the user can act on (bad path, bad config, bad data, cache mismatch)."""


class ConfigError(OlaError, ValueError):
    """An option or config-file value is unknown, of the wrong type or inconsistent; the message names it."""
