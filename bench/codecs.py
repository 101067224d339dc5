"""`ola bench codecs`: bytes per sample and one-core decode time of each Blosc codec, per storage dtype.

One sample = the paper's three targets (feature-like values, schemas/synthetic.py), each row encoded
as the cache stores it (one Blosc frame per inner chunk) and decoded as the loader does, straight
into a buffer on one thread; median over `repeats`. "none" is Blosc at clevel 0. `break_even_MBps`
answers "does the codec pay?": the per-core read bandwidth below which the bytes it saves take
longer to read than its extra decode costs. Cost: the CPU figures depend on the core and its load.
"""

from __future__ import annotations

import os
import statistics
import time

import numpy as np

SHAPES = {"depth": (576, 1024), "seg": (576, 1536), "gen": (1, 1024)}
CODECS = (  # (label, cname, clevel, shuffle)
    ("none", "lz4", 0, "noshuffle"),
    ("lz4", "lz4", 5, "noshuffle"),
    ("lz4+shuffle", "lz4", 5, "shuffle"),
    ("zstd1", "zstd", 1, "noshuffle"),
    ("zstd1+shuffle", "zstd", 1, "shuffle"),
    ("zstd3", "zstd", 3, "noshuffle"),
    ("zstd3+shuffle", "zstd", 3, "shuffle"),
)


def _rows(samples: int, seed: int, dtype: str) -> list[np.ndarray]:
    """Every stored row of `samples` samples in storage order (targets, then scale for int8)."""
    from olavlm.schemas import quant
    from olavlm.schemas.synthetic import feature_like

    rows = []
    for i, (t, d) in enumerate(SHAPES.values()):
        values, scale = quant.encode(feature_like(samples, t, d, seed=seed + i), dtype)
        rows.extend(np.ascontiguousarray(r) for r in values)
        if scale is not None:
            rows.extend(np.ascontiguousarray(r) for r in scale)
    return rows


def bench_codecs(
    samples: int = 8, repeats: int = 5, seed: int = 0, dtypes: tuple[str, ...] | None = None
) -> dict:
    """Figures per dtype and codec (see the module docstring)."""
    import numcodecs.blosc

    from olavlm.schemas import shardfile
    from olavlm.schemas.spec import STORAGE_DTYPES, default_codec

    numcodecs.blosc.use_threads = False
    numcodecs.blosc.set_nthreads(1)
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:  # torch is not needed for the measurement itself
        pass
    try:
        load = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        load = None
    out: dict = {
        "samples": samples,
        "repeats": repeats,
        "shapes": {k: list(v) for k, v in SHAPES.items()},
        "threads": 1,
        "load_average_before": load,
        "dtypes": {},
    }
    for dtype in dtypes or STORAGE_DTYPES:
        rows = _rows(samples, seed, dtype)
        raw = sum(r.nbytes for r in rows) / samples
        chosen = default_codec(dtype)
        table = {}
        for label, cname, clevel, shuffle in CODECS:
            codec = shardfile.blosc_codec(cname, clevel, shuffle)
            t0 = time.perf_counter()
            frames = [codec.encode(r) for r in rows]
            encode_ms = (time.perf_counter() - t0) / samples * 1e3
            dests = [np.zeros_like(r) for r in rows]
            for frame, dest in zip(frames, dests):  # warm-up pass (page faults, caches), not timed
                numcodecs.blosc.decompress(frame, dest)
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                for frame, dest in zip(frames, dests):
                    numcodecs.blosc.decompress(frame, dest)
                times.append((time.perf_counter() - t0) / samples * 1e3)
            if not all(np.array_equal(a, b) for a, b in zip(rows, dests)):
                raise AssertionError(f"{dtype} {label}: decode is not lossless")
            stored = sum(len(f) for f in frames) / samples
            table[label] = {
                "cname": cname,
                "clevel": clevel,
                "shuffle": shuffle,
                "bytes_per_sample": int(round(stored)),
                "ratio": round(raw / stored, 3),
                "decode_ms": round(statistics.median(times), 3),
                "encode_ms": round(encode_ms, 2),
                "default": (cname, clevel, shuffle) == (chosen.cname, chosen.clevel, chosen.shuffle),
            }
        base = table["none"]
        for r in table.values():
            saved = base["bytes_per_sample"] - r["bytes_per_sample"]
            extra = r["decode_ms"] - base["decode_ms"]
            r["saved_vs_none_pct"] = round(100 * saved / base["bytes_per_sample"], 1)
            r["break_even_MBps"] = round(saved / 1e6 / (extra / 1e3), 1) if extra > 0 and saved > 0 else None
        out["dtypes"][dtype] = {"raw_bytes_per_sample": int(raw), "codecs": table}
    try:
        out["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        out["load_average_after"] = None
    return out
