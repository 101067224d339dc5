"""A state dict as one safetensors file per rank, through torch.distributed.checkpoint.

Used for the sharded layout of model folders and optimizer state under FSDP2. Each rank writes its own
shards; a reader of any world size reads its part alone (no collective), so a run resumes at another
process count. Cost: a missing or cut file is only found by checking that every tensor's saved chunks
tile its shape, which `load_sharded` does before reading.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch


def aliases(model) -> dict[str, str]:
    """{alias: first name} of parameters known under several names (tied weights: a tied LLM's
    `lm_head.weight` is its `embed_tokens.weight`). The same on every rank (named from the modules, not from
    storage, which an FSDP2 shard may leave empty)."""
    model = getattr(model, "module", model)  # DDP: the names the state dicts use
    first: dict[int, str] = {}
    found = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if first.setdefault(id(param), name) != name:
            found[name] = first[id(param)]
    return found


def without_aliases(tensors: dict[str, torch.Tensor], model) -> dict[str, torch.Tensor]:
    """`tensors` (keyed by parameter name, or "<parameter name>/<state>") without the entries of `aliases`:
    safetensors refuses two names for one storage, and the first name restores the shared tensor."""
    skip = aliases(model)
    return {key: t for key, t in tensors.items() if key not in skip and key.rsplit("/", 1)[0] not in skip}


def shard_file(folder: str | Path, rank: int) -> Path | None:
    """The safetensors file rank `rank` wrote under `folder` (torch names it `shard-{rank + 1:05d}-model-...`),
    or None."""
    found = sorted(Path(folder).glob(f"shard-{rank + 1:05d}-*.safetensors"))
    return found[0] if found else None


def save_sharded(folder: str | Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write `tensors` (DTensors: this rank's shards; plain tensors: once) as one safetensors file per rank
    under `folder`, each tensor's global offsets in the file's JSON header. Every rank calls it; every rank
    raises ConfigError when rank 0 does not see one file per rank (a staging folder that is not shared)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    from olavlm.schemas.errors import ConfigError

    writer = HuggingFaceStorageWriter(str(folder), save_distributed=dist.is_initialized())
    dcp.save(tensors, storage_writer=writer, no_dist=not dist.is_initialized())
    if not dist.is_initialized():  # one process: one file, named model-00001-of-00001 by torch
        return
    # checked on rank 0, raised on every rank: a raise on rank 0 alone would hang the others at the next collective
    world = dist.get_world_size()
    missing = broadcast(
        [r for r in range(world) if shard_file(folder, r) is None] if dist.get_rank() == 0 else None
    )
    if missing:
        raise ConfigError(
            f"{folder}: rank 0 sees no shard file of ranks {missing} after saving: the checkpoint "
            "folder (train.out) must be on a filesystem every rank shares"
        )


def load_sharded(folder: str | Path, tensors: dict[str, torch.Tensor], *, files: int | None = None) -> None:
    """Fill `tensors` in place from `save_sharded` files: plain tensors whole, DTensors their local part,
    whatever the number of processes that wrote them (each rank reads on its own: no collective).

    `files`: the number of ranks that wrote them, each of whose files must be there; every tensor's saved
    chunks must tile its shape exactly (DCP would fill a missing chunk silently): else a ConfigError naming
    the folder and the first tensor not covered.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    from olavlm.schemas.errors import ConfigError

    missing = [r for r in range(files or 0) if shard_file(folder, r) is None]
    if missing:
        raise ConfigError(
            f"{folder}: incomplete sharded checkpoint: written by {files} processes, the shard "
            f"files of ranks {missing} are missing"
        )
    reader = HuggingFaceStorageReader(str(folder))
    saved = reader.read_metadata().state_dict_metadata
    for name, tensor in tensors.items():
        problem = _coverage_problem(saved.get(name), tuple(tensor.shape))
        if problem:
            raise ConfigError(
                f"{folder}: incomplete sharded checkpoint: tensor {name} {problem} (a shard file is "
                "missing or was cut short)"
            )
    with warnings.catch_warnings():  # DCP warns that no_dist means one process: intended here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(tensors, storage_reader=reader, no_dist=True)


def _coverage_problem(saved, shape: tuple[int, ...]) -> str:
    """'' when the saved chunks of one tensor (DCP TensorStorageMetadata, or None) tile `shape` exactly."""
    import math

    if saved is None:
        return "is in no shard file"
    if tuple(saved.size) != shape:
        return f"spans {list(saved.size)} in the shard files, the model's is {list(shape)}"
    boxes = [(tuple(c.offsets), tuple(c.sizes)) for c in saved.chunks if math.prod(c.sizes) > 0]
    for i, (offsets, sizes) in enumerate(boxes):
        for other, other_sizes in boxes[:i]:
            if all(o < p + q and p < o + s for o, s, p, q in zip(offsets, sizes, other, other_sizes)):
                return f"has overlapping chunks at offsets {list(other)} and {list(offsets)}"
    held = sum(math.prod(sizes) for _, sizes in boxes)
    return (
        "" if held == math.prod(shape) else f"has {held} of its {math.prod(shape)} values in the shard files"
    )


def broadcast(obj):
    """`obj` as rank 0 holds it, on every rank (itself when not distributed)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
