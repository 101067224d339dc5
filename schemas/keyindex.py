"""The key index of a cache: sample key -> (shard, row, image sha256), on disk, memory-mapped.

The keyed join (training shards that are not the cache's corpus shards) needs every key of a
teacher's cache; a Python dict of them in every DataLoader worker does not fit a billion-image cache
(docs/BENCHMARKS.md, "Keyed-join key index"). Layout and rules: schemas/README.md, "The key index".

Design choice: sorted blake2b-128 key hashes in plain `.npy` columns, memory-mapped, a lookup being
a binary search that reads only the pages it touches; chosen over a sorted Parquet index, which
decodes a row group per lookup. Cost: 56 B per key on disk beside the manifests (which stay the
source of truth), and a format DuckDB cannot read. A key in several shards returns the copy of the
shard that sorts last. The folder name is a token of the committed state (index format, fingerprint,
sorted shard names), so an index of another state is never used: it is rebuilt or refused. The
build is two streaming passes (scatter 56-byte records into buckets by hash bits, sort each bucket
within `memory_budget`), written to a temporary folder and renamed into place.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Sequence

import numpy as np
import pyarrow.parquet as pq

from .errors import CacheError

INDEX_FORMAT = "olavlm-key-index"
INDEX_VERSION = 1
INDEX_FOLDER = ".keyindex"
INDEX_JSON = "index.json"
INDEX_DIR_ENV = "OLAVLM_INDEX_DIR"
DEFAULT_MEMORY_BUDGET = 256 * 2**20
"""Bytes of records sorted at once by the builder (one bucket)."""
MAX_BUCKETS = 512
"""Bucket files open at once in pass 1. Beyond 512 x budget / 2 of records (~1.2 billion keys at the
default budget) a bucket outgrows the budget: raise the budget for larger caches."""
ABANDONED_AFTER_S = 24 * 3600
"""A builder's temporary folder untouched this long is a killed builder's leftover."""
RECORD = np.dtype([("hi", "<u8"), ("lo", "<u8"), ("shard", "<u4"), ("row", "<u4"), ("sha256", "u1", (32,))])
"""One key's entry while building (56 bytes); the index stores each field as its own .npy column."""
COLUMNS = ("hash_hi", "hash_lo", "shard", "row", "sha256")


class KeyIndexError(CacheError):
    """A key index that is missing, stale or unreadable; the message names the folder and the fix."""


def key_digest(key: str) -> bytes:
    """blake2b-128 of the key's UTF-8 bytes: hi = first 8 bytes, lo = last 8 (big-endian)."""
    return hashlib.blake2b(key.encode(), digest_size=16).digest()


def key_hashes(keys: Sequence[str]) -> np.ndarray:
    """(n, 2) uint64 (hi, lo) of each key (see `key_digest`)."""
    return np.frombuffer(b"".join(map(key_digest, keys)), dtype=">u8").reshape(-1, 2).astype(np.uint64)


