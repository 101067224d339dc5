"""Section "seg": the seg teacher alone, one row per speed lever, each against the float32 eager reference.

Rows: attention (transformers' eager, transformers' sdpa, the pipeline's fused window attention) at
the first compute dtype and batch size; `torch.compile` modes of the fused path; the other compute
dtypes; other batch sizes. Each row loads the teacher afresh (as an actor does), times a warm-up batch
apart (the compile time when compiled), then the images of `seg_images` in full batches, and reports
the per-image cosine of its targets against float32 with eager attention on the first images.
"""

from __future__ import annotations

import time

from olavlm.bench.gpu.bare import forward_rate
from olavlm.bench.gpu.common import Setup, free, peak_gb, reset_peak, sync

REFERENCE_IMAGES = 8
"""Images of the float32 eager reference (eager attention materialises every window's scores)."""


def seg_rows_wanted(config) -> list[dict]:
    """(attention, compile, dtype, batch_size) of every row, in order; the first is the pipeline's default."""
    first, size = config.compute_dtypes[0], config.batch_size
    rows = [
        dict(attention=a, compile="off", dtype=first, batch_size=size) for a in ("fused", "sdpa", "eager")
    ]
    if config.compile:
        rows += [
            dict(attention="fused", compile=m, dtype=first, batch_size=size) for m in config.seg_compile_modes
        ]
    rows += [
        dict(attention="fused", compile="off", dtype=d, batch_size=size) for d in config.compute_dtypes[1:]
    ]
    rows += [
        dict(attention="fused", compile="off", dtype=first, batch_size=b) for b in config.seg_batch_sizes
    ]
    return rows


def load_seg(setup: Setup, attention: str, dtype: str, compile: str = "off"):
    import torch

    from olavlm.pipeline.teachers import load_teacher

    teacher = load_teacher(
        setup.sources()["seg"],
        device=setup.device,
        dtype=getattr(torch, dtype),
        swin_attention="fused" if attention == "fused" else "transformers",
        compile=compile,
        compile_backend=setup.config.compile_backend,
    )
    if attention == "eager":
        teacher.module.set_attn_implementation("eager")
    return teacher


def seg_flops_per_image(teacher, image) -> float | None:
    """FLOPs of one image's forward (torch's FlopCounterMode: matmuls, convolutions, attention), or None."""
    try:
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter:
            teacher(image[None])
        return float(counter.get_total_flops())
    except Exception:  # noqa: BLE001 - a missing FLOP formula only drops the TFLOP/s column
        return None


def run_seg_levers(setup: Setup, batches: list[dict]) -> dict:
    """Every row of `seg_rows_wanted` over the seg inputs of `batches` -> {"reference", "rows"}."""
    import torch

    config, device = setup.config, setup.device
    pool = torch.cat([b["seg"] for b in batches])[: config.seg_images]
    wanted_rows = seg_rows_wanted(config)
    reference_teacher = load_seg(setup, "eager", "float32")
    # no larger than any row's batch: a compiled row would otherwise pad to it and compile again
    reference_images = pool[: min([REFERENCE_IMAGES, *(r["batch_size"] for r in wanted_rows)])]
    reference = reference_teacher(reference_images)
    flops = seg_flops_per_image(reference_teacher, pool[0])
    del reference_teacher
    free(device)
    rows = []
    for wanted in wanted_rows:
        label = "seg {attention} {dtype} batch {batch_size} compile {compile}".format(**wanted)
        try:
            row = seg_row(setup, pool, reference_images, reference, flops, **wanted)
        except Exception as exc:  # noqa: BLE001 - reported in the row and on stderr, the run goes on
            setup.log(f"{label}: failed: {type(exc).__name__}: {exc}")
            row = {**wanted, "error": f"{type(exc).__name__}: {exc}"[:500]}
        else:
            setup.log(f"{label}: {row['images_per_s']:.1f} images/s, cosine {row['cosine_min_vs_float32']}")
        rows.append(row)
        free(device)
    return {
        "images": int(pool.shape[0]),
        "reference": f"float32, transformers' eager attention, first {reference_images.shape[0]} images",
        "tflop_per_image": round(flops / 1e12, 4) if flops else None,
        "rows": rows,
    }


def seg_row(setup: Setup, pool, reference_images, reference, flops, **wanted) -> dict:
    """One row: load, warm-up (compile) batch timed apart, the full batches of `pool`, cosine vs reference."""
    import torch

    size, device = wanted["batch_size"], setup.device
    pinned = device.startswith("cuda")
    batches = [{"seg": pool[i : i + size]} for i in range(0, pool.shape[0] - size + 1, size)]
    if pinned:
        batches = [{"seg": b["seg"].pin_memory()} for b in batches]
    if not batches:
        raise ValueError(f"--seg-images {pool.shape[0]} holds no full batch of {size}")
    teacher = load_seg(setup, wanted["attention"], wanted["dtype"], wanted["compile"])
    start = time.perf_counter()
    teacher(batches[0]["seg"])  # the first call compiles; forward_rate's own warm-up then runs warm
    sync(device)
    warmup_s = time.perf_counter() - start
    reset_peak(device)
    rate, seconds, finite = forward_rate(teacher, batches, "seg", device)
    targets = teacher(reference_images)
    cosine = torch.nn.functional.cosine_similarity(targets.flatten(1).double(), reference.flatten(1).double())
    return {
        **wanted,
        "images_per_s": round(rate, 2),
        "tflop_per_s": round(rate * flops / 1e12, 1) if flops else None,
        "first_batch_s": round(warmup_s, 1),
        "peak_memory_gb": peak_gb(device),
        "finite": finite,
        "cosine_min_vs_float32": round(float(cosine.min()), 6),
    }
