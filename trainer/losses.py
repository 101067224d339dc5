"""Loss functions, pure: tensors in, scalar tensor out.

Embedding loss per (task, layer) = smooth-L1 + 0.3 x InfoNCE (method.md). The
InfoNCE compares this rank's L2-normalised, flattened predictions with the
targets of the *global* batch: targets are all-gathered across ranks (they are
constants, so no gradient is gathered); a local row's label is its global index.
Only the pred -> target direction is used, as in the paper.

Normalisation: every term is a sum over this rank's valid samples divided by the
number of valid samples in the global batch, times the world size. DDP averages
gradients over ranks, so the averaged loss and gradients equal the
single-process ones on the concatenated batch (tested with 2 gloo processes).
Cost: one all-gather of the targets per task per step (e.g. 256 x 576 x 1536
bf16 = 450 MB for the paper's seg targets at global batch 256) and a second small
one for the per-rank batch sizes. Samples without an image (valid = False)
count neither as rows nor as InfoNCE negatives.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F


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


def smooth_l1(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, global_targets: GlobalTargets) -> torch.Tensor:
    """Mean smooth-L1 over the valid samples of the global batch (this rank's share, see module doc)."""
    per_sample = per_sample_smooth_l1(pred, target)  # [B]
    local_sum = (per_sample * valid.float()).sum()
    return local_sum * global_targets.world_size / global_targets.num_valid


def info_nce(
    pred: torch.Tensor,  # [B, T, D]
    valid: torch.Tensor,  # [B] bool
    global_targets: GlobalTargets,
    logit_scale: torch.Tensor,  # scalar, log of the temperature's inverse
    *,
    max_scale: float = 100.0,
) -> torch.Tensor:
    """Cross-entropy of each valid local prediction over the valid targets of the global batch."""
    p = F.normalize(pred.flatten(1).float(), dim=-1)  # [B, T*D]
    t = global_targets.targets.float()  # [N, T*D]
    scale = logit_scale.float().exp().clamp(max=max_scale)
    logits = scale * p @ t.T  # [B, N]
    logits = logits.masked_fill(~global_targets.valid[None, :], float("-inf"))  # invalid targets: no negatives
    labels = torch.arange(p.shape[0], device=p.device) + global_targets.offset  # [B]
    # Invalid rows have -inf at their own label: drop them (boolean indexing is a CPU-GPU sync point).
    rows = valid.bool()
    per_row = F.cross_entropy(logits[rows], labels[rows], reduction="sum")
    return per_row * global_targets.world_size / global_targets.num_valid


def embedding_loss(
    pred: torch.Tensor,  # [B, T, D]
    target: torch.Tensor,  # [B, T, D]
    valid: torch.Tensor,  # [B] bool
    logit_scale: torch.Tensor,
    *,
    global_targets: GlobalTargets | None = None,
    info_nce_weight: float = 0.3,
    max_scale: float = 100.0,
) -> torch.Tensor:
    """smooth-L1 + info_nce_weight x InfoNCE for one (task, layer)."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    if global_targets is None:
        global_targets = gather_targets(target, valid)
    l1 = smooth_l1(pred, target, valid, global_targets)
    nce = info_nce(pred, valid, global_targets, logit_scale, max_scale=max_scale)
    return l1 + info_nce_weight * nce


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of token t+1 given tokens <= t over labels != -100 (this rank's tokens).

    Not globally normalised: each rank averages its own tokens, as transformers does.
    """
    shift_logits = logits[:, :-1].flatten(0, 1).float()  # [B*(L-1), V]
    shift_labels = labels[:, 1:].flatten()  # [B*(L-1)]
    total = F.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="sum")
    return total / (shift_labels != -100).sum().clamp(min=1)
