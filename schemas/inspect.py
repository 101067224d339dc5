"""Cache statistics and verification, shared by `ola cache stats|verify` and tests.

Verification reads every stored row (decompressing it is what proves it is
readable), so its cost is one full pass over the cache; `sample_rows` bounds
the statistics pass instead. Problems are collected, never raised one by one,
so a single run names every broken shard and key.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from . import quant
from .cache import TargetCache
from .corpus import ReadFailure, iter_samples, list_shards, sha256_hex


def cache_stats(cache: TargetCache, sample_rows: int = 16) -> dict:
    """Per teacher and shard: rows, errors, bytes, compression, value statistics, fidelity."""
    cache.metadata()  # a clear error for a folder that is not a cache
    out: dict = {"root": cache.root.url, "teachers": {}}
    for teacher, spec in cache.specs().items():
        t, d = spec.shape
        raw_per_row = t * d * np.dtype(quant.zarr_dtype(spec.dtype)).itemsize + (
            t * 4 if spec.dtype == "int8" else 0
        )
        shards, totals = [], Counter()
        for shard in cache.committed_shards(teacher):
            info = cache.commit_info(teacher, shard)
            reader = cache.open_shard(teacher, shard)
            disk = cache.root.size(teacher, shard, "data.zarr")
            rows = len(reader)
            picked = np.linspace(0, rows - 1, min(rows, sample_rows)).astype(int) if rows else []
            values = (
                np.stack([reader.read(int(i)) for i in picked]) if rows else np.zeros((0, t, d), np.float32)
            )
            norms = np.linalg.norm(values.reshape(len(values), -1), axis=1) if rows else np.zeros(0)
            shards.append(
                {
                    "shard": shard,
                    "rows": rows,
                    "errors": info["errors"],
                    "bytes": disk,
                    "compression": (rows * raw_per_row / disk) if disk and rows else None,
                    "mean": float(values.mean()) if rows else None,
                    "std": float(values.std()) if rows else None,
                    "mean_l2": float(norms.mean()) if rows else None,
                    "fidelity": info.get("fidelity"),
                }
            )
            totals.update(rows=rows, errors=info["errors"], bytes=disk)
        fidelities = [s["fidelity"] for s in shards if s["fidelity"]]
        out["teachers"][teacher] = {
            "fingerprint": spec.fingerprint,
            "shape": list(spec.shape),
            "dtype": spec.dtype,
            "model": spec.model,
            "shards": shards,
            "rows": totals["rows"],
            "errors": totals["errors"],
            "bytes": totals["bytes"],
            "bytes_per_row": totals["bytes"] / totals["rows"] if totals["rows"] else None,
            "compression": (totals["rows"] * raw_per_row / totals["bytes"]) if totals["bytes"] else None,
            "fidelity": {
                "cosine_mean": float(np.mean([f["cosine_mean"] for f in fidelities])),
                "cosine_min": float(np.min([f["cosine_min"] for f in fidelities])),
                "max_rel_error": float(np.max([f["max_rel_error"] for f in fidelities])),
            }
            if fidelities
            else None,
        }
    return out


@dataclass
class VerifyReport:
    problems: list[str] = field(default_factory=list)
    checked_rows: int = 0
    checked_shards: int = 0
    corpus_samples: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {
            "ok": self.ok,
            "problems": self.problems,
            "checked_rows": self.checked_rows,
            "checked_shards": self.checked_shards,
            "corpus_samples": self.corpus_samples,
        }


def verify_cache(
    cache: TargetCache, corpus: str | None = None, storage_options: dict | None = None
) -> VerifyReport:
    """Every shard readable, manifest consistent, no duplicate keys; with `corpus`, every key and sha256."""
    report = VerifyReport()
    problems = report.problems
    try:
        specs = cache.specs()
        cache.metadata()
    except Exception as exc:
        problems.append(f"{cache.root.url}: {exc}")
        return report
    known: dict[str, dict[str, tuple[str, str]]] = {}  # teacher -> key -> (shard, sha256)
    errored: dict[str, dict[str, str]] = {}  # teacher -> key -> shard
    for teacher, spec in specs.items():
        known[teacher], errored[teacher] = {}, {}
        for shard in cache.committed_shards(teacher):
            where = f"{teacher}/{shard}"
            report.checked_shards += 1
            try:
                info = cache.commit_info(teacher, shard)
                reader = cache.open_shard(teacher, shard)
                manifest = cache.shard_manifest(teacher, shard)
                errors = cache.shard_errors(teacher, shard)
            except Exception as exc:
                problems.append(f"{where}: unreadable: {exc}")
                continue
            rows = len(reader)
            if info.get("fingerprint") != spec.fingerprint:
                problems.append(
                    f"{where}: commit fingerprint {info.get('fingerprint')} != cache.json {spec.fingerprint}"
                )
            if reader.shape[1:] != tuple(spec.shape):
                problems.append(f"{where}: targets shape {reader.shape} does not match spec {spec.shape}")
            if info.get("rows") != rows or manifest.num_rows != rows:
                problems.append(
                    f"{where}: {rows} stored rows, commit says {info.get('rows')}, manifest has {manifest.num_rows}"
                )
            if errors.num_rows != info.get("errors"):
                problems.append(f"{where}: {errors.num_rows} error rows, commit says {info.get('errors')}")
            if manifest.column("row").to_pylist() != list(range(manifest.num_rows)):
                problems.append(f"{where}: manifest rows are not 0..{manifest.num_rows - 1} in order")
            if set(manifest.column("fingerprint").to_pylist()) - {spec.fingerprint}:
                problems.append(f"{where}: manifest rows carry a fingerprint other than {spec.fingerprint}")
            if set(manifest.column("shard").to_pylist()) - {shard}:
                problems.append(f"{where}: manifest rows name another shard")
            for key, sha in zip(manifest.column("key").to_pylist(), manifest.column("sha256").to_pylist()):
                if key in known[teacher]:
                    problems.append(
                        f"{where}: key {key!r} duplicated (also in shard {known[teacher][key][0]})"
                    )
                known[teacher][key] = (shard, sha)
            for key in errors.column("key").to_pylist():
                errored[teacher][key] = shard
            for start in range(0, rows, 64):
                try:
                    block = reader.read(slice(start, min(rows, start + 64)))
                except Exception as exc:
                    problems.append(f"{where}: rows {start}..{min(rows, start + 64) - 1} unreadable: {exc}")
                    continue
                bad = ~np.isfinite(block.reshape(len(block), -1)).all(axis=1)
                for offset in np.flatnonzero(bad):
                    problems.append(
                        f"{where}: row {start + offset} (key {manifest.column('key')[start + offset]}) holds NaN/inf"
                    )
                report.checked_rows += len(block)
    if corpus is not None:
        _verify_against_corpus(corpus, specs, known, errored, report, storage_options)
    return report


def _verify_against_corpus(corpus, specs, known, errored, report, storage_options) -> None:
    problems = report.problems
    try:
        shards = list_shards(corpus, storage_options)
    except Exception as exc:
        problems.append(f"corpus {corpus}: {exc}")
        return
    seen: set[str] = set()
    for shard in shards:
        for sample in iter_samples(shard.url, storage_options):
            report.corpus_samples += 1
            seen.add(sample.key)
            image = None if isinstance(sample, ReadFailure) else sample.image_bytes
            sha = sha256_hex(image) if image is not None else None
            for teacher in specs:
                if sample.key in known[teacher]:
                    stored_shard, stored_sha = known[teacher][sample.key]
                    if stored_shard != shard.name:
                        problems.append(
                            f"{teacher}: key {sample.key!r} is in cache shard {stored_shard}, corpus shard {shard.name}"
                        )
                    if sha is not None and stored_sha != sha:
                        problems.append(
                            f"{teacher}/{shard.name}: key {sample.key!r}: image sha256 {sha[:12]} "
                            f"differs from the cached {stored_sha[:12]} (image changed)"
                        )
                elif sample.key not in errored[teacher]:
                    problems.append(
                        f"{teacher}/{shard.name}: key {sample.key!r} has no target and no recorded error"
                    )
    for teacher in specs:
        extra = sorted(set(known[teacher]) - seen)
        if extra:
            problems.append(
                f"{teacher}: {len(extra)} cached keys are not in the corpus (first: {extra[0]!r})"
            )
