"""`ola bench train`: is the cached-target loader free, and what do online teachers cost?

Three step times of the same student (tiny preset, heads for the paper's full-size targets, PT
stage) on the same samples: batches from the streaming loader (what training does), the same
batches from memory, and targets computed inside the step by randomly initialised teacher-like
models of the paper's sizes, one image at a time (the authors' design). The key figure is loader /
in-memory. The bench builds teacher-like models itself, which is why it lives in bench/, not
trainer/. Cost: on CPU the online figure takes tens of seconds per step (`--online-steps 0` skips it).
"""

from __future__ import annotations

import itertools
import os
import tempfile
import time
from collections.abc import Callable

TASK_SHAPES = {"depth": (576, 1024), "seg": (576, 1536), "gen": (1, 1024)}


def _teachers(device):
    """Randomly initialised models with the paper teachers' architectures and input sizes."""
    import torch
    from transformers import (
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
        Dinov2Config,
        Dinov2Model,
        SwinConfig,
        SwinModel,
    )

    torch.manual_seed(0)
    depth = Dinov2Model(
        Dinov2Config(
            hidden_size=1024,
            num_hidden_layers=24,
            num_attention_heads=16,
            intermediate_size=4096,
            patch_size=14,
            image_size=336,
        )
    )
    seg = SwinModel(
        SwinConfig(
            image_size=768,
            patch_size=4,
            embed_dim=192,
            depths=[2, 2, 18, 2],
            num_heads=[6, 12, 24, 48],
            window_size=12,
        )
    )
    gen = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=1280,
            intermediate_size=5120,
            num_hidden_layers=32,
            num_attention_heads=16,
            patch_size=14,
            image_size=224,
            projection_dim=1024,
        )
    )
    return {name: m.to(device).eval() for name, m in (("depth", depth), ("seg", seg), ("gen", gen))}


def _online_targets(teachers, jpegs: list[bytes], device) -> dict:
    """Per image (as the authors' code does): CPU preprocessing, then each teacher's forward."""
    import numpy as np
    import torch

    from olavlm.schemas.corpus import decode_image

    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    out = {t: [] for t in TASK_SHAPES}
    for data in jpegs:
        image = decode_image(data)

        def prep(size, image=image):
            array = np.asarray(image.resize((size, size), resample=3), dtype=np.float32) / 255.0
            return ((torch.from_numpy(array).permute(2, 0, 1) - mean) / std)[None].to(device)

        with torch.no_grad():
            hs = teachers["depth"](prep(336), output_hidden_states=True).hidden_states
            norm = teachers["depth"].layernorm
            out["depth"].append(torch.stack([norm(hs[i])[:, 1:] for i in (5, 12, 18, 24)]).mean(0)[0])
            seg = teachers["seg"](prep(768)).last_hidden_state  # [1, 576, 1536] (24x24 at stride 32)
            out["seg"].append(seg[0])
            out["gen"].append(teachers["gen"](prep(224)).image_embeds)  # [1, 1024]
    return {t: torch.stack(v).float() for t, v in out.items()}


def training_step(model, optimizer, device: str) -> Callable[[dict], None]:
    """One optimiser step on a batch, bf16 autocast on CUDA (float32 on CPU), ended by a device sync
    so that a timed step includes the device's work. Shared with `ola bench gpu` (bench/gpu/train.py)."""
    import torch

    from olavlm.trainer.data.collate import to_device

    cuda = device.startswith("cuda")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    target = torch.device(device)

    def step(batch) -> None:
        with autocast:
            losses = model(to_device(batch, target))
        losses["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()

    return step


def bench_train(
    steps: int = 8, batch_size: int = 4, workers: int = 4, online_steps: int = 1, seed: int = 0
) -> dict:
    """Run the benchmark (see the module docstring). DataLoader workers are capped at cores - 1, and on
    CPU the student's step gets the remaining cores, so that workers and step do not oversubscribe."""
    import torch

    from olavlm.bench.loader import build_bench_data
    from olavlm.schemas.cache import TargetCache
    from olavlm.schemas.config import DataConfig, ModelConfig
    from olavlm.trainer.data.images import ImageTransform
    from olavlm.trainer.data.loader import build_loader
    from olavlm.trainer.freeze import apply_stage
    from olavlm.trainer.student.build import build_student
    from olavlm.trainer.student.presets import TINY_HEADS, build_tiny_student

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    workers = min(workers, max(1, cores - 1))
    if device.type == "cpu":  # cores left to the student's step once the workers have theirs
        torch.set_num_threads(max(1, cores - workers))
    with tempfile.TemporaryDirectory(prefix="ola-bench-train-") as root:
        jpegs = build_bench_data(root, samples=(steps + 2) * batch_size, seed=seed)
        tiny = build_tiny_student(os.path.join(root, "student"), seed=seed)
        specs = TargetCache(os.path.join(root, "cache")).specs()
        torch.manual_seed(seed)
        model = build_student(ModelConfig(vision_model=tiny.vision_model, llm=tiny.llm, **TINY_HEADS), specs)
        model.to(device)
        optimizer = torch.optim.AdamW(apply_stage(model, "pt"), fused=device.type == "cuda")
        cfg = DataConfig(
            data=os.path.join(root, "corpus"),
            cache=os.path.join(root, "cache"),
            batch_size=batch_size,
            num_workers=workers,
            seed=seed,
        )
        loader = build_loader(
            cfg,
            tokenizer=model.tokenizer,
            layout=model.layout,
            transform=ImageTransform.from_processor(model.image_processor),
            tasks=model.layout.tasks,
            pin_memory=device.type == "cuda",
        )

        step = training_step(model, optimizer, device.type)
        kept = []
        batches = iter(loader)
        step(next(batches)[0])  # warm-up: workers start, first kernels
        start = time.perf_counter()
        for batch, _ in itertools.islice(batches, steps):
            step(batch)
            kept.append(batch)
        loader_s = (time.perf_counter() - start) / steps
        del batches
        start = time.perf_counter()
        for batch in kept:
            step(batch)
        memory_s = (time.perf_counter() - start) / steps

        online_s = None
        if online_steps:
            teachers = _teachers(device)
            start = time.perf_counter()
            for batch in kept[:online_steps]:
                batch = dict(
                    batch, targets=_online_targets(teachers, [jpegs[k] for k in batch["keys"]], device)
                )
                step(batch)
            online_s = (time.perf_counter() - start) / online_steps
    return {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "student": "tiny preset (CLIP 32px + 4-layer Llama 64) with heads for full-size targets",
        "batch_size": batch_size,
        "steps": steps,
        "workers": workers,
        "torch_threads": torch.get_num_threads(),
        "step_s_loader": round(loader_s, 4),
        "step_s_in_memory": round(memory_s, 4),
        "loader_over_in_memory": round(loader_s / memory_s, 3),
        "target_loader_over_in_memory": 1.05,
        "step_s_online_teachers": round(online_s, 3) if online_s is not None else None,
        "online_over_cached": round(online_s / loader_s, 1) if online_s is not None else None,
    }
