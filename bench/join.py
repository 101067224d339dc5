"""`ola bench join`: the keyed join's key -> (shard, row, sha256) map, a dict against the on-disk index.

Builds a temporary cache of N synthetic keys in S shards (real commits, 1x1 targets so only the
manifests weigh), then runs each method in a fresh Python subprocess, as a DataLoader worker meets
it: a dict of every manifest row; the key index (`build_index` in one subprocess, `open_index` and
the lookups in another); a sorted Parquet file read one row group per lookup (the alternative the
index was chosen against). Figures per method: build and open seconds, lookups/s for random keys
and keys in shard order, peak RSS and the private memory the map adds (/proc/self/status).
Cost: the index files are warm in the page cache (just built); a cold lookup costs page reads more.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

TEACHER = "bench"
CHILD_TIMEOUT_S = 3600
PARQUET_ROW_GROUP = 16_384
"""Rows per row group of the Parquet alternative (~0.9 MB of columns; 61 k row groups per billion keys)."""


def key_of(i: int) -> str:
    return f"sample-{i:010d}"


def make_cache(root: str, keys: int, shards: int, seed: int = 0) -> None:
    """A committed cache of `keys` keys in `shards` contiguous shards, targets 1x1 float16."""
    from olavlm.schemas.cache import TargetCache
    from olavlm.schemas.spec import TeacherSpec

    cache = TargetCache(root)
    cache.register(
        TeacherSpec(name=TEACHER, kind="synthetic", model="synthetic", shape=(1, 1), dtype="float16")
    )
    rng = np.random.default_rng(seed)
    bounds = np.linspace(0, keys, shards + 1).astype(int)
    for s in range(shards):
        n = int(bounds[s + 1] - bounds[s])
        blob = rng.bytes(32 * n).hex()
        shas = [blob[64 * i : 64 * (i + 1)] for i in range(n)]
        cache.write_shard(
            TEACHER,
            f"shard-{s:06d}",
            [key_of(i) for i in range(bounds[s], bounds[s + 1])],
            shas,
            np.zeros((n, 1, 1), np.float16),
        )


def _memory() -> dict[str, float]:
    """MB figures of this process from /proc/self/status (Linux)."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                fields[name] = int(value.split()[0]) / 1024
    return fields


class ParquetKeyIndex:
    """The sorted-Parquet alternative: the key index's columns in one file, one row group read per lookup."""

    COLUMNS = ("hash_hi", "hash_lo", "shard", "row", "sha256")

    @staticmethod
    def write(index, path: str) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        arrays = {
            name: getattr(index, attr)
            for name, attr in zip(ParquetKeyIndex.COLUMNS, ("_hi", "_lo", "_shard", "_row", "_sha"))
        }
        schema = pa.schema(
            [
                ("hash_hi", pa.uint64()),
                ("hash_lo", pa.uint64()),
                ("shard", pa.uint32()),
                ("row", pa.uint32()),
                ("sha256", pa.binary(32)),
            ]
        )
        with pq.ParquetWriter(path, schema, compression="none") as writer:
            for start in range(0, len(index), PARQUET_ROW_GROUP):
                part = slice(start, start + PARQUET_ROW_GROUP)
                sha = pa.FixedSizeBinaryArray.from_buffers(
                    pa.binary(32),
                    len(arrays["row"][part]),
                    [None, pa.py_buffer(np.ascontiguousarray(arrays["sha256"][part]))],
                )
                writer.write_table(
                    pa.table([arrays[n][part] for n in ParquetKeyIndex.COLUMNS[:4]] + [sha], schema=schema)
                )
        with open(path + ".shards.json", "w") as f:
            json.dump(index.shards, f)

    def __init__(self, path: str):
        import pyarrow.parquet as pq

        self.file = pq.ParquetFile(path, memory_map=True)
        meta = self.file.metadata
        self.first = np.array(
            [meta.row_group(g).column(0).statistics.min for g in range(meta.num_row_groups)], np.uint64
        )
        with open(path + ".shards.json") as f:
            self.shards = json.load(f)
        self.rows = meta.num_rows

    def __len__(self) -> int:
        return self.rows

    def get(self, key: str):
        from olavlm.schemas.keyindex import key_digest

        digest = key_digest(key)
        hi, lo = np.uint64(int.from_bytes(digest[:8], "big")), np.uint64(int.from_bytes(digest[8:], "big"))
        group = (
            int(self.first.searchsorted(hi, side="right")) - 1
        )  # (bench keys are unique: no run across groups)
        if group < 0:
            return None
        table = self.file.read_row_group(group)
        his = table.column("hash_hi").to_numpy()
        i = int(his.searchsorted(hi))
        if i == len(his) or his[i] != hi or table.column("hash_lo")[i].as_py() != lo:
            return None
        return (
            self.shards[table.column("shard")[i].as_py()],
            table.column("row")[i].as_py(),
            table.column("sha256")[i].as_py().hex(),
        )


def _lookup_keys(keys: int, lookups: int, seed: int) -> dict[str, list[str]]:
    rng = np.random.default_rng(seed + 1)
    return {
        "random": [key_of(int(i)) for i in rng.integers(0, keys, lookups)],
        "shard_order": [key_of(int(i)) for i in np.linspace(0, keys - 1, lookups).astype(int)],
    }


