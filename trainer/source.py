"""Stage 1 of the data path: the source. Which raw samples a rank reads, in which order.

The order of an epoch is a pure function of (seed, epoch, world size):
1. the corpus shards are cut into `units` (a whole shard, or every m-th sample
   of a shard when there are fewer shards than ranks);
2. the unit list is shuffled with a generator seeded by (seed, epoch), BEFORE
   any split, so every rank computes the same global order;
3. `split_by_node` gives rank r the units r, r + world, ...;
4. each unit streams its tar sequentially and shuffles samples inside blocks of
   `block` consecutive samples (seeded by seed, epoch, shard, part, block).

Design choices and their cost:
- Shuffling is shard-order + block-local, like WebDataset's shard shuffle plus a
  shuffle buffer: reads stay sequential (tar and cache shard side by side).
  Cost: samples from one shard stay near each other within an epoch.
- Sample positions in the stream are counted over raw samples, before any
  decode or join, so a position identifies the same sample on every rerun;
  resume skips by position. Cost: resuming mid-shard re-reads (not decodes) the
  tar bytes before the position, because a tar cannot be seeked without an index.
- Units with m > 1 (tiny corpora, many ranks) read the whole tar and keep every
  m-th sample. Cost: m times the tar bytes; irrelevant once shards >= ranks.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from olavlm.schemas.corpus import CorpusShard, ReadFailure, iter_samples, list_shards


@dataclass(frozen=True)
class Unit:
    """Every `parts`-th sample of one shard, starting at sample `part`."""

    shard: CorpusShard
    part: int = 0
    parts: int = 1


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


def split_by_worker(index: int, worker: int, num_workers: int) -> bool:
    """Whether DataLoader worker `worker` builds batch number `index` (counted from the loader's start).

    Batches, not units, are dealt round-robin: the DataLoader collects from its
    workers round-robin too, so the rank's batch order does not depend on the
    number of workers and a resume needs one position only. Cost: every worker
    reads the rank's tar bytes (it decodes only its own batches).
    """
    return index % num_workers == worker


def iter_unit(unit: Unit, *, seed: int, epoch: int, block: int, storage_options: dict | None = None) -> Iterator[Sample]:
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


def rank_stream(units: Sequence[Unit], *, seed: int, epoch: int, block: int,
                storage_options: dict | None = None) -> Iterator[Sample]:
    """All samples of one rank for one epoch, in order (at this point: raw bytes, keys, shard names)."""
    for unit in units:
        yield from iter_unit(unit, seed=seed, epoch=epoch, block=block, storage_options=storage_options)
