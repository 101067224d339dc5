"""Stage 1 of the data path: the source. Which raw samples a rank, and each of its DataLoader workers, reads.

An epoch's order is a pure function of (seed, epoch, world size, workers): shards are cut into
units (every m-th sample when shards < ranks), the unit list is shuffled from (seed, epoch), rank r
takes units r, r + world, ..., worker w of W the rank's units w, w + W, ... (interleaved sub-units
when the rank has fewer units than workers), and each unit shuffles inside blocks of `block`
samples. A `WorkerPlan` is what one worker reads: `Piece`s left from a resumed epoch, then whole
epochs. Design choice: workers read disjoint units, so each tar byte is read once per epoch and
reads stay sequential. Cost: the order depends on the number of workers, a shard's samples stay
near each other, and a sub-unit reads its whole unit.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from olavlm.schemas.corpus import CorpusShard, ReadFailure, iter_samples, list_shards


@dataclass(frozen=True)
class Unit:
    """Every `parts`-th sample of one shard, starting at sample `part`."""

    shard: CorpusShard
    part: int = 0
    parts: int = 1


@dataclass(frozen=True)
class Piece:
    """Unit `unit` of epoch `epoch`, from its sample `offset` (in the unit's block-shuffled order) on."""

    epoch: int
    unit: Unit
    offset: int = 0


@dataclass
class Sample:
    """One raw sample as read from its tar: bytes only, nothing decoded yet."""

    shard: str
    key: str
    files: dict[str, bytes]
    failure: str = ""
    """Non-empty when the tar broke while this sample was read (the reason)."""


def shards_of(corpus: str, storage_options: dict | None = None) -> list[CorpusShard]:
    """Folder, brace pattern, glob or fsspec URL -> shards sorted by name (a stable base order)."""
    return sorted(list_shards(corpus, storage_options), key=lambda s: s.name)


def epoch_units(shards: Sequence[CorpusShard], *, seed: int, epoch: int, world: int) -> list[Unit]:
    """The global unit order of one epoch; identical on every rank and worker."""
    parts = max(1, math.ceil(world / max(1, len(shards))))
    units = [Unit(shard, k, parts) for shard in shards for k in range(parts)]
    # A str seed goes through sha512 in `random`: stable across processes and Python runs.
    random.Random(f"units:{seed}:{epoch}").shuffle(units)
    return units


def split_by_node(units: Sequence[Unit], rank: int, world: int) -> list[Unit]:
    """Rank r takes units r, r + world, ... of the already shuffled global order."""
    return list(units[rank::world])


def cut_for_workers(units: Sequence[Unit], workers: int) -> list[Unit]:
    """The rank's units, each cut into k = ceil(workers / len(units)) interleaved sub-units when fewer than workers.

    Sub-unit j of (part, parts) keeps the samples i with i % (parts * k) == part + parts * j: the
    k sub-units partition their unit's samples.
    """
    if not units or len(units) >= workers:
        return list(units)
    k = math.ceil(workers / len(units))
    return [Unit(u.shard, u.part + u.parts * j, u.parts * k) for u in units for j in range(k)]


def split_by_worker(units: Sequence[Unit], worker: int, workers: int) -> list[Unit]:
    """DataLoader worker w of W takes the (cut) units w, w + W, ... of its rank, in order."""
    return cut_for_workers(units, workers)[worker::workers]


def worker_units(
    shards: Sequence[CorpusShard], *, seed: int, epoch: int, world: int, rank: int, workers: int, worker: int
) -> list[Unit]:
    """The units worker `worker` of `workers` on rank `rank` of `world` reads in `epoch` (steps 1-4)."""
    units = split_by_node(epoch_units(shards, seed=seed, epoch=epoch, world=world), rank, world)
    return split_by_worker(units, worker, workers)


Deal = Callable[[int], list[Unit]]
"""epoch -> the units one worker reads in that epoch when it starts the epoch afresh."""


@dataclass(frozen=True)
class WorkerPlan:
    """What one worker reads: `pending` pieces in order (grouped by epoch, ascending), then `deal(e)` for e >= next_epoch."""

    pending: tuple[Piece, ...] = ()
    next_epoch: int = 0

    def epochs(self, deal: Deal) -> Iterator[tuple[int, list[Piece]]]:
        """(epoch, its pieces) without end: the pending epochs, then every epoch from `next_epoch` on."""
        for epoch, group in itertools.groupby(self.pending, key=lambda piece: piece.epoch):
            yield epoch, list(group)
        for epoch in itertools.count(self.next_epoch):
            yield epoch, [Piece(epoch, unit) for unit in deal(epoch)]

    def pieces(self, epoch: int, deal: Deal) -> list[Piece]:
        """The pieces this plan reads in `epoch` (as `epochs` yields them)."""
        if epoch >= self.next_epoch:
            return [Piece(epoch, unit) for unit in deal(epoch)]
        return [piece for piece in self.pending if piece.epoch == epoch]

    def after(self, epoch: int, pieces: Sequence[Piece], index: int, offset: int) -> WorkerPlan:
        """The plan left once `offset` samples of `pieces[index]` (this plan's pieces of `epoch`) are read."""
        head = [Piece(epoch, pieces[index].unit, offset), *pieces[index + 1 :]] if index < len(pieces) else []
        later = [piece for piece in self.pending if piece.epoch > epoch]
        return WorkerPlan(tuple(head + later), max(self.next_epoch, epoch + 1))


def remaining(plans: Sequence[tuple[WorkerPlan, Deal]]) -> tuple[dict[int, list[Piece]], int]:
    """What a set of workers (one rank's, or every rank's) has left: ({epoch: pieces}, E).

    From E (the highest `next_epoch`) on, the workers read whole epochs; before E, what is left is
    their pending pieces plus the epochs lagging workers have not started.
    """
    last = max((plan.next_epoch for plan, _ in plans), default=0)
    left: dict[int, list[Piece]] = {}
    for plan, deal in plans:
        for piece in plan.pending:
            left.setdefault(piece.epoch, []).append(piece)
        for epoch in range(plan.next_epoch, last):
            left.setdefault(epoch, []).extend(Piece(epoch, unit) for unit in deal(epoch))
    return dict(sorted(left.items())), last


def redeal(left: dict[int, list[Piece]], next_epoch: int, index: int, count: int) -> WorkerPlan:
    """Share `index` of `count` of what is left (from `remaining`): pieces index, index + count, ... of each epoch.

    Each piece keeps its unit and offset, so no sample is read twice or skipped, whatever the unit
    cut of the run that wrote them. Cost: pieces are not split, so some workers may idle until `next_epoch`.
    """
    pending = [piece for epoch in sorted(left) for piece in left[epoch][index::count]]
    return WorkerPlan(tuple(pending), next_epoch)


def iter_unit(
    unit: Unit, *, seed: int, epoch: int, block: int, storage_options: dict | None = None
) -> Iterator[Sample]:
    """Samples of one unit, block-shuffled."""
    buffer: list[Sample] = []
    blocks = 0

    def flush() -> list[Sample]:
        nonlocal blocks
        rng = random.Random(f"block:{seed}:{epoch}:{unit.shard.name}:{unit.part}:{blocks}")
        blocks += 1
        rng.shuffle(buffer)
        out = list(buffer)
        buffer.clear()
        return out

    index = 0
    for item in iter_samples(unit.shard.url, storage_options):
        mine = index % unit.parts == unit.part
        index += 1
        if not mine:
            continue
        if isinstance(item, ReadFailure):
            buffer.append(Sample(unit.shard.name, item.key, {}, failure=item.reason))
        else:
            buffer.append(Sample(unit.shard.name, item.key, item.files))
        if len(buffer) >= block:
            yield from flush()
    if buffer:
        yield from flush()


def iter_piece(
    piece: Piece, *, seed: int, block: int, storage_options: dict | None = None
) -> Iterator[Sample]:
    """The samples of a piece: its unit's, from `offset` on (the ones before are read, not yielded)."""
    samples = iter_unit(
        piece.unit, seed=seed, epoch=piece.epoch, block=block, storage_options=storage_options
    )
    return itertools.islice(samples, piece.offset, None)
