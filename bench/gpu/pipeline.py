"""Section 5: `precompute` jobs (the function `ola precompute` calls) over the benchmark corpus, in one Ray session."""

from __future__ import annotations

import os
import shutil
import time

from olavlm.bench.gpu.common import DevicePeak, Report, Setup
from olavlm.bench.gpu.config import TEACHERS

DEVICE_RESIZE_ARM = "all_device_resize"
"""Label of the three-teacher job run with `--device-resize` (resize and crop on the teachers' device)."""
OVERLAP_ARM = "all_overlap"
"""Label of the three-teacher job with `--actor-concurrency 2` (copies back overlap the next forward)."""


# -- 5. the pipeline ------------------------------------------------------------------------------
def run_job(setup: Setup, names: tuple[str, ...], dtype: str, cache: str, **options) -> dict:
    """One `precompute` job over the benchmark corpus (`options`: PrecomputeConfig fields) -> its figures."""
    from olavlm.pipeline.precompute import precompute

    with DevicePeak(setup.device) as peak:
        summary = precompute(setup.job(names, dtype, setup.corpus, cache, **options))
    return {
        "images": summary.images,
        "errors": summary.errors,
        "seconds": round(summary.seconds, 2),
        "images_per_s": round(summary.images_per_second, 2),
        "actor_compute_share": round(summary.teacher_busy, 3),
        "shards_in_flight": summary.shards_in_flight,
        "mb_written": round(summary.bytes / 1e6, 1),
        **peak.figures(),
    }


def busy_fraction(bare: dict | None, label: str, pipeline_rate: float) -> dict:
    """Pipeline images/s over the bare loop's for the same teachers ('all' or one name); {} without a bare run."""
    if not bare:
        return {}
    reference = bare["all_images_per_s"] if label == "all" else bare["per_teacher"][label]["images_per_s"]
    return {"bare_images_per_s": reference, "busy_fraction": round(pipeline_rate / reference, 3)}


def run_pipeline(setup: Setup, report: Report) -> str:
    """Every precompute job in one Ray session; -> the cache of the last dtype's three-teacher job (kept)."""
    from olavlm.pipeline.precompute import precompute, ray_session
    from olavlm.schemas.corpus_build import build_demo_corpus

    config = setup.config
    pipeline = report.data.setdefault("pipeline", {})
    kept = None
    with report.section("pipeline"), ray_session(None):
        if (
            not config.smoke
        ):  # Ray starts its task worker processes on first use: paid here, not by the timed jobs
            start = time.perf_counter()
            warmup = os.path.join(setup.tmp, "warmup")
            build_demo_corpus(warmup, samples=config.batch_size, shard_size=config.batch_size)
            precompute(
                setup.job(
                    ("depth",), config.compute_dtypes[0], warmup, os.path.join(setup.tmp, "warmup-cache")
                )
            )
            report.log(f"pipeline: Ray warm-up job {time.perf_counter() - start:.1f} s")
        for index, dtype in enumerate(config.compute_dtypes):
            # one job per teacher at the first dtype only: each costs an actor start and a model load
            # (teachers, label, job options): the --device-resize and overlap arms at the first dtype
            arms = [(TEACHERS, "all", {})]
            if config.pipeline_device_resize and index == 0:
                arms.append((TEACHERS, DEVICE_RESIZE_ARM, {"device_resize": True}))
            if config.pipeline_overlap and index == 0:
                arms.append((TEACHERS, OVERLAP_ARM, {"actor_concurrency": 2}))
            if config.per_teacher and index == 0:
                arms += [((n,), n, {}) for n in TEACHERS]
            for names, label, options in arms:
                cache = os.path.join(setup.tmp, f"cache-{dtype}-{label}")
                report.log(f"pipeline {dtype} {label}: running")
                figures = {**run_job(setup, names, dtype, cache, **options), "options": options}
                figures.update(
                    busy_fraction(
                        report.data.get("bare", {}).get(dtype),
                        "all" if len(names) > 1 else label,
                        figures["images_per_s"],
                    )
                )
                pipeline.setdefault(dtype, {})[label] = figures
                report.log(
                    f"pipeline {dtype} {label}: {figures['images_per_s']:.1f} images/s, busy "
                    f"{figures.get('busy_fraction')}, actor {figures['actor_compute_share']}, "
                    f"peak {figures['peak_device_memory_gb']} GB, {figures['errors']} errors"
                )
                report.save()
                if label == "all":
                    if kept:
                        shutil.rmtree(kept, ignore_errors=True)
                    kept = cache
                else:
                    shutil.rmtree(cache, ignore_errors=True)
    return kept
