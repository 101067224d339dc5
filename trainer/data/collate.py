"""Stage 4 of the data path: samples -> one batch (the contract the model's `forward` reads).

    keys            list[str]            sample keys, for error messages and tests
    input_ids       (B, L) long          right-padded with the tokenizer's pad id
    attention_mask  (B, L) long          1 on real tokens
    labels          (B, L) long          -100 except assistant-turn tokens
    pixel_values    (B, 3, H, W) uint8   resized and cropped, not normalised; zeros for text-only samples
    has_image       (B,) bool
    targets         {task: (B, T, D)}    storage dtype, zeros where absent; int8 with its per-token
                                         scale {task + ".scale": (B, T) float32}

Design choice: pixels stay uint8 and targets in their storage dtype through the loader; the model
normalises pixels and `to_device` casts targets on the device. Cost: a CPU-only run pays that in the
step, and a batch is input only to the model whose image processor normalises it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from olavlm.trainer.data.join import SCALE_SUFFIX
from olavlm.trainer.data.text import IGNORE


@dataclass
class Example:
    """One sample after tokenize + image transform + join (at this point: everything but padding)."""

    key: str
    input_ids: list[int]
    labels: list[int]
    image: np.ndarray | None
    """uint8 (3, H, W), None for text-only samples."""
    targets: dict[str, torch.Tensor]
    """{task: (T, D)}; empty for text-only samples."""


def collate(
    examples: Sequence[Example],
    *,
    pad_id: int,
    image_size: tuple[int, int],
    target_shapes: dict[str, tuple[int, int]],
    target_dtypes: dict[str, torch.dtype],
    targets: dict[str, torch.Tensor] | None = None,
) -> dict:
    """Right-pad and stack into the module docstring's fields.

    `targets`: already batched targets (the join decompresses into batch buffers); else stacked here.
    """
    b = len(examples)
    length = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((b, length), pad_id, dtype=torch.long)
    labels = torch.full((b, length), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((b, length), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[i, :n] = torch.tensor(e.input_ids, dtype=torch.long)
        labels[i, :n] = torch.tensor(e.labels, dtype=torch.long)
        attention_mask[i, :n] = 1
    has_image = torch.tensor([e.image is not None for e in examples], dtype=torch.bool)
    pixel_values = torch.zeros((b, 3, *image_size), dtype=torch.uint8)
    for i, e in enumerate(examples):
        if e.image is not None:
            pixel_values[i] = torch.from_numpy(e.image)
    if targets is not None:
        return {
            "keys": [e.key for e in examples],
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "pixel_values": pixel_values,
            "has_image": has_image,
            "targets": targets,
        }
    targets = {}
    for task, shape in target_shapes.items():
        out = torch.zeros((b, *shape), dtype=target_dtypes[task])
        for i, e in enumerate(examples):
            if task in e.targets:
                out[i] = e.targets[task]
        targets[task] = out
    return {
        "keys": [e.key for e in examples],
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "pixel_values": pixel_values,
        "has_image": has_image,
        "targets": targets,
    }


def to_device(batch: dict, device: torch.device | str, target_dtype: torch.dtype = torch.float32) -> dict:
    """Move a batch to `device`; targets become `target_dtype` there (the 16-bit -> 32-bit cast, and int8
    values times their per-token scale (trainer/data/join.py `scale_key`), run on the device)."""
    non_blocking = torch.device(device).type == "cuda"  # pinned host memory -> async copy
    out = {}
    for name, value in batch.items():
        if name == "targets":
            moved = {t: v.to(device, non_blocking=non_blocking) for t, v in value.items()}
            out[name] = {
                t: dequantised(v, moved.get(t + SCALE_SUFFIX), target_dtype)
                for t, v in moved.items()
                if not t.endswith(SCALE_SUFFIX)
            }
        elif isinstance(value, torch.Tensor):
            out[name] = value.to(device, non_blocking=non_blocking)
        else:
            out[name] = value
    return out


def dequantised(values: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Stored targets -> `dtype`: a plain cast, or int8 [B, T, D] times its per-token scale [B, T]
    (schemas/quant.py's dequantize_int8, in float32 on the tensor's device)."""
    if scale is None:
        return values.to(dtype)
    return (values.float() * scale.float().unsqueeze(-1)).to(dtype)
