"""Stage 5's bookkeeping: the loader state a checkpoint keeps, and where each worker resumes from it.

After each batch the main process records, per worker, the pieces it still has to read in its
epoch and the epoch it reads whole next (`LoaderState`), never counting prefetched batches.
`start_plans` continues from it: with the same world size and worker count, exactly with the next
batch; with others (`rank_state`), what the saved workers had left is dealt anew piece by piece, no
sample repeated or lost, in another order. Cost: a resume mid-unit re-reads (not decodes) that
unit's tar up to the saved offset.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from olavlm.schemas.corpus import CorpusShard
from olavlm.schemas.errors import ConfigError
from olavlm.trainer.data.source import Deal, Piece, Unit, WorkerPlan, redeal, remaining, worker_units


@dataclass(frozen=True, kw_only=True)
class LoaderState:
    """Where a rank's loader stands after a batch; `to_dict` is the JSON a checkpoint keeps."""

    epoch: int = 0
    """Epoch of the last batch handed out (workers may be in different epochs; informative)."""
    batch: int = 0
    """Batches this rank handed out since the run began (informative)."""
    skipped: dict[str, int] = field(default_factory=dict)
    """Samples dropped so far (on_missing='skip'), per reason."""
    epochs_done: int = 0
    """Every epoch below this one has been handed out whole (by every worker); it lags by up to one batch."""
    world: int = 1
    rank: int = 0
    next_worker: int = 0
    """The worker whose batch comes next (the DataLoader asks its workers in turn)."""
    workers: tuple[dict, ...] = ()
    """Per worker, `plan_to_json` of what it has left: {"pending": [[epoch, shard, part, parts,
    offset], ...], "next_epoch": the epoch it reads whole after them}."""

    def to_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "batch": self.batch,
            "skipped": dict(self.skipped),
            "epochs_done": self.epochs_done,
            "world": self.world,
            "rank": self.rank,
            "next_worker": self.next_worker,
            "workers": list(self.workers),
        }


def plan_to_json(plan: WorkerPlan) -> dict:
    return {
        "pending": [[p.epoch, p.unit.shard.name, p.unit.part, p.unit.parts, p.offset] for p in plan.pending],
        "next_epoch": plan.next_epoch,
    }


def plan_from_json(data: dict, shards: dict, corpus: str) -> WorkerPlan:
    """The inverse of `plan_to_json`; a shard the corpus no longer has is a ConfigError."""
    pending = []
    try:
        for epoch, name, part, parts, offset in data["pending"]:
            if name not in shards:
                raise ConfigError(
                    f"the loader state names shard {name!r}, which {corpus!r} does not have: "
                    "resume on the corpus the run was saved with"
                )
            pending.append(Piece(int(epoch), Unit(shards[name], int(part), int(parts)), int(offset)))
        return WorkerPlan(tuple(pending), int(data["next_epoch"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"a worker's loader state is malformed ({exc!r}): {data!r:.200}") from None


def first_epoch(plan: WorkerPlan) -> int:
    """The lowest epoch a plan still reads from."""
    return plan.pending[0].epoch if plan.pending else plan.next_epoch


def worker_deal(
    shards: Sequence[CorpusShard], *, seed: int, world: int, rank: int, worker: int, workers: int
) -> Deal:
    """epoch -> the units `worker` of `workers` on `rank` of `world` reads in a whole epoch."""
    return lambda epoch: worker_units(
        shards, seed=seed, epoch=epoch, world=world, rank=rank, workers=workers, worker=worker
    )


def start_plans(
    state: dict, shards: Sequence[CorpusShard], *, seed: int, corpus: str, rank: int, world: int, workers: int
) -> tuple[list[WorkerPlan], int]:
    """(one plan per worker, the worker whose batch comes first) to continue from a start `state`."""
    if not state:
        return [WorkerPlan() for _ in range(workers)], 0
    where = {"shards": shards, "seed": seed, "corpus": corpus}
    if "ranks" in state:  # from rank_state: a run saved at another world size
        saved = state["ranks"]
        old = [plan for r, kept in enumerate(saved) for plan in _saved_plans(kept, r, len(saved), **where)]
        left, next_epoch = remaining(old)
        return [redeal(left, next_epoch, rank + world * w, world * workers) for w in range(workers)], 0
    if int(state.get("world", world)) != world or int(state.get("rank", rank)) != rank:
        raise ConfigError(
            f"this loader state was written by rank {state.get('rank')} of {state.get('world')}, "
            f"not rank {rank} of {world}: pass the saved states through rank_state"
        )
    old = _saved_plans(state, rank, world, **where)
    if len(old) == workers:
        return [plan for plan, _ in old], int(state.get("next_worker", 0)) % workers
    left, next_epoch = remaining(old)
    return [redeal(left, next_epoch, w, workers) for w in range(workers)], 0


def _saved_plans(
    state: dict, rank: int, world: int, *, shards: Sequence[CorpusShard], seed: int, corpus: str
) -> list[tuple[WorkerPlan, Deal]]:
    """The (plan, deal) of each worker of one saved rank."""
    if "workers" not in state:
        raise ConfigError(
            f"this loader state has no 'workers' (not written by this olavlm; resume is not "
            f"possible, start the run again): {state!r:.200}"
        )
    by_name = {shard.name: shard for shard in shards}
    saved = state["workers"]
    return [
        (
            plan_from_json(data, by_name, corpus),
            worker_deal(shards, seed=seed, world=world, rank=rank, worker=w, workers=len(saved)),
        )
        for w, data in enumerate(saved)
    ]


def rank_state(saved: list[dict], rank: int, world: int, *, other_world: bool = False) -> dict | None:
    """This rank's loader state from the states every rank of the saved run wrote (one per rank).

    The same world size: the rank's own state. Another: refused unless `other_world` (each rank's RNG
    state has no counterpart there); then every rank plans from all saved states, and rank 0 takes
    the skipped counts so far, so the ranks' sum stays the run's total.
    """
    if len(saved) == world:
        return saved[rank]
    if not other_world:
        raise ConfigError(
            f"the checkpoint was written by {len(saved)} ranks, this run has {world}: "
            "an exact resume needs the same world size"
        )
    total: Counter = Counter()
    for state in saved:
        total.update(state.get("skipped", {}))
    return {
        "epoch": min((int(s.get("epoch", 0)) for s in saved), default=0),
        "batch": int(saved[rank].get("batch", 0)) if rank < len(saved) else 0,
        "skipped": dict(total) if rank == 0 else {},
        "ranks": list(saved),
    }
