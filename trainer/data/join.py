"""Stage 2 of the data path: the join. Each sample gets the cached target of every enabled teacher.

Per (teacher, training shard), aligned when the training shard has a committed cache shard's name
(its manifest maps key -> row, read near-sequentially), else keyed through the teacher's
memory-mapped key index (schemas/keyindex.py), opened before the workers fork (`open_keyed`) so
they share it. Checks, each naming key and shard: the cache's fingerprints, the image's sha256,
a target for every teacher. Design choice: targets stay in their storage dtype (int8 with its
per-token scale) until collate.to_device casts them on the device. Cost: a keyed lookup is slower
than a dict's, but no worker holds a per-key copy (docs/BENCHMARKS.md, "Keyed-join key index").
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch

from olavlm.schemas import quant
from olavlm.schemas.cache import CacheError, ShardReader, TargetCache
from olavlm.schemas.errors import DataError
from olavlm.schemas.keyindex import KeyIndex

__all__ = ["BATCH_DTYPES", "DataError", "TargetJoin", "scale_key"]  # DataError lives in schemas/errors.py

BATCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "int8": torch.float32}
"""Dtype of a target stacked from per-sample tensors (`TargetJoin.__call__`): 16-bit stays 16-bit (exact),
int8 arrives dequantised. The batch buffers (`TargetJoin.buffers`) keep int8 as int8 + scale instead."""
SCALE_SUFFIX = ".scale"
"""A batch's targets hold int8 values under the task's name and their per-token scales under name + this."""


def scale_key(task: str) -> str:
    return task + SCALE_SUFFIX


MAX_OPEN_READERS = 16
"""Open shard readers kept per teacher (keyed reads jump between shards)."""


class TargetJoin:
    """Looks up and reads the targets of `tasks` for (shard, key, image sha256)."""

    def __init__(
        self,
        cache: str | TargetCache,
        tasks: Sequence[str],
        *,
        expect_fingerprints: dict[str, str] | None = None,
        storage_options: dict | None = None,
    ):
        self.cache = cache if isinstance(cache, TargetCache) else TargetCache(cache, storage_options)
        self.tasks = tuple(tasks)
        specs = self.cache.specs()
        if not specs:
            raise CacheError(
                f"{self.cache.root.url}: not an olavlm cache or holds no teacher (run `ola precompute`)"
            )
        missing = [t for t in self.tasks if t not in specs]
        if missing:
            raise CacheError(
                f"{self.cache.root.url}: no targets for teacher(s) {missing} (cache has {sorted(specs)})"
            )
        self.cache.check_specs(dict(expect_fingerprints or {}))
        self.specs = {t: specs[t] for t in self.tasks}
        self.fingerprints = {t: spec.fingerprint for t, spec in self.specs.items()}
        """What the run trained on; recorded in the checkpoint's config."""
        self._committed = {t: set(self.cache.committed_shards(t)) for t in self.tasks}
        self._aligned: dict[tuple[str, str], dict[str, tuple[int, str]]] = {}
        self._keyed: dict[str, KeyIndex] = {}
        self._readers: dict[tuple[str, str], ShardReader] = {}

    def open_keyed(self, training_shards: Iterable[str]) -> list[str]:
        """Open now (building it if the cache has none) the key index of every task that some of
        `training_shards` is no committed cache shard of: the keyed path is certain for those. Call it
        before DataLoader workers start, so that they share this one index. Returns those tasks."""
        names = set(training_shards)
        opened = []
        for task in self.tasks:
            if names - self._committed[task]:
                if task not in self._keyed:
                    self._keyed[task] = self.cache.index(task, sorted(self._committed[task]))
                opened.append(task)
        return opened

    def shapes(self) -> dict[str, tuple[int, int]]:
        return {t: tuple(spec.shape) for t, spec in self.specs.items()}

    def _aligned_map(self, task: str, shard: str) -> dict[str, tuple[int, str]] | None:
        if shard not in self._committed[task]:
            return None
        if (task, shard) not in self._aligned:
            table = self.cache.shard_manifest(task, shard, columns=["key", "row", "sha256"])
            cols = [table.column(c).to_pylist() for c in ("key", "row", "sha256")]
            self._aligned[(task, shard)] = {k: (r, h) for k, r, h in zip(*cols)}
        return self._aligned[(task, shard)]

    def locate(self, task: str, shard: str, key: str) -> tuple[str, int, str] | None:
        """(cache shard, row, sha256) of a key's target, or None."""
        aligned = self._aligned_map(task, shard)
        if aligned is not None and key in aligned:
            row, sha = aligned[key]
            return shard, row, sha
        if task not in self._keyed:
            self._keyed[task] = self.cache.index(task, sorted(self._committed[task]))
        return self._keyed[task].get(key)

    def _reader(self, task: str, shard: str) -> ShardReader:
        if (task, shard) not in self._readers:
            if len(self._readers) >= MAX_OPEN_READERS * max(1, len(self.tasks)):
                self._readers.pop(next(iter(self._readers)))
            self._readers[(task, shard)] = self.cache.open_shard(task, shard)
        return self._readers[(task, shard)]

    def buffers(self, rows: int) -> dict[str, torch.Tensor]:
        """Uninitialised batch buffers {task: (rows, T, D)} in the batch dtype (see `to_tensor`)."""
        out = {}
        for t, spec in self.specs.items():
            if (
                spec.dtype == "int8"
            ):  # values and per-token scales: dequantised on the device (collate.to_device)
                out[t] = torch.empty((rows, *spec.shape), dtype=torch.int8)
                out[scale_key(t)] = torch.empty((rows, spec.shape[0]), dtype=torch.float32)
            else:
                out[t] = torch.empty((rows, *spec.shape), dtype=BATCH_DTYPES[spec.dtype])
        return out

    def read_into(
        self, buffers: dict[str, torch.Tensor], row: int, shard: str, key: str, image_sha256: str
    ) -> None:
        """Write the sample's targets into row `row` of `buffers`, decompressing in place (16-bit storage).

        Every lookup and sha256 check runs before the first read, so a DataError leaves the row untouched.
        """
        found = {task: self._checked(task, shard, key, image_sha256) for task in self.tasks}
        for task, (cache_shard, cache_row) in found.items():
            reader, dtype = self._reader(task, cache_shard), self.specs[task].dtype
            dest = buffers[task][row]
            if dtype == "float16":
                reader.read_stored(cache_row, out=dest.numpy())
            elif dtype == "bfloat16":
                reader.read_stored(cache_row, out=dest.view(torch.int16).numpy().view(np.uint16))
            else:  # int8: values and scale as stored
                values, scale = reader.read_stored(cache_row)
                dest.copy_(torch.from_numpy(values))
                buffers[scale_key(task)][row].copy_(torch.from_numpy(scale))

    def _checked(self, task: str, shard: str, key: str, image_sha256: str) -> tuple[str, int]:
        found = self.locate(task, shard, key)
        if found is None:
            raise DataError(
                "missing_target", key, shard, f"no {task!r} target in cache {self.cache.root.url}"
            )
        cache_shard, row, sha = found
        if sha != image_sha256:
            raise DataError(
                "sha256_mismatch",
                key,
                shard,
                f"image sha256 {image_sha256[:12]}... differs from the {task!r} target's {sha[:12]}... "
                f"(cache shard {cache_shard!r}, row {row}): the image changed after precompute",
            )
        return cache_shard, row

    def __call__(self, shard: str, key: str, image_sha256: str) -> dict[str, torch.Tensor]:
        """{task: (T, D) tensor in the storage dtype} or a DataError naming key and shard."""
        out = {}
        for task in self.tasks:
            cache_shard, row = self._checked(task, shard, key, image_sha256)
            values, scale = self._reader(task, cache_shard).read_stored(row)
            out[task] = to_tensor(values, scale, self.specs[task].dtype)
        return out


def to_tensor(values: np.ndarray, scale: np.ndarray | None, dtype: str) -> torch.Tensor:
    """Stored row -> tensor: float16 as is, bfloat16 bits reinterpreted (exact, no copy), int8 dequantised."""
    if dtype == "float16":
        return torch.from_numpy(np.ascontiguousarray(values))
    if dtype == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(values).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(quant.decode(values, scale, dtype))
