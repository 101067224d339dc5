"""`ola bench cache`: write/read speed, random-read latency and bytes per image.

Feature-like synthetic targets at the paper's shapes, every storage dtype, a temporary local cache;
figures per image across the three teachers, int8 fidelity against the float32 input. `backend`
picks the reader timed: "direct" (the cache's own, schemas/shardfile.py) or "zarr" (plain
zarr-python, what an outside tool does); writes always go through `TargetCache.write_shard`.
"""

from __future__ import annotations

import tempfile
import time

import numpy as np

from olavlm.schemas import quant
from olavlm.schemas.cache import ROWS_PER_OBJECT, TargetCache
from olavlm.schemas.spec import STORAGE_DTYPES, TeacherSpec
from olavlm.schemas.synthetic import feature_like

PAPER_SHAPES = {"depth": (576, 1024), "seg": (576, 1536), "gen": (1, 1024)}
BACKENDS = ("direct", "zarr")


class ZarrReader:
    """The ShardReader calls the benchmark times, through zarr-python's own array indexing."""

    def __init__(self, cache: TargetCache, teacher: str, shard: str):
        import zarr

        self.spec = cache.spec(teacher)
        group = zarr.open_group(cache.root.zarr_store(teacher, shard, "data.zarr", read_only=True), mode="r")
        self.targets = group["targets"]
        self.scale = group["scale"] if self.spec.dtype == "int8" else None

    def read(self, rows):
        return quant.decode(
            self.targets[rows], None if self.scale is None else self.scale[rows], self.spec.dtype
        )

    def iter_blocks(self, block: int = ROWS_PER_OBJECT):
        for start in range(0, self.targets.shape[0], block):
            yield start, self.read(slice(start, min(start + block, self.targets.shape[0])))


def bench_cache(
    images: int = 64, random_reads: int = 64, seed: int = 0, root: str | None = None, backend: str = "direct"
) -> dict:
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
    data = {
        name: feature_like(images, t, d, seed=seed + i)
        for i, (name, (t, d)) in enumerate(PAPER_SHAPES.items())
    }
    raw16 = sum(t * d * 2 for t, d in PAPER_SHAPES.values())
    results = {
        "backend": backend,
        "images": images,
        "shapes": {k: list(v) for k, v in PAPER_SHAPES.items()},
        "dtypes": {},
    }
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        for dtype in STORAGE_DTYPES:
            cache = TargetCache(f"{tmp}/{dtype}")
            write_s = read_s = 0.0
            latencies, cosines, stored_bytes = [], [], 0
            for name, (t, d) in PAPER_SHAPES.items():
                spec = TeacherSpec(name=name, kind="synthetic", model="synthetic", shape=(t, d), dtype=dtype)
                cache.register(spec)
                keys = [f"img-{i:06d}" for i in range(images)]
                start = time.perf_counter()
                values, scale = quant.encode(data[name], dtype)
                cache.write_shard(name, "shard-000000", keys, ["0" * 64] * images, values, scale)
                write_s += time.perf_counter() - start
                reader = (
                    cache.open_shard(name, "shard-000000")
                    if backend == "direct"
                    else ZarrReader(cache, name, "shard-000000")
                )
                start = time.perf_counter()
                decoded = np.concatenate([block for _, block in reader.iter_blocks()])
                read_s += time.perf_counter() - start
                cosines.append(quant.fidelity(data[name], decoded)["cosine_min"])
                rng = np.random.default_rng(seed)
                for row in rng.integers(0, images, random_reads):
                    start = time.perf_counter()
                    reader.read(int(row))
                    latencies.append(time.perf_counter() - start)
                stored_bytes += cache.root.size(name, "shard-000000", "data.zarr")
            raw_mb = images * raw16 / 1e6
            results["dtypes"][dtype] = {
                "bytes_per_image": stored_bytes / images,
                "ratio_to_16bit_raw": stored_bytes / (images * raw16),
                "write_MBps_16bit_equiv": raw_mb / write_s,
                "read_MBps_16bit_equiv": raw_mb / read_s,
                "random_read_ms_p50": float(np.median(latencies) * 1e3),
                "random_read_ms_p95": float(np.percentile(latencies, 95) * 1e3),
                "cosine_min": float(min(cosines)),
            }
    base = results["dtypes"]["float16"]["bytes_per_image"]
    for entry in results["dtypes"].values():
        entry["ratio_to_float16_stored"] = entry["bytes_per_image"] / base
    return results
