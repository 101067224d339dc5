"""The key index of a cache: sample key -> (shard, row, image sha256), on disk, memory-mapped.

The keyed join (training shards that are not the cache's corpus shards) needs every key of
a teacher's cache. A Python dict of them costs ~650 B of private memory per key in every
DataLoader worker (measured, docs/BENCHMARKS.md "Keyed-join key index"), so a billion-image
cache cannot hold it. This index keeps the map on disk and reads only the
pages a lookup touches.

Layout: one folder per (teacher, committed state), `<location>/<token>/`:

    hash_hi.npy   (N,) uint64   first half of blake2b-128(key), sorted ascending: the search column
    hash_lo.npy   (N,) uint64   second half: confirms a match (hi collisions are scanned)
    shard.npy     (N,) uint32   position in index.json's `shards` (sorted shard names)
    row.npy       (N,) uint32   row in that shard's manifest / targets array
    sha256.npy    (N, 32) uint8 the image sha256 the target was computed from (binary)
    index.json    written last: format, teacher, fingerprint, token, rows, shards

Rows are sorted by (hi, lo, shard position). A key present in several shards (the cache
allows it; `ola cache verify` reports it) keeps every copy and a lookup returns the one of
the shard that sorts last: the rule of the old dict (`{key: ...}` over the manifests in shard
order, later shards overwrite). Two different keys that agree in all 128 hash bits are
indistinguishable (probability ~N^2 / 2^129: 3e-21 for a billion keys); agreeing in `hi`
alone is handled by the scan.

`token` = sha256 over (index format, teacher fingerprint, sorted committed shard names). A
reader recomputes it from the cache's committed state and opens only the folder of that name:
an index of another state (a shard added, the teacher overwritten) is never used, it is rebuilt
(`open_index(build=True)`) or refused with the command that rebuilds it. Committed shards are
immutable, so names + fingerprint are the state; a shard deleted by hand and recomputed under
the same name and fingerprint is the one change this does not see.

Where it lives: local caches hold it in `CACHE/<teacher>/.keyindex/<token>/` (hidden from
`committed_shards`); object-store caches (memmap needs a local file) and local caches this
process cannot write build it in `$OLAVLM_INDEX_DIR` (default `~/.cache/olavlm/keyindex`)
under a hash of the cache URL. Builders write to a private temporary folder and rename it into
place; a builder that loses the race drops its copy, so concurrent builders never corrupt it.
The trainer opens it in the loader's main process, local rank 0 first, so its workers share one
index and a node builds it once (`ola cache index` and the end of `ola precompute` build it ahead).

Build: two streaming passes, never all keys as Python objects. Pass 1 reads one shard's
manifest at a time (key, row, sha256 columns), hashes the keys and appends 56-byte records
to one of B bucket files by the top bits of `hi`; pass 2 sorts each bucket in memory and
writes it into the output arrays (open_memmap), which are the concatenation of the sorted
buckets. B is the smallest power of two that keeps one bucket under `memory_budget` (default
256 MiB, ~2.4 M keys per bucket), so build memory is bounded whatever the cache size; B = 1
below that. Cost: the records are written and read twice (56 B per key each time) and
hashing is one blake2b call per key in Python; measured 1.4-2.6 s per million keys, peak
161 MB at a 16 MB budget.

Chosen over a sorted Parquet index read by row-group range, by measurement (`ola bench join`,
1 M keys, docs/BENCHMARKS.md "Keyed-join key index"): a lookup here is a blake2b and two binary
searches on a memmap, 4-10 us warm (98-244 k lookups/s on 2 shared cores, against 0.9-1.2 M/s
for the dict), where Parquet decodes a row group per lookup, ~1 ms (860-1250/s) for the same
bytes on disk.
Cost of the choice: 56 B per key on disk beside the manifests, and numpy's .npy instead of a
format DuckDB reads (the manifests stay the readable source of truth).
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
    """A built index folder, memory-mapped read-only; `get(key)` as the old dict's `.get`."""

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
    """The index of `teacher`'s current committed state (`shards`: committed shard names, listed if None).

    Built when missing and `build`; otherwise a missing or stale index is refused.
    """
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
    """Build `teacher`'s index from its manifests (two streaming passes) and rename it into place.

    Returns the index of that state, built here or by a concurrent builder that finished first.
    """
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
    """Remove index folders published before `newest` (other states of the cache).

    Open memmaps of running readers stay valid on POSIX. A slow builder of an older state that
    publishes last drops the newer folder: never wrong, the next reader of that state rebuilds it.
    """
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
