"""Processes and parallelism: torchrun's environment, DDP / FSDP2 wrapping, full state dicts.

Kept out of the loop and the model (as torchtitan does): the loop calls `wrap`
once; checkpoint.save_state calls the gathers here. FSDP2 (`fully_shard` on every
decoder block and on the root, which holds the vision tower: a separately sharded
CLIP loses transformers' hidden-state capture) is for full fine-tuning of large
LLMs; its full checkpoints are written shard by shard, never gathered (only the
trainable tensors of a trainable-only checkpoint are, `full_tensors`). DDP searches
for unused parameters only when the vision tower trains (LLaVA reads its second-to-
last layer: the last never gets a gradient); otherwise every trainable parameter gets
one each step (a batch without images touches the projector, OlaVlm.embed).
"""

from __future__ import annotations

import dataclasses
import os

import torch
import torch.distributed as dist

from olavlm.schemas.config import RunConfig


@dataclasses.dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK: gloo on CPU, nccl on GPU. Plain python: one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local_rank}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return Dist(rank, world, local_rank, device)


def wrap(model, cfg: RunConfig, d: Dist):
    """FSDP2 (train.fsdp), DDP (several processes) or the model itself."""
    if cfg.train.fsdp:
        from torch.distributed.fsdp import fully_shard

        if not dist.is_initialized():  # FSDP2 needs a process group, even of one process
            import tempfile

            store = tempfile.mktemp(prefix="ola-fsdp-")
            dist.init_process_group(
                "nccl" if d.device.type == "cuda" else "gloo",
                init_method=f"file://{store}",
                rank=0,
                world_size=1,
            )
        # Scalars (the InfoNCE logit scales) cannot be sharded: kept whole on every rank, their
        # gradients are all-reduced by hand (`_sync_ignored`).
        ignored = {p for p in model.parameters() if p.ndim == 0}
        for block in model.llava.model.language_model.layers:
            fully_shard(block)
        fully_shard(model, ignored_params=ignored)
        return model
    if d.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        tower_trains = any(p.requires_grad for p in model.llava.model.vision_tower.parameters())
        return DistributedDataParallel(
            model,
            device_ids=[d.device.index] if d.device.type == "cuda" else None,
            find_unused_parameters=tower_trains,  # else a search per backward, and a warning per rank
        )
    return model


def sync_ignored(model) -> None:
    """FSDP2 leaves scalar parameters out of its gradient reduction: average their gradients here."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    for p in model.parameters():
        if p.ndim == 0 and p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= dist.get_world_size()


def full_optimizer_state(model, optimizer) -> dict:
    """The full optimizer state dict keyed by parameter names, on CPU (under FSDP2 a collective: every rank
    calls it, rank 0 gets it; the trainer uses it only when the optimizer state is small or unsharded)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(
        model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )


def is_fsdp(model) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def full_tensors(model, names: list[str]) -> dict:
    """{name: full CPU tensor} of the state tensors `names`, gathering only those under FSDP2 (a collective:
    every rank calls it with the same names)."""
    from torch.distributed.tensor import DTensor

    state = model.state_dict()
    return {
        n: (state[n].full_tensor() if isinstance(state[n], DTensor) else state[n]).detach().cpu()
        for n in names
    }


def gather(obj, d: Dist) -> list:
    """`obj` from every rank, in rank order (one process: [obj])."""
    if not dist.is_initialized() or d.world == 1:
        return [obj]
    out = [None] * d.world
    dist.all_gather_object(out, obj)
    return out
