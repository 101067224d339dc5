"""Section 4: the levers, each a row of the bare loop at the first compute dtype beside its baseline.

Each lever is a function `(setup, teachers, batches, ...) -> (rates, extra figures)` that leaves
the teachers as it found them, except `compiled` (run last: the teachers are dropped after it).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from olavlm.bench.gpu.bare import bare_rates
from olavlm.bench.gpu.common import Setup, sync
from olavlm.pipeline.preprocess import device_prepare  # the pipeline's --device-resize path; re-exported here


# -- 4. levers ------------------------------------------------------------------------------------
def compile_blocks(module, backend: str) -> int:
    """Regional torch.compile: every innermost repeated block (children of a ModuleList holding no ModuleList).

    Blocks of one class and shape share one compiled graph, so compile time grows with the
    distinct block shapes, not the depth. -> number of blocks compiled.
    """
    import torch
    from torch import nn

    for option in ("cache_size_limit", "recompile_limit"):  # Swin: 4 stages x 2 shift sizes of one class
        if hasattr(torch._dynamo.config, option):
            setattr(torch._dynamo.config, option, max(64, getattr(torch._dynamo.config, option)))
    blocks = [
        child
        for m in module.modules()
        if isinstance(m, nn.ModuleList)
        for child in m
        if not any(isinstance(c, nn.ModuleList) for c in child.modules())
    ]
    for block in blocks:
        block.compile(backend=backend)
    return len(blocks)


def decoded_batches(setup: Setup, recipes: dict, count: int) -> tuple[list[list[np.ndarray]], float]:
    """The first `count` images of the corpus decoded once (largest draft size of the recipes), in batches;
    -> (batches, host ms per image of that decode alone, one core)."""
    from olavlm.schemas.corpus import RawSample, decode_image, iter_samples, list_shards

    draft = max(int(r.get("jpeg_draft", 0)) for r in recipes.values()) or None
    images, seconds = [], 0.0
    for shard in list_shards(setup.corpus):
        for item in iter_samples(shard.url):
            if len(images) == count:
                break
            if isinstance(item, RawSample) and item.image_bytes is not None:
                start = time.perf_counter()
                images.append(
                    np.array(decode_image(item.image_bytes, draft_size=draft))
                )  # writable: from_numpy
                seconds += time.perf_counter() - start
    size = setup.config.batch_size
    return [images[i : i + size] for i in range(0, len(images), size)], seconds / max(1, len(images)) * 1e3


def run_levers(setup: Setup, teachers: dict, batches: list[dict], baseline: dict, host: dict) -> list[dict]:
    """Lever rows at one compute dtype, each against `baseline` (the bare loop of the same teachers).

    A lever that fails (an unsupported kernel, a compiler error) gives a row with its error and
    the run goes on: the pipeline and training figures matter more than any one lever.
    """
    config = setup.config
    rows = [
        {
            "lever": "baseline",
            **baseline,
            "speedup_vs_baseline": 1.0,
            "attn_implementation": {n: t.module.config._attn_implementation for n, t in teachers.items()},
        }
    ]
    levers: list[tuple[str, Callable[[], tuple[dict, dict]]]] = []
    if config.channels_last:
        levers.append(("channels_last", lambda: channels_last(setup, teachers, batches)))
    if config.sdpa:
        for impl in ("eager", "sdpa"):
            levers.append((f"attn_{impl}", lambda impl=impl: attention(setup, teachers, batches, impl)))
    if config.gpu_preprocess:
        levers.append(("gpu_preprocess", lambda: gpu_preprocess(setup, teachers, batches, host)))
    if config.compile:
        levers.append(("compile", lambda: compiled(setup, teachers, batches)))
    for name, measure in levers:
        rows.append(lever_row(setup, name, measure, baseline))
    return rows


def lever_row(setup: Setup, name: str, measure: Callable[[], tuple[dict, dict]], baseline: dict) -> dict:
    """`measure()` -> its row with the speedup over `baseline`, or a row with its error."""
    try:
        rates, extra = measure()
    except Exception as exc:  # noqa: BLE001 - reported in the row and on stderr, the run goes on
        setup.log(f"lever {name}: failed: {type(exc).__name__}: {exc}")
        return {"lever": name, "error": f"{type(exc).__name__}: {exc}"[:500]}
    speedup = rates["all_images_per_s"] / baseline["all_images_per_s"]
    setup.log(f"lever {name}: {rates['all_images_per_s']:.1f} images/s all three ({speedup:.2f}x)")
    return {"lever": name, **rates, "speedup_vs_baseline": round(speedup, 3), **extra}


def channels_last(setup: Setup, teachers: dict, batches: list[dict]) -> tuple[dict, dict]:
    import torch

    for t in teachers.values():
        t.module.to(memory_format=torch.channels_last)
    try:
        return bare_rates(teachers, batches, setup.device), {}
    finally:
        for t in teachers.values():
            t.module.to(memory_format=torch.contiguous_format)


def attention(setup: Setup, teachers: dict, batches: list[dict], impl: str) -> tuple[dict, dict]:
    default = {n: t.module.config._attn_implementation for n, t in teachers.items()}
    used = {}
    try:
        for name, t in teachers.items():
            try:
                t.module.set_attn_implementation(impl)
            except (ValueError, ImportError) as exc:  # the class does not support it: stays as it was
                setup.log(f"lever attn {impl}: {name} keeps {t.module.config._attn_implementation} ({exc})")
            used[name] = t.module.config._attn_implementation
        return bare_rates(teachers, batches, setup.device), {"attn_implementation": used}
    finally:
        for name, t in teachers.items():
            t.module.set_attn_implementation(default[name])


def gpu_preprocess(setup: Setup, teachers: dict, batches: list[dict], host: dict) -> tuple[dict, dict]:
    batch_size, device = setup.config.batch_size, setup.device
    recipes = {n: t.spec.preprocess for n, t in teachers.items()}
    raw, decode_ms = decoded_batches(setup, recipes, len(batches) * batch_size)
    raw = [b for b in raw if len(b) == batch_size]
    entries = [{n: images for n in teachers} for images in raw]  # each teacher resizes the same images
    prepare = {n: (lambda images, n=n: device_prepare(images, recipes[n], device)) for n in teachers}
    diffs = {}
    for name in teachers:  # against the host path on the same first images
        ours = device_prepare(raw[0], recipes[name], device).cpu().numpy().astype(np.int16)
        diffs[name] = round(float(np.abs(ours - batches[0][name].numpy().astype(np.int16)).mean()), 3)
    return bare_rates(teachers, entries, device, prepare), {
        "host_decode_only_ms_per_image": round(decode_ms, 2),
        "host_cpu_path_ms_per_image": host["host_preprocess_ms_per_image"],
        "mean_abs_diff_uint8_vs_host": diffs,
    }


def compiled(setup: Setup, teachers: dict, batches: list[dict]) -> tuple[dict, dict]:
    """Last: the blocks stay compiled (the teachers are dropped after)."""
    config, device = setup.config, setup.device
    start = time.perf_counter()
    blocks = {n: compile_blocks(t.module, config.compile_backend) for n, t in teachers.items()}
    for name, t in teachers.items():  # compilation happens in the first call: timed apart
        t(batches[0][name])
    sync(device)
    extra = {
        "compile_s": round(time.perf_counter() - start, 1),
        "compile_backend": config.compile_backend,
        "blocks_compiled": blocks,
    }
    setup.log(f"lever compile: compiled in {extra['compile_s']} s")
    return bare_rates(teachers, batches, device), extra