def _child(method: str, root: str, keys: int, lookups: int, seed: int, memory_budget_mb: int) -> dict:
    """One measurement in this (fresh) process: dict, keyindex-build, keyindex-lookup, parquet-build, parquet-lookup."""
    from olavlm.schemas.cache import TargetCache
    from olavlm.schemas.keyindex import build_index, open_index

    cache = TargetCache(root)
    wanted = _lookup_keys(keys, lookups, seed) if not method.endswith("-build") else {}
    parquet_path = os.path.join(root, "parquet-index.parquet")
    before = _memory()
    start = time.perf_counter()
    if method == "dict":
        table = cache.manifest(TEACHER)
        cols = [table.column(c).to_pylist() for c in ("key", "shard", "row", "sha256")]
        index = {k: (s, r, h) for k, s, r, h in zip(*cols)}
        del table, cols
    elif method == "keyindex-build":
        index = build_index(cache, TEACHER, memory_budget=memory_budget_mb * 2**20)
    elif method == "keyindex-lookup":
        index = open_index(cache, TEACHER, build=False)
    elif method == "parquet-build":
        index = open_index(cache, TEACHER, build=False)
        ParquetKeyIndex.write(index, parquet_path)
    else:
        index = ParquetKeyIndex(parquet_path)
    out = {"seconds": time.perf_counter() - start, "rows": len(index)}
    hits = 0
    for kind, batch in wanted.items():
        start = time.perf_counter()
        found = [index.get(k) for k in batch]
        out[f"{kind}_lookups_per_s"] = len(batch) / (time.perf_counter() - start)
        hits += sum(f is not None for f in found)
    after = _memory()
    out.update(
        hits=hits,
        lookups=sum(map(len, wanted.values())),
        peak_rss_mb=after["VmHWM"],
        anon_added_mb=after["RssAnon"] - before["RssAnon"],
        file_rss_mb=after["RssFile"],
        anon_before_mb=before["RssAnon"],
    )
    if method == "keyindex-build":
        out["index_bytes"] = sum(
            os.path.getsize(os.path.join(index.folder, n)) for n in os.listdir(index.folder)
        )
    if method == "parquet-build":
        out["index_bytes"] = os.path.getsize(parquet_path)
    return out


def _run_child(method: str, root: str, keys: int, lookups: int, seed: int, memory_budget_mb: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [method, root, str(keys), str(lookups), str(seed), str(memory_budget_mb)]
    proc = subprocess.run(
        [sys.executable, "-m", "olavlm.bench.join", *args],
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT_S,
        env=env,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"bench join child {method!r} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_join(
    keys: int = 1_000_000,
    shards: int = 100,
    lookups: int = 100_000,
    seed: int = 0,
    root: str | None = None,
    memory_budget_mb: int = 256,
) -> dict:
    """Figures of the three methods (module docstring); `memory_budget_mb`: the key index build's sort budget."""
    if keys < 1 or shards < 1 or lookups < 1 or shards > keys:
        raise ValueError(
            f"need keys >= shards >= 1 and lookups >= 1 (got keys={keys}, shards={shards}, lookups={lookups})"
        )
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        cache_root = os.path.join(tmp, "cache")
        start = time.perf_counter()
        make_cache(cache_root, keys, shards, seed)
        made_s = time.perf_counter() - start
        manifest_bytes = sum(
            os.path.getsize(os.path.join(cache_root, TEACHER, s, "manifest.parquet"))
            for s in os.listdir(os.path.join(cache_root, TEACHER))
            if s.startswith("shard-")
        )
        old = _run_child("dict", cache_root, keys, lookups, seed, memory_budget_mb)
        methods = {
            "dict": {
                "build_s": old["seconds"],
                "open_s": old["seconds"],
                **_lookup_figures(old),
                "peak_rss_mb": old["peak_rss_mb"],
                "build_peak_rss_mb": old["peak_rss_mb"],
                "disk_bytes": 0,
            }
        }
        for name in ("keyindex", "parquet"):  # parquet converts the key index built just before
            built = _run_child(f"{name}-build", cache_root, keys, lookups, seed, memory_budget_mb)
            used = _run_child(f"{name}-lookup", cache_root, keys, lookups, seed, memory_budget_mb)
            methods[name] = {
                "build_s": built["seconds"],
                "open_s": used["seconds"],
                **_lookup_figures(used),
                "peak_rss_mb": used["peak_rss_mb"],
                "build_peak_rss_mb": built["peak_rss_mb"],
                "disk_bytes": built["index_bytes"],
            }
    return {
        "keys": keys,
        "shards": shards,
        "lookups_per_kind": lookups,
        "memory_budget_mb": memory_budget_mb,
        "make_cache_s": made_s,
        "manifest_bytes": manifest_bytes,
        "interpreter_anon_mb": old["anon_before_mb"],
        "methods": methods,
    }


def _lookup_figures(child: dict) -> dict:
    return {
        key: child[key]
        for key in (
            "random_lookups_per_s",
            "shard_order_lookups_per_s",
            "hits",
            "lookups",
            "anon_added_mb",
            "file_rss_mb",
        )
    }


if __name__ == "__main__":
    method, root, keys, lookups, seed, budget = sys.argv[1:7]
    print(json.dumps(_child(method, root, int(keys), int(lookups), int(seed), int(budget))))
