"""The project's own error classes: what a user can fix (a path, a config, the data).

`ola` prints these as one red line (cli/errors.py) and lets every other exception keep its
traceback, because anything else is a bug in olavlm. Cost: code that reports a user error must
raise one of these, never a bare ValueError; ConfigError and UnsafeNameError also derive from
ValueError (CorpusError and DataError from RuntimeError), so generic handlers still catch them.
CacheError (cache.py) and the trainer's TextError and EvalDataError live beside their raisers.
"""

from __future__ import annotations


class OlaError(Exception):
    """Base of every error the user can act on (bad path, bad config, bad data, cache mismatch)."""


class ConfigError(OlaError, ValueError):
    """An option or config-file value is unknown, of the wrong type or inconsistent; the message names it."""


class UnsafeNameError(OlaError, ValueError):
    """A name that would become a path part (shard, teacher) but could leave its root; the message names it."""


class CorpusError(OlaError, RuntimeError):
    """A corpus that cannot be listed or read; the message names the path."""


class DataError(CorpusError):
    """A training sample that cannot be used as it is; the message names key and shard.

    `reason` is a short metric name (bad_json, bad_image, missing_target, ...): the loader counts
    skipped samples under it.
    """

    def __init__(self, reason: str, key: str, shard: str, detail: str):
        super().__init__(f"{detail} (key {key!r}, shard {shard!r})")
        self.reason, self.key, self.shard, self.detail = reason, key, shard, detail

    def __reduce__(self):  # DataLoader workers send exceptions through pickle
        return DataError, (self.reason, self.key, self.shard, self.detail)


class CacheError(OlaError, RuntimeError):
    """A cache that cannot be read or written as asked; the message names the path."""


class SpecMismatchError(CacheError):
    """A teacher spec differs from the one the cache was written with."""
