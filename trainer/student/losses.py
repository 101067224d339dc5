"""Loss functions, pure: tensors in, scalar tensor out.

Embedding loss per (task, layer) = smooth-L1 + 0.3 x InfoNCE (docs/METHOD.md), InfoNCE against the
all-gathered targets of the global batch, in float32. Design choice: each term is this rank's sum
over its items (label tokens for NTP, images for the embeddings) x world size / the item count of
the whole optimizer step (`Normalisers`), so a step's gradient is one big batch's: `--batch-size 2
--grad-accum 4` = `--batch-size 8`; without `Normalisers`, a micro-batch's own count. Cost: one
all-gather of targets per task and micro-step, and InfoNCE's negatives are one micro-step's global
batch, so with grad_accum > 1 its value differs from the big batch's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F


@dataclass(frozen=True)
class Normalisers:
    """Denominators of one optimizer step, the same on every rank (see the module doc)."""

    tokens: torch.Tensor | float
    """Label tokens (labels != -100 after the shift) over all ranks and micro-batches of the step, >= 1."""
    images: torch.Tensor | float
    """Samples with an image over all ranks and micro-batches of the step, >= 1."""
    world_size: int = 1


def label_count(labels: torch.Tensor) -> torch.Tensor:
    """[B, L] labels -> the number of predicted tokens (labels != -100 after the shift), as next_token_loss counts."""
    return (labels[:, 1:] != -100).sum()


@dataclass(frozen=True)
class GlobalTargets:
    """The global batch's targets as InfoNCE needs them; gather once per task, reuse per layer."""

    targets: torch.Tensor  # [N, T*D] L2-normalised, N = global batch
    valid: torch.Tensor  # [N] bool
    offset: int
    """Global index of this rank's first row."""
    world_size: int

    @property
    def num_valid(self) -> torch.Tensor:  # scalar, >= 1 so that an all-masked batch gives 0, not NaN
        return self.valid.sum().clamp(min=1)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_targets(target: torch.Tensor, valid: torch.Tensor) -> GlobalTargets:
    """[B, T, D] targets + [B] valid of this rank -> the normalised targets of all ranks."""
    flat = F.normalize(target.flatten(1).float(), dim=-1).to(target.dtype)  # [B, T*D]
    if not _distributed():
        return GlobalTargets(flat, valid.bool(), 0, 1)
    world, rank = dist.get_world_size(), dist.get_rank()
    # Ranks may hold different batch sizes (last batch): gather sizes, pad, gather, trim.
    size = torch.tensor([flat.shape[0]], device=flat.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    sizes = [int(s) for s in sizes]  # .item(): a CPU-GPU sync point
    longest = max(sizes)
    pad = longest - flat.shape[0]
    padded = F.pad(flat, (0, 0, 0, pad))
    padded_valid = F.pad(valid.bool().to(torch.uint8), (0, pad))  # uint8: gloo lacks bool all_gather
    parts = [torch.empty_like(padded) for _ in range(world)]
    valids = [torch.empty_like(padded_valid) for _ in range(world)]
    dist.all_gather(parts, padded)
    dist.all_gather(valids, padded_valid)
    targets = torch.cat([p[:n] for p, n in zip(parts, sizes)])  # [N, T*D]
    all_valid = torch.cat([v[:n] for v, n in zip(valids, sizes)]).bool()  # [N]
    return GlobalTargets(targets, all_valid, sum(sizes[:rank]), world)


def per_sample_smooth_l1(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """[B, T, D] x 2 -> [B]: smooth-L1 (beta 1) averaged over each sample's elements."""
    return F.smooth_l1_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(1)


def per_image_cosine(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """[B, T, D] x 2 -> [B]: cosine of the flattened prediction and target (the probe's score)."""
    return F.cosine_similarity(pred.flatten(1).float(), target.flatten(1).float(), dim=1)


def _count(global_targets: GlobalTargets, images: torch.Tensor | float | None):
    return global_targets.num_valid if images is None else images


def smooth_l1(
    pred: torch.Tensor,
    target: torch.Tensor,
    valid: torch.Tensor,
    global_targets: GlobalTargets,
    *,
    images: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Sum of smooth-L1 over this rank's valid samples x world size / `images` (default: the valid
    samples of the micro-step's global batch; see module doc)."""
    per_sample = per_sample_smooth_l1(pred, target)  # [B]
    local_sum = (per_sample * valid.float()).sum()
    return local_sum * global_targets.world_size / _count(global_targets, images)


def info_nce(
    pred: torch.Tensor,  # [B, T, D]
    valid: torch.Tensor,  # [B] bool
    global_targets: GlobalTargets,
    logit_scale: torch.Tensor,  # scalar, log of the temperature's inverse
    *,
    max_scale: float = 100.0,
    images: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Cross-entropy of each valid local prediction over the valid targets of the global batch,
    summed and scaled like `smooth_l1` (`images`: the step's normaliser). float32, autocast off."""
    with torch.autocast(device_type=pred.device.type, enabled=False):
        p = F.normalize(pred.flatten(1).float(), dim=-1)  # [B, T*D]
        t = global_targets.targets.float()  # [N, T*D]
        scale = logit_scale.float().exp().clamp(max=max_scale)
        logits = scale * (p @ t.T)  # [B, N] float32
        logits = logits.masked_fill(
            ~global_targets.valid[None, :], float("-inf")
        )  # invalid targets: no negatives
        labels = torch.arange(p.shape[0], device=p.device) + global_targets.offset  # [B]
        # Invalid rows have -inf at their own label: drop them (boolean indexing is a CPU-GPU sync point).
        rows = valid.bool()
        per_row = F.cross_entropy(logits[rows], labels[rows], reduction="sum")
    return per_row * global_targets.world_size / _count(global_targets, images)


def embedding_loss(
    pred: torch.Tensor,  # [B, T, D]
    target: torch.Tensor,  # [B, T, D]
    valid: torch.Tensor,  # [B] bool
    logit_scale: torch.Tensor,
    *,
    global_targets: GlobalTargets | None = None,
    info_nce_weight: float = 0.3,
    max_scale: float = 100.0,
    images: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """smooth-L1 + info_nce_weight x InfoNCE for one (task, layer); `images`: the step's image count
    (`Normalisers.images`), default the micro-step's."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    if global_targets is None:
        global_targets = gather_targets(target, valid)
    l1 = smooth_l1(pred, target, valid, global_targets, images=images)
    nce = info_nce(pred, valid, global_targets, logit_scale, max_scale=max_scale, images=images)
    return l1 + info_nce_weight * nce


def next_token_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    tokens: torch.Tensor | float | None = None,
    world_size: int = 1,
) -> torch.Tensor:
    """Cross-entropy of token t+1 given tokens <= t, summed over labels != -100, x world_size / tokens.

    `tokens`: the step's global label-token count (`Normalisers.tokens`); default this batch's own
    count (with world_size 1: the mean over this rank's tokens).
    """
    shift_logits = logits[:, :-1].flatten(0, 1).float()  # [B*(L-1), V]
    shift_labels = labels[:, 1:].flatten()  # [B*(L-1)]
    total = F.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="sum")
    if tokens is None:
        return total / (shift_labels != -100).sum().clamp(min=1)
    return total * world_size / tokens
