"""`ola bench precompute`: how busy the pipeline keeps its teachers.

busy fraction = pipeline images/s / bare loop images/s, both measured in one run: the pipeline is
`precompute` over a demo corpus (timed on a second job in a warm Ray session), the bare loop the
same teachers in this process over the same batches decoded beforehand. The bare loop runs before
and after the pipeline, with Ray stopped, and the faster is the reference, so the fraction is
conservative on a loaded machine. Before Ray starts, the host's preprocessing CPU time per image is
measured with and without `--device-resize`, at the preset's sizes and the paper's.
Cost: on a CPU, preprocessing shares the cores with the teachers (a GPU node does not), so the
figure is a lower bound; the random `small` preset keeps it about the pipeline, not Python overhead.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass

from olavlm.pipeline.presets import TEACHER_NAMES


@dataclass(frozen=True, kw_only=True)
class BenchConfig:
    preset: str = "small"
    """Teacher preset to time."""
    images: int = 96
    """Images in the demo corpus."""
    shards: int = 3
    """Corpus shards (images split evenly)."""
    batch_size: int = 16
    """Images per forward, in both measurements."""
    teachers: tuple[str, ...] = TEACHER_NAMES
    """Teachers to run."""
    teacher_threads: int = 0
    """torch threads of the teachers in both measurements; 0 = all cores (as `precompute` does on a CPU).
    Fewer threads leave cores to decoding, as a GPU node does: the GPU-like reading of the busy fraction."""
    device_resize: bool = False
    """Run the timed pipeline job with `--device-resize` (the host only decodes; the actor resizes)."""


def paper_recipes() -> dict[str, dict]:
    """The paper teachers' geometry (what their specs' preprocess holds), without loading any weights."""
    from olavlm.pipeline.preprocess import processor_output_size
    from olavlm.pipeline.teachers import (
        ONEFORMER_PROCESSOR_DEFAULTS,
        PAPER_DEPTH_SIZE,
        PAPER_SEG_SIZE,
        SEG_SQUASH_RESAMPLE,
    )

    seg = processor_output_size(PAPER_SEG_SIZE, PAPER_SEG_SIZE, ONEFORMER_PROCESSOR_DEFAULTS["size"])
    return {
        "depth": {"resize": [PAPER_DEPTH_SIZE] * 2, "resample": "bicubic"},
        "seg": {
            "resize": [PAPER_SEG_SIZE] * 2,
            "resample": SEG_SQUASH_RESAMPLE,
            "processor_resize": list(seg),
            "processor_resample": "bilinear",
        },
        "gen": {"resize_shortest": 224, "center_crop": [224, 224], "resample": "bicubic"},
    }


def host_ms_per_image(corpus: str, recipes: dict[str, dict], batch_size: int) -> float:
    """Process CPU ms per image of stage 1 (`preprocess_batches`) over every shard of `corpus`, in this process."""
    from olavlm.pipeline.precompute import preprocess_batches
    from olavlm.schemas.corpus import list_shards

    images, start = 0, time.process_time()
    for shard in list_shards(corpus):
        for batch in preprocess_batches(shard.url, recipes, batch_size):
            images += len(batch["keys"])
    return round((time.process_time() - start) / max(1, images) * 1e3, 2)


def actor_resize_ms_per_image(corpus: str, recipes: dict[str, dict], batch_size: int, threads: int) -> float:
    """Wall ms per image of `device_prepare` for every teacher (what `--device-resize` adds to the actor), on this
    machine's CPU with the teachers' torch thread count, over the decoded batches of `corpus`: the faster of two
    passes after a warm-up batch (wall time on a shared machine: the slower pass carries the other load)."""
    import torch

    from olavlm.pipeline.precompute import preprocess_batches
    from olavlm.pipeline.preprocess import device_prepare
    from olavlm.schemas.corpus import list_shards

    torch.set_num_threads(threads)
    batches = [
        b
        for shard in list_shards(corpus)
        for b in preprocess_batches(shard.url, recipes, batch_size)
        if b["keys"]
    ]
    images = sum(len(b["keys"]) for b in batches)

    def one_pass(chosen: list[dict]) -> float:
        start = time.perf_counter()
        for batch in chosen:
            for name, recipe in recipes.items():
                device_prepare(batch["inputs"][name], recipe, "cpu")
        return time.perf_counter() - start

    one_pass(batches[:1])  # torch's first calls (thread pool, kernels' first use)
    return round(min(one_pass(batches), one_pass(batches)) / max(1, images) * 1e3, 2)


def host_costs(corpus: str, recipes: dict[str, dict], batch_size: int, threads: int) -> dict[str, float]:
    """Host ms per image with the resizes on the host (the default) and with `--device-resize` (decode only),
    and what `--device-resize` moves into the actor when its device is this CPU."""
    on_device = {n: {**r, "resize_on": "device"} for n, r in recipes.items()}
    return {
        "host_resize": host_ms_per_image(corpus, recipes, batch_size),
        "device_resize": host_ms_per_image(corpus, on_device, batch_size),
        "device_resize_actor_cpu_wall": actor_resize_ms_per_image(corpus, on_device, batch_size, threads),
    }


def bare_loop_images_per_second(
    corpus: str, config: BenchConfig, threads: int
) -> tuple[float, dict[str, dict]]:
    """Forward the teachers over pre-decoded batches (the shards' own batches), timed after one warm-up;
    -> (images/s, the teachers' preprocess recipes)."""
    import torch

    from olavlm.pipeline.precompute import preprocess_batches
    from olavlm.pipeline.presets import preset_sources
    from olavlm.pipeline.teachers import load_teacher
    from olavlm.schemas.corpus import list_shards

    torch.set_num_threads(threads)
    teachers = {n: load_teacher(s) for n, s in preset_sources(config.preset, config.teachers).items()}
    recipes = {n: t.spec.preprocess for n, t in teachers.items()}
    batches = [
        {n: torch.from_numpy(b["inputs"][n]) for n in teachers}
        for shard in list_shards(corpus)
        for b in preprocess_batches(shard.url, recipes, config.batch_size)
        if b["keys"]
    ]
    for name, teacher in teachers.items():  # warm-up: first-call allocations
        teacher(batches[0][name][:1])
    start = time.perf_counter()
    for batch in batches:
        for name, teacher in teachers.items():
            teacher(batch[name])
    seconds = time.perf_counter() - start
    return sum(len(b[config.teachers[0]]) for b in batches) / seconds, recipes


def run_precompute_bench(config: BenchConfig) -> dict:
    from olavlm.pipeline.precompute import PrecomputeConfig, precompute, ray_session
    from olavlm.schemas.corpus_build import build_demo_corpus

    threads = config.teacher_threads or os.cpu_count() or 1  # default: the one CPU actor gets all cores
    with tempfile.TemporaryDirectory(prefix="olavlm-bench-") as tmp:
        corpus = os.path.join(tmp, "corpus")
        build_demo_corpus(corpus, samples=config.images, shard_size=-(-config.images // config.shards))
        warmup = os.path.join(tmp, "warmup")
        build_demo_corpus(warmup, samples=config.batch_size, shard_size=config.batch_size)
        job = {
            "teachers": config.teachers,
            "preset": config.preset,
            "batch_size": config.batch_size,
            "progress": False,
            "cpu_threads": threads,
            "device_resize": config.device_resize,
        }
        before, recipes = bare_loop_images_per_second(corpus, config, threads)
        paper = paper_recipes()
        host = {
            "preset_sizes": host_costs(corpus, recipes, config.batch_size, threads),
            "paper_sizes": host_costs(
                corpus, {n: paper[n] for n in recipes if n in paper}, config.batch_size, threads
            ),
        }
        with ray_session(None):
            # warm-up: Ray starts and imports its task worker processes once per session (seconds each
            # on 2 cores); a long job pays that once, so it is kept out of the steady-state figure
            precompute(PrecomputeConfig(corpus=warmup, cache=os.path.join(tmp, "warmup-cache"), **job))
            summary = precompute(PrecomputeConfig(corpus=corpus, cache=os.path.join(tmp, "cache"), **job))
        after, _ = bare_loop_images_per_second(corpus, config, threads)
    bare = max(before, after)  # the faster of the two: a conservative busy fraction on a noisy machine
    pipeline = summary.images_per_second
    return {
        "preset": config.preset,
        "teachers": ",".join(config.teachers),
        "images": summary.images,
        "batch_size": config.batch_size,
        "device": "cpu",
        "cpu_count": os.cpu_count(),
        "torch_threads": threads,
        "pipeline_images_per_s": round(pipeline, 2),
        "bare_images_per_s": round(bare, 2),
        "bare_images_per_s_before_after": [round(before, 2), round(after, 2)],
        "busy_fraction": round(pipeline / bare, 3) if bare else 0.0,
        "target": 0.90,
        "actor_compute_share": round(summary.teacher_busy, 3),
        "pipeline_seconds": round(summary.seconds, 1),
        "device_resize": config.device_resize,
        "host_cpu_ms_per_image": host,
    }
