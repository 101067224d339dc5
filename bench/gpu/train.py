"""Section 6: the training step of a mid-size student, cached targets (streaming loader) vs the same
batches in memory vs the teachers run online inside the step (the authors' design).

`train_bench` is the list of steps: pick the loader workers, open a 1-process group, build the
student and its step, time the loader steps then the same batches from memory, time the online
steps, and put the figures together.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable

import numpy as np

from olavlm.bench.gpu.common import Setup, peak_gb, reset_peak, sync
from olavlm.bench.gpu.config import GpuBenchConfig
from olavlm.bench.train import training_step
from olavlm.trainer.student.build import build_student


def train_bench(setup: Setup, cache: str) -> dict:
    """Cached-target step (streaming loader) vs the same batches in memory vs teachers online."""
    import torch

    config, device = setup.config, torch.device(setup.device)
    cuda = device.type == "cuda"
    workers = loader_workers(config.train_workers, cuda)
    destroy = _process_group(setup.device)
    try:
        model, trainable, step, loader = pt_student_and_loader(setup, cache, workers)
        kept, loader_times, memory_times = timed_steps(
            step, loader, workers, config.train_steps, setup.device
        )
        loader_s, memory_s = float(np.mean(loader_times)), float(np.mean(memory_times))
        medians = float(np.median(loader_times)), float(np.median(memory_times))
        peak = peak_gb(setup.device)
        setup.log(
            f"train: loader {loader_s:.3f} s/step, in memory {memory_s:.3f} s/step "
            f"({loader_s / memory_s:.3f}x; medians {medians[0]:.3f} / {medians[1]:.3f})"
        )
        online_s = online_step_s(setup, kept, step) if config.online_steps else None
        params = sum(p.numel() for p in model.parameters())
    finally:
        destroy()
    return train_figures(
        config,
        cuda=cuda,
        params=params,
        trainable=trainable,
        workers=workers,
        loader_s=loader_s,
        memory_s=memory_s,
        medians=medians,
        online_s=online_s,
        peak=peak,
    )


def loader_workers(wanted: int, cuda: bool) -> int:
    """DataLoader workers: `wanted`, capped at cores - 1; on CPU the step gets the cores they leave."""
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = min(wanted, max(1, cores - 1))
    if not cuda:  # the cores the workers leave to the step
        torch.set_num_threads(max(1, cores - workers))
    return workers


def _process_group(device: str):
    """A 1-process group (nccl on CUDA, gloo on CPU); -> a function that destroys it if it was made here."""
    import torch.distributed as dist

    if dist.is_initialized():
        return lambda: None
    store = os.path.join(tempfile.mkdtemp(prefix="ola-bench-pg-"), "store")
    dist.init_process_group(
        "nccl" if device.startswith("cuda") else "gloo", init_method=f"file://{store}", rank=0, world_size=1
    )
    return dist.destroy_process_group


def pt_student_and_loader(setup: Setup, cache: str, workers: int):
    """The student at the PT stage in DDP, its AdamW and the streaming loader over `cache`;
    -> (model, trainable parameters, step(batch), loader)."""
    import torch
    from torch.nn.parallel import DistributedDataParallel

    from olavlm.schemas.cache import TargetCache
    from olavlm.schemas.config import DataConfig, ModelConfig
    from olavlm.trainer.data.images import ImageTransform
    from olavlm.trainer.data.loader import build_loader
    from olavlm.trainer.freeze import apply_stage
    from olavlm.trainer.student.presets import TINY_HEADS, build_tiny_student

    config, device = setup.config, torch.device(setup.device)
    cuda = device.type == "cuda"
    folders = build_tiny_student(os.path.join(setup.tmp, "student"), seed=config.seed, **config.student)
    heads = {} if config.student else TINY_HEADS  # the mid student has the paper's heads (the defaults)
    torch.manual_seed(config.seed)
    model = build_student(
        ModelConfig(vision_model=folders.vision_model, llm=folders.llm, **heads), TargetCache(cache).specs()
    ).to(device)
    groups = apply_stage(model, "pt")
    trainable = sum(p.numel() for g in groups for p in g["params"])
    ddp = DistributedDataParallel(
        model, device_ids=[device.index or 0] if cuda else None, find_unused_parameters=True
    )
    step = training_step(ddp, torch.optim.AdamW(groups, fused=cuda), setup.device)
    data = DataConfig(
        data=setup.corpus,
        cache=cache,
        batch_size=config.train_batch_size,
        num_workers=workers,
        seed=config.seed,
    )
    loader = build_loader(
        data,
        tokenizer=model.tokenizer,
        layout=model.layout,
        transform=ImageTransform.from_processor(model.image_processor),
        tasks=model.layout.tasks,
        pin_memory=cuda,
    )
    return model, trainable, step, loader


def timed_steps(
    step: Callable[[dict], None], loader, workers: int, steps: int, device: str
) -> tuple[list, list, list]:
    """Warm-up, `steps` steps fed by the loader, then the same batches again from memory;
    -> (the batches, seconds per loader step, seconds per in-memory step)."""
    batches = iter(loader)
    for _ in range(workers + 2):  # warm-up: every worker has delivered a batch; first kernels; AdamW state
        step(next(batches)[0])
    reset_peak(device)
    kept, loader_times, memory_times = [], [], []
    for _ in range(steps):  # a step = waiting for the loader's batch + the step itself
        start = time.perf_counter()
        batch, _state = next(batches)
        step(batch)
        loader_times.append(time.perf_counter() - start)
        kept.append(batch)
    del batches
    for batch in kept:  # the same batches again, from memory (pinned on CUDA, as the loader's)
        start = time.perf_counter()
        step(batch)
        memory_times.append(time.perf_counter() - start)
    return kept, loader_times, memory_times


def online_step_s(setup: Setup, kept: list[dict], step: Callable[[dict], None]) -> float:
    """Seconds per step with the pipeline's teachers run inside it, one image at a time with host preprocessing
    (as the authors' training step does), over the first `online_steps` of the kept batches."""
    import torch

    from olavlm.pipeline.preprocess import prepare_all
    from olavlm.pipeline.teachers import load_teacher
    from olavlm.schemas.corpus import RawSample, iter_samples, list_shards

    config = setup.config
    dtype = torch.bfloat16 if setup.device.startswith("cuda") else torch.float32
    teachers = {n: load_teacher(s, device=setup.device, dtype=dtype) for n, s in setup.sources().items()}
    recipes = {n: t.spec.preprocess for n, t in teachers.items()}
    wanted = {k for b in kept[: config.online_steps] for k in b["keys"]}
    jpegs = {
        item.key: item.image_bytes
        for shard in list_shards(setup.corpus)
        for item in iter_samples(shard.url)
        if isinstance(item, RawSample) and item.key in wanted
    }

    def online(keys: list[str]) -> dict:
        out = {n: [] for n in teachers}
        for key in keys:
            inputs = prepare_all(jpegs[key], recipes)
            for name, teacher in teachers.items():
                out[name].append(teacher(torch.tensor(inputs[name])[None])[0])
        return {n: torch.stack(v) for n, v in out.items()}

    online(kept[0]["keys"][:1])  # warm-up of the teachers' kernels
    sync(setup.device)
    start = time.perf_counter()
    for batch in kept[: config.online_steps]:
        step(dict(batch, targets=online(batch["keys"])))
    return (time.perf_counter() - start) / config.online_steps


def train_figures(
    config: GpuBenchConfig,
    *,
    cuda: bool,
    params: int,
    trainable: int,
    workers: int,
    loader_s: float,
    memory_s: float,
    medians: tuple[float, float],
    online_s: float | None,
    peak: float | None,
) -> dict:
    """The train section's JSON object."""
    return {
        "student": "mid: CLIP 1024x24 at 336 px + Llama 2048x16" if config.student else "tiny preset student",
        "student_params": params,
        "trainable_params_pt": trainable,
        "batch_size": config.train_batch_size,
        "steps": config.train_steps,
        "loader_workers": workers,
        "autocast": "bfloat16" if cuda else "off (float32)",
        "backend": "nccl" if cuda else "gloo",
        "world_size": 1,
        "cache_storage_dtype": config.storage_dtype,
        "step_s_loader": round(loader_s, 4),
        "step_s_in_memory": round(memory_s, 4),
        "cached_over_in_memory": round(loader_s / memory_s, 3),
        "step_s_loader_median": round(medians[0], 4),
        "step_s_in_memory_median": round(medians[1], 4),
        "cached_over_in_memory_median": round(medians[0] / medians[1], 3),
        "warmup_steps": workers + 2,
        "samples_per_s_loader": round(config.train_batch_size / loader_s, 1),
        "step_s_online_teachers": round(online_s, 4) if online_s is not None else None,
        "online_over_cached": round(online_s / loader_s, 2) if online_s is not None else None,
        "online_steps": config.online_steps,
        "peak_memory_gb": peak,
    }
