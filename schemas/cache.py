"""The target cache: Zarr v3 arrays per (teacher, corpus shard) + Parquet manifests.

Layout (schemas/README.md): `cache.json` (format version, every teacher's spec and fingerprint),
then per `<teacher>/<shard>/` a `data.zarr` group (`targets`, and `scale` for int8), `manifest.parquet`,
`errors.parquet` and `commit.json`, written last: a shard without it does not exist.

Design choice: the corpus shard is the unit of work, commit and resume; one writer writes one shard
whole, and one sample is one inner chunk of Zarr's sharding codec (`ROWS_PER_OBJECT` rows per storage
object), so a random read is one range read and a shard streams as a few large objects. Cost: a
crash loses the shard in progress, and writing needs the whole shard's rows at once.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import quant, shardfile
from .errors import CacheError, SpecMismatchError
from .keyindex import KeyIndex, open_index
from .manifest import ERROR_SCHEMA, ERROR_STAGES, MANIFEST_SCHEMA
from .spec import TeacherSpec
from .storage import Root, check_safe_name, rename_durably, staging_name

FORMAT_NAME = "olavlm-target-cache"
FORMAT_VERSION = 2
ROWS_PER_OBJECT = 64
"""Rows per storage object (the outer chunk of Zarr's sharding codec)."""

CACHE_JSON = "cache.json"
COMMIT_JSON = "commit.json"
MANIFEST_PARQUET = "manifest.parquet"
ERRORS_PARQUET = "errors.parquet"
STAGING = ".staging"


@dataclass(frozen=True)
class SampleError:
    """A corpus sample that was not written, and why."""

    key: str
    stage: str
    reason: str

    def __post_init__(self) -> None:
        if self.stage not in ERROR_STAGES:
            raise ValueError(f"error stage {self.stage!r} is not one of {ERROR_STAGES}")


@dataclass(frozen=True)
class ShardCommit:
    teacher: str
    shard: str
    rows: int
    errors: int
    written: bool
    """False when an identical commit already existed (an idempotent retry)."""


def _blosc(spec: TeacherSpec):
    from zarr.codecs import BloscCodec

    codec = spec.storage_codec
    return BloscCodec(cname=codec.cname, clevel=codec.clevel, shuffle=codec.shuffle)


class TargetCache:
    """Read and write a target cache rooted at a local folder or fsspec URL."""

    def __init__(self, root: str | os.PathLike[str], storage_options: dict | None = None):
        self.root = Root(root, storage_options)
        self._indexes: dict[str, KeyIndex] = {}  # per teacher; dropped on every write

    # -- metadata ---------------------------------------------------------------------------
    def exists(self) -> bool:
        return self.root.exists(CACHE_JSON)

    def metadata(self) -> dict:
        if not self.exists():
            raise CacheError(
                f"{self.root.url_of(CACHE_JSON)} not found: not an olavlm cache (run `ola precompute`)"
            )
        meta = self.root.read_json(CACHE_JSON)
        if meta.get("format") != FORMAT_NAME:
            raise CacheError(
                f"{self.root.url_of(CACHE_JSON)}: format {meta.get('format')!r} is not {FORMAT_NAME!r}"
            )
        if meta.get("format_version") != FORMAT_VERSION:
            raise CacheError(
                f"{self.root.url_of(CACHE_JSON)}: format version {meta.get('format_version')} is not supported "
                f"(this olavlm reads version {FORMAT_VERSION} only): recompute it with `ola precompute`"
            )
        return meta

    def specs(self) -> dict[str, TeacherSpec]:
        if not self.exists():
            return {}
        return {
            name: TeacherSpec.from_dict(entry["spec"]) for name, entry in self.metadata()["teachers"].items()
        }

    def spec(self, teacher: str) -> TeacherSpec:
        specs = self.specs()
        if teacher not in specs:
            raise CacheError(f"{self.root.url}: no teacher {teacher!r} in this cache (has: {sorted(specs)})")
        return specs[teacher]

    def register(self, spec: TeacherSpec, *, overwrite: bool = False) -> None:
        """Record a teacher's spec; refuse one that differs from the stored spec unless `overwrite`,
        which first deletes every committed shard of that teacher, so old and new targets never mix."""
        meta = (
            self.metadata()
            if self.exists()
            else {
                "format": FORMAT_NAME,
                "format_version": FORMAT_VERSION,
                "teachers": {},
                "created": time.time(),
            }
        )
        stored = meta["teachers"].get(spec.name)
        if stored is not None and stored["fingerprint"] != spec.fingerprint:
            old = TeacherSpec.from_dict(stored["spec"])
            if not overwrite:
                raise SpecMismatchError(
                    f"{self.root.url_of(CACHE_JSON)}: teacher {spec.name!r} was written with spec "
                    f"{stored['fingerprint']}, this run has {spec.fingerprint} (differs in: "
                    f"{', '.join(old.diff(spec))}). Use a new cache, or overwrite that teacher explicitly."
                )
            self.root.rm(spec.name)
        meta["teachers"][spec.name] = {"spec": spec.to_dict(), "fingerprint": spec.fingerprint}
        self.root.write_json(meta, CACHE_JSON)
        self._indexes.pop(spec.name, None)

    def check_specs(self, expected: dict[str, str]) -> None:
        """Refuse a cache whose fingerprints differ from `expected` ({teacher: fingerprint})."""
        stored = {name: spec.fingerprint for name, spec in self.specs().items()}
        for name, fingerprint in expected.items():
            if name not in stored:
                raise SpecMismatchError(
                    f"{self.root.url}: teacher {name!r} is not in this cache (has {sorted(stored)})"
                )
            if stored[name] != fingerprint:
                raise SpecMismatchError(
                    f"{self.root.url}: teacher {name!r} has spec {stored[name]}, the run expects {fingerprint}"
                )

    # -- shards -----------------------------------------------------------------------------
    def teachers(self) -> list[str]:
        return sorted(self.specs())

    def committed_shards(self, teacher: str) -> list[str]:
        names = [n for n in self.root.listdir(teacher) if n != STAGING and not n.startswith(".")]
        return [n for n in names if self.root.exists(teacher, n, COMMIT_JSON)]

    def is_committed(self, teacher: str, shard: str) -> bool:
        return self.root.exists(teacher, check_safe_name(shard, "shard"), COMMIT_JSON)

    def commit_info(self, teacher: str, shard: str) -> dict:
        return self.root.read_json(teacher, shard, COMMIT_JSON)

    def clean_staging(self, teacher: str) -> None:
        """Remove leftovers of crashed writers. Only call while no writer of this cache runs."""
        self.root.rm(teacher, STAGING)
        if not self.root.is_local:  # object stores: uncommitted shard prefixes are leftovers
            for name in self.root.listdir(teacher):
                if not self.root.exists(teacher, name, COMMIT_JSON):
                    self.root.rm(teacher, name)

    def write_shard(
        self,
        teacher: str,
        shard: str,
        keys: Sequence[str],
        sha256s: Sequence[str],
        values: np.ndarray,
        scale: np.ndarray | None = None,
        errors: Sequence[SampleError] = (),
        fidelity: dict[str, float] | None = None,
    ) -> ShardCommit:
        """Write one (teacher, shard) whole and commit it atomically; `values` are in the storage dtype
        (`quant.encode`). Idempotent: a shard committed with the same fingerprint is left as it is."""
        check_safe_name(shard, "shard")
        spec = self.spec(teacher)
        self._indexes.pop(teacher, None)  # the key index changes with this shard
        n = len(keys)
        expected = (n, *spec.shape)
        if values.shape != expected:
            raise CacheError(f"{teacher}/{shard}: targets have shape {values.shape}, spec says {expected}")
        if values.dtype != np.dtype(quant.zarr_dtype(spec.dtype)):
            raise CacheError(f"{teacher}/{shard}: targets are {values.dtype}, spec stores {spec.dtype}")
        if len(sha256s) != n or (spec.dtype == "int8") != (scale is not None):
            raise CacheError(
                f"{teacher}/{shard}: {n} keys, {len(sha256s)} sha256s, scale given={scale is not None}"
            )
        if len(set(keys)) != n:
            raise CacheError(f"{teacher}/{shard}: duplicate keys in one shard")
        if self.is_committed(teacher, shard):
            if self.commit_info(teacher, shard)["fingerprint"] == spec.fingerprint:
                return ShardCommit(teacher, shard, n, len(errors), written=False)
            raise SpecMismatchError(f"{self.root.url_of(teacher, shard)} is committed with another spec")

        if self.root.is_local:
            target = (teacher, STAGING, staging_name(shard))
        else:
            self.root.rm(teacher, shard)  # orphaned files of a crashed writer
            target = (teacher, shard)
        self._write_files(spec, shard, target, keys, sha256s, values, scale, errors, fidelity)
        if self.root.is_local:
            try:
                rename_durably(self.root.join(*target), self.root.join(teacher, shard))
            except OSError:  # another attempt committed first (Ray retry): identical content
                if not self.is_committed(teacher, shard):
                    raise
                self.root.rm(*target)
                return ShardCommit(teacher, shard, n, len(errors), written=False)
        return ShardCommit(teacher, shard, n, len(errors), written=True)

    def _write_files(self, spec, shard, target, keys, sha256s, values, scale, errors, fidelity) -> None:
        import zarr

        n = len(keys)
        group = zarr.open_group(self.root.zarr_store(*target, "data.zarr"), mode="w", zarr_format=3)
        group.attrs.update(
            {
                "teacher": spec.name,
                "shard": shard,
                "fingerprint": spec.fingerprint,
                "storage_dtype": spec.dtype,
                "format_version": FORMAT_VERSION,
            }
        )
        rows_per_object = max(1, min(ROWS_PER_OBJECT, n))
        t, d = spec.shape
        arrays = [("targets", values, (t, d), quant.zarr_dtype(spec.dtype))]
        if scale is not None:
            arrays.append(("scale", scale, (t,), "float32"))
        chosen = spec.storage_codec
        codec = shardfile.blosc_codec(chosen.cname, chosen.clevel, chosen.shuffle)
        for name, data, row_shape, dtype in arrays:
            # zarr-python writes the metadata; the objects are encoded directly (shardfile.py: faster)
            group.create_array(
                name,
                shape=(n, *row_shape),
                chunks=(1, *row_shape),
                shards=(rows_per_object, *row_shape),
                dtype=dtype,
                compressors=[_blosc(spec)],
                fill_value=0,
            )
            layout = shardfile.ObjectLayout(
                self.root.join(*target, "data.zarr", name), n, rows_per_object, row_shape, np.dtype(dtype)
            )
            for k, start in enumerate(range(0, n, rows_per_object)):
                blob = shardfile.encode_object(data[start : start + rows_per_object], rows_per_object, codec)
                path = layout.object_path(k)
                self.root.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
                with self.root.fs.open(path, "wb") as f:
                    f.write(blob)
        manifest = pa.table(
            {
                "key": list(keys),
                "shard": [shard] * n,
                "row": np.arange(n, dtype=np.int32),
                "sha256": list(sha256s),
                "teacher": [spec.name] * n,
                "fingerprint": [spec.fingerprint] * n,
            },
            schema=MANIFEST_SCHEMA,
        )
        error_table = pa.table(
            {
                "key": [e.key for e in errors],
                "shard": [shard] * len(errors),
                "teacher": [spec.name] * len(errors),
                "stage": [e.stage for e in errors],
                "reason": [e.reason for e in errors],
            },
            schema=ERROR_SCHEMA,
        )
        for name, table in ((MANIFEST_PARQUET, manifest), (ERRORS_PARQUET, error_table)):
            with self.root.fs.open(self.root.join(*target, name), "wb") as f:
                pq.write_table(table, f)
        commit = {
            "teacher": spec.name,
            "shard": shard,
            "fingerprint": spec.fingerprint,
            "rows": n,
            "errors": len(errors),
            "storage_dtype": spec.dtype,
            "format_version": FORMAT_VERSION,
            "committed": time.time(),
            "fidelity": fidelity,
        }
        self.root.write_json(commit, *target, COMMIT_JSON)

    # -- reading ----------------------------------------------------------------------------
    def open_shard(self, teacher: str, shard: str) -> ShardReader:
        if not self.is_committed(teacher, shard):
            raise CacheError(
                f"{self.root.url_of(teacher, shard)}: shard not committed (missing {COMMIT_JSON})"
            )
        return ShardReader(self, self.spec(teacher), shard)

    def manifest(self, teacher: str | None = None) -> pa.Table:
        """Every committed shard's manifest rows (of one teacher, or of all)."""
        return self._concat(self.shard_manifest, MANIFEST_SCHEMA, teacher)

    def errors(self, teacher: str | None = None) -> pa.Table:
        """Every committed shard's error rows (of one teacher, or of all)."""
        return self._concat(self.shard_errors, ERROR_SCHEMA, teacher)

    def _concat(self, read, schema: pa.Schema, teacher: str | None) -> pa.Table:
        tables = [
            read(t, shard)
            for t in ([teacher] if teacher else self.teachers())
            for shard in self.committed_shards(t)
        ]
        return pa.concat_tables(tables) if tables else schema.empty_table()

    def shard_manifest(self, teacher: str, shard: str, columns: list[str] | None = None) -> pa.Table:
        """One committed shard's manifest (MANIFEST_SCHEMA; optionally only some columns)."""
        return self._read_table(teacher, shard, MANIFEST_PARQUET, columns)

    def shard_errors(self, teacher: str, shard: str, columns: list[str] | None = None) -> pa.Table:
        """One committed shard's error table (ERROR_SCHEMA; optionally only some columns)."""
        return self._read_table(teacher, shard, ERRORS_PARQUET, columns)

    def _read_table(self, teacher: str, shard: str, name: str, columns: list[str] | None) -> pa.Table:
        with self.root.fs.open(self.root.join(teacher, shard, name), "rb") as f:
            return pq.read_table(f, columns=columns)

    def index(self, teacher: str, shards: Sequence[str] | None = None, *, build: bool = True) -> KeyIndex:
        """key -> (shard, row, sha256) of one teacher (keyindex.py), opened once per instance for the
        committed state seen then (`shards`, listed if None); built if missing and `build`."""
        if teacher not in self._indexes:
            self._indexes[teacher] = open_index(self, teacher, shards, build=build)
        return self._indexes[teacher]

    def get(self, teacher: str, key: str) -> np.ndarray:
        """One sample's target as float32 (T, D), looked up through the manifest."""
        found = self.index(teacher).get(key)
        if found is None:
            raise KeyError(f"{self.root.url}: key {key!r} has no {teacher!r} target")
        return self.open_shard(teacher, found[0]).read(found[1])


class ShardReader:
    """Targets of one committed (teacher, shard), rows in manifest order, read through the shard index
    directly (shardfile.py); zarr-python only opens the group to check its metadata."""

    def __init__(self, cache: TargetCache, spec: TeacherSpec, shard: str):
        import zarr

        self.spec, self.shard = spec, shard
        self.location = cache.root.url_of(spec.name, shard)
        try:
            group = zarr.open_group(
                cache.root.zarr_store(spec.name, shard, "data.zarr", read_only=True), mode="r"
            )
            arrays = {"targets": group["targets"]}
            if spec.dtype == "int8":
                arrays["scale"] = group["scale"]
            for name, array in arrays.items():  # the direct reader's layout; anything else is refused by name
                shardfile.check_codecs(
                    array.metadata.to_dict()["codecs"], f"{self.location}/data.zarr/{name}"
                )
        except Exception as exc:  # zarr raises several types; name the shard
            raise CacheError(f"{self.location}/data.zarr: unreadable ({type(exc).__name__}: {exc})") from exc
        if group.attrs.get("fingerprint") != spec.fingerprint:
            raise SpecMismatchError(
                f"{self.location}: written with spec {group.attrs.get('fingerprint')}, cache.json says {spec.fingerprint}"
            )
        self.shape = tuple(arrays["targets"].shape)
        self._readers = {
            name: shardfile.ObjectReader(
                cache.root.filesystem,  # looked up per read: a forked worker gets its own
                shardfile.ObjectLayout(
                    cache.root.join(spec.name, shard, "data.zarr", name),
                    array.shape[0],
                    array.shards[0],
                    tuple(array.shape[1:]),
                    np.dtype(array.dtype),
                    array.fill_value,
                ),
            )
            for name, array in arrays.items()
        }
        self._cache = cache
        self._keys: list[str] | None = None

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def keys(self) -> list[str]:
        if self._keys is None:
            table = self._cache.shard_manifest(self.spec.name, self.shard, columns=["key"])
            self._keys = table.column("key").to_pylist()
        return self._keys

    def read_stored(
        self, rows: int | slice, out: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Stored values (and int8 scale) without decoding: one range read per storage object.
        `out`: an array of the stored dtype and result shape to decompress into (the loader's batch row)."""
        single = not isinstance(rows, slice)
        if single:
            if not -len(self) <= rows < len(self):
                raise IndexError(f"{self.location}: row {rows} out of range (0..{len(self) - 1})")
            rows = slice(rows % len(self), rows % len(self) + 1)
        if rows.step not in (None, 1):
            raise ValueError(f"{self.location}: row slices must be contiguous (step 1), got step {rows.step}")
        start, stop, _ = rows.indices(len(self))
        dest = {"targets": out[None] if single and out is not None else out}
        out = {
            name: reader.read_rows(start, max(start, stop), dest.get(name))
            for name, reader in self._readers.items()
        }
        if single:
            out = {name: value[0] for name, value in out.items()}
        return out["targets"], out.get("scale")

    def read(self, rows: int | slice) -> np.ndarray:
        """Targets as float32: (T, D) for an int row, (n, T, D) for a slice."""
        values, scale = self.read_stored(rows)
        return quant.decode(values, scale, self.spec.dtype)

    def iter_blocks(self, block: int = ROWS_PER_OBJECT) -> Iterator[tuple[int, np.ndarray]]:
        """Sequential read of the whole shard: (first row, float32 block)."""
        for start in range(0, len(self), block):
            yield start, self.read(slice(start, min(start + block, len(self))))