def state_token(fingerprint: str, shards: Sequence[str]) -> str:
    """Names the committed state an index was built from (see the module docstring)."""
    text = json.dumps(
        {
            "format": INDEX_FORMAT,
            "version": INDEX_VERSION,
            "fingerprint": fingerprint,
            "shards": sorted(shards),
        },
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def index_locations(cache, teacher: str) -> list[str]:
    """Folders that may hold `teacher`'s index folders, in the order they are searched and written."""
    user = os.environ.get(INDEX_DIR_ENV) or os.path.join(
        os.path.expanduser("~"), ".cache", "olavlm", "keyindex"
    )
    url = cache.root.url_of() if not cache.root.is_local else os.path.abspath(cache.root.path)
    elsewhere = os.path.join(user, hashlib.sha256(url.encode()).hexdigest()[:16], teacher)
    if cache.root.is_local:
        return [cache.root.join(teacher, INDEX_FOLDER), elsewhere]
    return [elsewhere]


class KeyIndex:
    """A built index folder, memory-mapped read-only; `get(key)` as `dict.get`."""

    def __init__(self, folder: str):
        self.folder = folder
        try:
            with open(os.path.join(folder, INDEX_JSON)) as f:
                self.meta = json.load(f)
            if self.meta.get("format") != INDEX_FORMAT or self.meta.get("version") != INDEX_VERSION:
                raise KeyIndexError(
                    f"{folder}: format {self.meta.get('format')!r} version "
                    f"{self.meta.get('version')!r} is not {INDEX_FORMAT!r} {INDEX_VERSION}"
                )
            arrays = {
                name: np.load(os.path.join(folder, f"{name}.npy"), mmap_mode="r", allow_pickle=False)
                for name in COLUMNS
            }
        except (OSError, ValueError) as exc:
            raise KeyIndexError(
                f"{folder}: unreadable key index ({exc}); rebuild it with `ola cache index`"
            ) from exc
        rows = self.meta["rows"]
        if any(len(a) != rows for a in arrays.values()):
            raise KeyIndexError(f"{folder}: column lengths differ from index.json's rows={rows}; rebuild it")
        # plain ndarray views: np.memmap's subclass hooks cost more than the search itself
        self._hi, self._lo, self._shard, self._row, self._sha = (arrays[n].view(np.ndarray) for n in COLUMNS)
        self.shards: list[str] = self.meta["shards"]
        self.token: str = self.meta["token"]

    def __len__(self) -> int:
        return self.meta["rows"]

    def __reduce__(self):  # to DataLoader workers: reopen the folder, never copy the mapped arrays
        return KeyIndex, (self.folder,)

    def get(self, key: str, default=None) -> tuple[str, int, str] | None:
        """(shard, row, sha256 hex) of `key`, or `default`."""
        digest = key_digest(key)
        hi, lo = int.from_bytes(digest[:8], "big"), int.from_bytes(digest[8:], "big")
        i, found, size = int(self._hi.searchsorted(np.uint64(hi))), -1, len(self._hi)
        while i < size and int(self._hi[i]) == hi:  # a run of equal hi: usually one entry
            if int(self._lo[i]) == lo:
                found = i  # same key in several shards: keep going, the last shard wins
            i += 1
        if found < 0:
            return default
        return self.shards[self._shard[found]], int(self._row[found]), self._sha[found].tobytes().hex()

    def __contains__(self, key: str) -> bool:
        return self.get(key) is not None


def open_index(
    cache,
    teacher: str,
    shards: Sequence[str] | None = None,
    *,
    build: bool = True,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> KeyIndex:
    """The index of `teacher`'s current committed state (`shards`: committed shard names, listed if None);
    built when missing and `build`, else a missing or stale index is refused."""
    shards = sorted(cache.committed_shards(teacher) if shards is None else shards)
    token = state_token(cache.spec(teacher).fingerprint, shards)
    for location in index_locations(cache, teacher):
        if os.path.exists(os.path.join(location, token, INDEX_JSON)):
            return KeyIndex(os.path.join(location, token))
    if not build:
        raise KeyIndexError(
            f"{cache.root.url}: no key index of teacher {teacher!r} for its {len(shards)} committed shards "
            f"(none built, or built before the cache changed); build it with `ola cache index {cache.root.url}`"
        )
    return build_index(cache, teacher, shards, memory_budget=memory_budget)


def _writable_location(cache, teacher: str) -> str:
    for location in index_locations(cache, teacher):
        try:
            os.makedirs(location, exist_ok=True)
        except OSError:
            continue
        if os.access(location, os.W_OK):
            return location
    raise KeyIndexError(
        f"no writable folder for the key index of {cache.root.url} (tried "
        f"{', '.join(index_locations(cache, teacher))}); set {INDEX_DIR_ENV}"
    )


def build_index(
    cache,
    teacher: str,
    shards: Sequence[str] | None = None,
    *,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    location: str | None = None,
) -> KeyIndex:
    """Build `teacher`'s index from its manifests and rename it into place; -> the index of that state,
    built here or by a concurrent builder that finished first."""
    shards = sorted(cache.committed_shards(teacher) if shards is None else shards)
    fingerprint = cache.spec(teacher).fingerprint
    token = state_token(fingerprint, shards)
    location = location or _writable_location(cache, teacher)
    os.makedirs(location, exist_ok=True)
    final = os.path.join(location, token)
    if os.path.exists(os.path.join(final, INDEX_JSON)):
        return KeyIndex(final)
    tmp = os.path.join(location, f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    try:
        rows = _build_into(cache, teacher, shards, tmp, memory_budget)
        meta = {
            "format": INDEX_FORMAT,
            "version": INDEX_VERSION,
            "teacher": teacher,
            "fingerprint": fingerprint,
            "token": token,
            "rows": rows,
            "cache": cache.root.url,
            "shards": list(shards),
        }
        with open(os.path.join(tmp, INDEX_JSON), "w") as f:
            json.dump(meta, f)
        for name in os.listdir(tmp):  # durable before the rename publishes it
            with open(os.path.join(tmp, name), "rb") as f:
                os.fsync(f.fileno())
        try:
            os.rename(tmp, final)
        except OSError:  # a concurrent builder published the same state first: identical content
            if not os.path.exists(os.path.join(final, INDEX_JSON)):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    index = KeyIndex(final)
    _drop_older(location, final)
    return index


def _drop_older(location: str, newest: str) -> None:
    """Remove index folders published before `newest` (other states; open memmaps stay valid on POSIX).
    A slow builder of an older state that publishes last drops the newer one: the next reader rebuilds it."""
    published = os.stat(os.path.join(newest, INDEX_JSON)).st_mtime
    for name in os.listdir(location):
        if name.startswith(".tmp-"):  # a builder killed mid-way; a live one touches its folder far more often
            with contextlib.suppress(FileNotFoundError):
                if os.stat(os.path.join(location, name)).st_mtime < published - ABANDONED_AFTER_S:
                    shutil.rmtree(os.path.join(location, name), ignore_errors=True)
            continue
        path = os.path.join(location, name, INDEX_JSON)
        if not name.startswith(".") and os.path.join(location, name) != newest:
            try:
                if os.stat(path).st_mtime <= published:
                    shutil.rmtree(os.path.join(location, name), ignore_errors=True)
            except FileNotFoundError:
                continue


def _manifest_rows(cache, teacher: str, shard: str) -> int:
    with cache.root.fs.open(cache.root.join(teacher, shard, "manifest.parquet"), "rb") as f:
        return pq.ParquetFile(f).metadata.num_rows


def _records(cache, teacher: str, shard: str, position: int) -> np.ndarray:
    """One shard's manifest as RECORD entries (the only place keys exist as Python strings)."""
    table = cache.shard_manifest(teacher, shard, columns=["key", "row", "sha256"])
    out = np.empty(table.num_rows, RECORD)
    hashes = key_hashes(table.column("key").to_pylist())
    out["hi"], out["lo"], out["shard"] = hashes[:, 0], hashes[:, 1], position
    out["row"] = table.column("row").to_numpy()
    shas = table.column("sha256").to_pylist()
    try:
        out["sha256"] = np.frombuffer(bytes.fromhex("".join(shas)), np.uint8).reshape(-1, 32)
    except ValueError as exc:
        bad = next((s for s in shas if len(s) != 64), exc)
        raise KeyIndexError(
            f"{cache.root.url_of(teacher, shard, 'manifest.parquet')}: a sha256 is not 64 hex "
            f"digits ({bad!r})"
        ) from exc
    return out


def _build_into(cache, teacher: str, shards: Sequence[str], folder: str, memory_budget: int) -> int:
    counts = [_manifest_rows(cache, teacher, s) for s in shards]
    total = sum(counts)
    # x2: a bucket and its sorted copy are both in memory during pass 2
    needed = -(-2 * total * RECORD.itemsize // max(1, memory_budget))
    buckets = min(MAX_BUCKETS, 1 << max(0, int(needed - 1).bit_length())) if needed > 1 else 1
    bits = buckets.bit_length() - 1
    paths = [os.path.join(folder, f"bucket-{b:04d}.bin") for b in range(buckets)]
    files = [open(p, "wb") for p in paths]  # noqa: SIM115 (closed below, all together)
    try:
        for position, shard in enumerate(shards):  # pass 1: scatter by the top bits of hi
            records = _records(cache, teacher, shard, position)
            if buckets == 1:
                files[0].write(records.tobytes())
                continue
            bucket = (records["hi"] >> np.uint64(64 - bits)).astype(np.intp)
            order = np.argsort(bucket, kind="stable")
            edges = np.searchsorted(bucket[order], np.arange(buckets + 1))
            for b in np.flatnonzero(np.diff(edges)):
                files[b].write(records[order[edges[b] : edges[b + 1]]].tobytes())
    finally:
        for f in files:
            f.close()
    # plain appends, not open_memmap: written pages stay in the page cache, out of the builder's RSS
    columns = (
        ("hash_hi", "hi", np.uint64, ()),
        ("hash_lo", "lo", np.uint64, ()),
        ("shard", "shard", np.uint32, ()),
        ("row", "row", np.uint32, ()),
        ("sha256", "sha256", np.uint8, (32,)),
    )
    outputs = {}
    try:
        for name, _, dtype, tail in columns:
            outputs[name] = open(os.path.join(folder, f"{name}.npy"), "wb")  # noqa: SIM115 (closed below)
            header = {
                "descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                "fortran_order": False,
                "shape": (total, *tail),
            }
            np.lib.format.write_array_header_1_0(outputs[name], header)
        written = 0
        for path in paths:  # pass 2: buckets are hi ranges in order, so sorted buckets concatenate sorted
            records = np.fromfile(path, RECORD)
            os.remove(path)
            records = records[np.lexsort((records["shard"], records["lo"], records["hi"]))]
            for name, field, dtype, _ in columns:
                outputs[name].write(np.ascontiguousarray(records[field], dtype=dtype).tobytes())
            written += len(records)
    finally:
        for f in outputs.values():
            f.close()
    if written != total:
        raise KeyIndexError(
            f"{cache.root.url}/{teacher}: manifests changed while the index was built "
            f"({written} rows read, footers said {total}); build again"
        )
    return total
