"""Sections 2 and 3: the corpus decoded and preprocessed once on the host, then the bare forward loop."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from olavlm.bench.gpu.common import Setup, peak_gb, reset_peak, sync


# -- 2. inputs ------------------------------------------------------------------------------------
def predecode(setup: Setup, recipes: dict) -> tuple[list[dict], dict]:
    """The corpus' full batches as {teacher: uint8 (B, H, W, 3)} (pinned on CUDA) and the host figures."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from olavlm.pipeline.precompute import default_shards_in_flight, preprocess_batches
    from olavlm.schemas.corpus import list_shards

    batch_size = setup.config.batch_size
    shards = list_shards(setup.corpus)

    def decode(shard) -> list[dict]:
        return [b for b in preprocess_batches(shard.url, recipes, batch_size) if b["keys"]]

    start = time.perf_counter()
    first = decode(shards[0])  # one core: the work of one preprocess task of the pipeline
    per_core = sum(len(b["keys"]) for b in first) / (time.perf_counter() - start)
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:  # PIL releases the GIL in decode and resize
        rest = [b for part in pool.map(decode, shards[1:]) for b in part]
    seconds = time.perf_counter() - start
    pin = setup.device.startswith("cuda")
    batches = []
    for b in first + rest:
        if len(b["keys"]) == batch_size:  # full batches only: torch.compile sees one shape
            arrays = {n: torch.from_numpy(a) for n, a in b["inputs"].items()}
            batches.append({n: t.pin_memory() if pin else t for n, t in arrays.items()})
    if not batches:
        from olavlm.schemas.errors import ConfigError

        raise ConfigError(
            f"no full batch of {batch_size} images in {setup.config.images} images "
            f"(shards of {setup.config.shard_size}): raise --images or lower --batch-size"
        )
    # precompute's default for one actor on this node (before its object-store cap)
    in_flight = setup.config.shards_in_flight or default_shards_in_flight(
        1, {"CPU": os.cpu_count() or 1}, gpus=setup.device.startswith("cuda")
    )
    figures = {
        "images": sum(len(next(iter(b.values()))) for b in batches),
        "batches": len(batches),
        "batch_size": batch_size,
        "shards": len(shards),
        "shard_size": setup.config.shard_size,
        "input_sizes": {n: list(t.shape[1:3]) for n, t in batches[0].items()},
        "host_preprocess_ms_per_image": round(1e3 / per_core, 2),
        "host_preprocess_images_per_s_per_core": round(per_core, 1),
        "pipeline_shards_in_flight": in_flight,
        "pipeline_host_ceiling_images_per_s": round(per_core * min(in_flight, os.cpu_count() or 1), 1),
        "predecode_s": round(seconds, 1),
    }
    return batches, figures


# -- 3. the bare loop -----------------------------------------------------------------------------
def forward_rate(
    teacher, batches: list[dict], name: str, device: str, prepare: Callable | None = None
) -> tuple[float, float, bool]:
    """(images/s, seconds, warm-up output finite) of `teacher` over `batches[*][name]`, after one warm-up batch.

    `prepare` turns the batch entry into the teacher's uint8 input (the GPU preprocessing lever).
    Random full-size weights in float16 could overflow: the warm-up batch's targets say whether they do.
    """
    get = (lambda batch: prepare(batch[name])) if prepare else (lambda batch: batch[name])
    finite = bool(
        teacher(get(batches[0])).isfinite().all()
    )  # warm-up: first kernels, cuBLAS handles, compilation
    start = time.perf_counter()
    for batch in batches:
        teacher(get(batch))
    sync(device)
    seconds = time.perf_counter() - start
    return sum(len(b[name]) for b in batches) / seconds, seconds, finite


def bare_rates(teachers: dict, batches: list[dict], device: str, prepare: dict | None = None) -> dict:
    """Per teacher images/s and peak memory; all three = images / summed seconds."""
    per_teacher, total = {}, 0.0
    for name, teacher in teachers.items():
        reset_peak(device)
        rate, seconds, finite = forward_rate(teacher, batches, name, device, (prepare or {}).get(name))
        total += seconds
        per_teacher[name] = {
            "images_per_s": round(rate, 2),
            "peak_memory_gb": peak_gb(device),
            "finite": finite,
        }
    images = sum(len(b[next(iter(teachers))]) for b in batches)
    peaks = [v["peak_memory_gb"] for v in per_teacher.values() if v["peak_memory_gb"] is not None]
    return {
        "per_teacher": per_teacher,
        "all_images_per_s": round(images / total, 2),
        "peak_memory_gb": max(peaks) if peaks else None,
    }


def weights_gb(teacher) -> float:
    return round(sum(p.numel() * p.element_size() for p in teacher.module.parameters()) / 2**30, 3)
