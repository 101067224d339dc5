"""Stage 5 of the data path: the loader. Puts stages 1-4 together and yields (batch, state).

Per rank and DataLoader worker, the batch sequence is a pure function of (seed,
epoch, world size, number of workers, batch size): worker w reads only its own
units (source.py: `split_by_worker`; num_workers=0 is one worker) and cuts its
raw samples into chunks of `batch_size` (a chunk may span units, never epochs);
each chunk is a batch. The DataLoader collects from its workers round-robin, in
order, so the rank's sequence is worker 0's first batch, worker 1's first, ...
The loader runs over epochs without end; training is counted in steps.

The state after a batch, built in the main process from the batches actually
handed out (a batch a worker prefetched but the loop has not received counts
for nothing), is JSON:
  {"epoch": epoch of that batch, "batch": batches this rank handed out since the
   run began (both informative), "skipped": counts per reason (cumulative),
   "epochs_done": every epoch below it was handed out whole (a loop that wants
   exactly one epoch waits for it), "world", "rank", "next_worker": the worker whose batch comes next,
   "workers": [per worker {"pending": [[epoch, shard, part, parts, offset], ...]
   = its units still to read in its current epoch, the first read up to
   `offset` samples; "next_epoch": the epoch it reads whole after them}]}.
`build_loader(..., state=...)` continues from it:
- same world size and number of workers: each worker resumes at its position
  and DataLoader worker i plays worker (i + next_worker) % W, so the next batch
  is exactly the one an uninterrupted run would have handed out;
- another number of workers: what the saved workers had left (their pending
  pieces, plus the epochs lagging workers had not begun, up to E = the highest
  `next_epoch`) is dealt piece by piece to the new workers (source.py `redeal`),
  who then read whole epochs from E on: no sample of any epoch is repeated or
  lost, the order differs;
- another world size (`rank_state(..., other_world=True)`, which train.py's
  resume asks for, reseeding the per-rank RNG): the same over every saved rank's
  workers, piece i of an epoch to rank i % world, then to its workers; the pieces
  name their units, so it works even when the world size changed the unit cut;
- a state of the earlier format {"epoch", "batch", "skipped"} (batches dealt
  round-robin over one rank stream): read exactly, as one worker that has read
  batch x batch_size samples of that stream; the main process counts the samples
  of the units before that position (reads those tars once) to find it. With one
  worker the resumed order is the old one; with more, it is re-dealt as above.
  It assumes the same batch size, as the old format did.
Every case assumes the saved run's seed and corpus (the deal of epochs not yet
begun is recomputed from the seed; a shard the corpus no longer has is refused).

Samples dropped under on_missing='skip' leave their batch smaller (a chunk whose
samples were all dropped, or a worker epoch with no sample, yields nothing);
they are counted in the state, hence in the metrics.

Cost: the state lists each worker's remaining units of its epoch (about units
per rank, x 40 bytes of JSON per rank); resuming mid-unit re-reads (not decodes)
that unit's tar bytes before the offset; workers whose units hold more samples
run ahead into the next epoch, so batches of two epochs interleave near an epoch
boundary.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from olavlm.schemas.config import DataConfig
from olavlm.schemas.corpus import IMAGE_EXTENSIONS, CorpusError, sha256_hex
from olavlm.schemas.errors import ConfigError, DataError
from olavlm.trainer.data.collate import Example, collate
from olavlm.trainer.data.images import ImageTransform
from olavlm.trainer.data.join import BATCH_DTYPES, TargetJoin
from olavlm.trainer.data.source import (
    Piece,
    Unit,
    WorkerPlan,
    iter_piece,
    redeal,
    remaining,
    shards_of,
    worker_units,
)
from olavlm.trainer.data.text import ChatRenderer, TextError, sample_conversation, tokenize
from olavlm.trainer.student.tokens import TokenLayout

log = logging.getLogger(__name__)


class SkipLog:
    """Skipped samples (on_missing='skip') logged as summaries, not one line per sample.

    The first sample of each reason is logged at once (its key, shard and why); after that,
    one line per reason with the count and the first `keys` keys, every `every` skips and at
    the end of each epoch. Each DataLoader worker keeps its own (counts are per worker; the
    exact totals are the loader state's `skipped`). Cost: a bad key beyond the first few is
    named nowhere; rerun with on_missing='error' to stop at it.
    """

    def __init__(self, every: int = 1000, keys: int = 3):
        self.every, self.keys = every, keys
        self.counts: Counter = Counter()
        self.first: dict[str, list[str]] = {}
        self.pending = 0

    def add(self, exc: DataError) -> None:
        if exc.reason not in self.first:
            log.warning("skipping samples with reason %r; the first: %s", exc.reason, exc)
            self.first[exc.reason] = []
        if len(self.first[exc.reason]) < self.keys:
            self.first[exc.reason].append(f"{exc.shard}/{exc.key}")
        self.counts[exc.reason] += 1
        self.pending += 1
        if self.pending >= self.every:
            self.flush("so far")

    def flush(self, when: str) -> None:
        if not self.pending:
            return
        self.pending = 0
        parts = [
            f"{reason}: {n} (first: {', '.join(self.first[reason])})"
            for reason, n in sorted(self.counts.items())
        ]
        log.warning("skipped samples %s: %s", when, "; ".join(parts))


SKIP_REASONS = (
    "read",
    "bad_json",
    "bad_image",
    "missing_target",
    "sha256_mismatch",
    "too_long",
    "no_labels",
    "template",
)


@dataclass(frozen=True, kw_only=True)
class LoaderState:
    """Where a rank's loader stands after a batch; `to_dict` is the JSON a checkpoint keeps (module docstring)."""

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
    """Per worker, `plan_to_json` of what it has left."""

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


class SampleStream(IterableDataset):
    """Yields collated batches (plus their position) for one rank; see the module docstring."""

    def __init__(
        self,
        config: DataConfig,
        *,
        tokenizer,
        layout: TokenLayout,
        transform: ImageTransform,
        join: TargetJoin | None,
        rank: int = 0,
        world: int = 1,
        start: dict | None = None,
        storage_options: dict | None = None,
    ):
        if config.on_missing not in ("error", "skip"):
            raise ConfigError(f"on_missing must be 'error' or 'skip', not {config.on_missing!r}")
        self.config, self.tokenizer, self.layout, self.transform, self.join = (
            config,
            tokenizer,
            layout,
            transform,
            join,
        )
        self.rank, self.world, self.storage_options = rank, world, storage_options
        self.shards = shards_of(config.data, storage_options)
        self.start = start or {}
        self.plans, self.next_worker = self._resume_plans(self.start, max(1, config.num_workers))
        self.render = ChatRenderer(tokenizer)
        self.skips = SkipLog()
        shapes = join.shapes() if join is not None else {}
        dtypes = {t: BATCH_DTYPES[s.dtype] for t, s in join.specs.items()} if join is not None else {}
        self._collate_args = dict(
            pad_id=layout.pad_token_id, image_size=transform.crop, target_shapes=shapes, target_dtypes=dtypes
        )

    # -- one sample ----------------------------------------------------------------------------
    def prepare(self, sample, buffers: dict[str, torch.Tensor] | None = None, row: int = 0) -> Example:
        """Raw sample -> Example (stages 2-3); a DataError names key and shard.

        With `buffers`, the targets go into row `row` of them (zeros for a text-only
        sample) instead of into `Example.targets`.
        """
        key, shard = sample.key, sample.shard
        if sample.failure:
            raise DataError("read", key, shard, sample.failure)
        image_bytes = next((sample.files[e] for e in IMAGE_EXTENSIONS if e in sample.files), None)
        try:
            conversations = sample_conversation(
                sample.files, has_image=image_bytes is not None, caption_prompt=self.config.caption_prompt
            )
            text = tokenize(
                conversations,
                self.tokenizer,
                self.layout,
                has_image=image_bytes is not None,
                max_length=self.config.max_length,
                render=self.render,
            )
        except TextError as exc:
            raise DataError(exc.reason, key, shard, str(exc)) from None
        image, targets = None, {}
        if image_bytes is not None:
            try:
                image = self.transform(image_bytes)
            except ValueError as exc:
                raise DataError("bad_image", key, shard, str(exc)) from None
            if self.join is not None and buffers is not None:
                self.join.read_into(buffers, row, shard, key, sha256_hex(image_bytes))
            elif self.join is not None:
                targets = self.join(shard, key, sha256_hex(image_bytes))
        elif buffers is not None:
            for buffer in buffers.values():
                buffer[row].zero_()
        return Example(key, text.input_ids, text.labels, image, targets)

    def build_batch(self, chunk) -> tuple[dict | None, Counter]:
        examples, skipped = [], Counter()
        # Targets are decompressed straight into the batch (no per-sample tensors, no stacking copy).
        buffers = self.join.buffers(len(chunk)) if self.join is not None else {}
        for sample in chunk:
            try:
                examples.append(self.prepare(sample, buffers, len(examples)))
            except DataError as exc:
                if self.config.on_missing != "skip":
                    raise
                skipped[exc.reason] += 1
                self.skips.add(exc)
        if not examples:
            return None, skipped
        targets = {t: b[: len(examples)] for t, b in buffers.items()}
        return collate(examples, **self._collate_args, targets=targets), skipped

    # -- where each worker starts -------------------------------------------------------------
    def deal(self, worker: int, workers: int, *, world: int | None = None, rank: int | None = None):
        """epoch -> the units `worker` of `workers` reads in a whole epoch (of this run, or of a saved one)."""
        world, rank = (self.world, self.rank) if world is None else (world, rank)
        return lambda epoch: worker_units(
            self.shards,
            seed=self.config.seed,
            epoch=epoch,
            world=world,
            rank=rank,
            workers=workers,
            worker=worker,
        )

    def _resume_plans(self, state: dict, workers: int) -> tuple[list[WorkerPlan], int]:
        """(one plan per worker, the worker whose batch comes first) for a start `state` (module docstring)."""
        if not state:
            return [WorkerPlan() for _ in range(workers)], 0
        if "ranks" in state:  # from rank_state: a run saved at another world size
            saved = state["ranks"]
            old = [
                plan
                for r, rank_saved in enumerate(saved)
                for plan in self._saved_plans(rank_saved, r, len(saved))
            ]
            left, next_epoch = remaining(old)
            count = self.world * workers
            return [redeal(left, next_epoch, self.rank + self.world * w, count) for w in range(workers)], 0
        if (
            int(state.get("world", self.world)) != self.world
            or int(state.get("rank", self.rank)) != self.rank
        ):
            raise ConfigError(
                f"this loader state was written by rank {state.get('rank')} of {state.get('world')}, "
                f"not rank {self.rank} of {self.world}: pass the saved states through rank_state"
            )
        old = self._saved_plans(state, self.rank, self.world)
        if "workers" in state and len(old) == workers:
            return [plan for plan, _ in old], int(state.get("next_worker", 0)) % workers
        left, next_epoch = remaining(old)
        return [redeal(left, next_epoch, w, workers) for w in range(workers)], 0

    def _saved_plans(self, state: dict, rank: int, world: int) -> list[tuple[WorkerPlan, object]]:
        """The (plan, deal) of each worker of one saved rank."""
        if "workers" not in state:
            raise ConfigError(
                f"this loader state has no 'workers' (not written by this olavlm; resume is not "
                f"possible, start the run again): {state!r:.200}"
            )
        by_name = {shard.name: shard for shard in self.shards}
        saved = state["workers"]
        return [
            (
                plan_from_json(data, by_name, self.config.data),
                self.deal(w, len(saved), world=world, rank=rank),
            )
            for w, data in enumerate(saved)
        ]

    # -- the stream ----------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        process, processes = (info.id, info.num_workers) if info is not None else (0, 1)
        if processes != len(self.plans):
            raise ConfigError(
                f"this stream was planned for {len(self.plans)} workers, the DataLoader has {processes}"
            )
        if info is not None:  # one worker = one core: Blosc's own threads would only oversubscribe
            import numcodecs.blosc

            numcodecs.blosc.use_threads = False
        cfg = self.config
        worker = (
            process + self.next_worker
        ) % processes  # the worker whose batch the DataLoader asks for first
        for epoch, pieces in self.plans[worker].epochs(self.deal(worker, processes)):
            chunk, any_sample = [], False
            for index, piece in enumerate(pieces):
                offset = piece.offset
                for sample in iter_piece(
                    piece, seed=cfg.seed, block=cfg.shuffle_block, storage_options=self.storage_options
                ):
                    offset += 1
                    any_sample = True
                    chunk.append(sample)
                    if len(chunk) == cfg.batch_size:
                        yield self._emit(chunk, worker, (epoch, index, offset))
                        chunk = []
            # An epoch without any sample still reports, else a worker with only empty units would never
            # answer the DataLoader's turn; a resumed epoch with nothing left does not (the run it resumes did not).
            if chunk or (not any_sample and not any(piece.offset for piece in pieces)):
                yield self._emit(chunk, worker, (epoch, len(pieces), 0))
            self.skips.flush(f"up to the end of epoch {epoch} (this worker)")

    def _emit(self, chunk, worker: int, position: tuple[int, int, int]) -> dict:
        batch, skipped = self.build_batch(chunk) if chunk else (None, Counter())
        out = batch if batch is not None else {}
        out["_worker"], out["_position"], out["_skipped"] = worker, position, dict(skipped)
        return out


class Loader:
    """Iterate to get (batch, state): `state` is what to save to continue right after `batch`."""

    def __init__(self, stream: SampleStream, *, num_workers: int, pin_memory: bool = False):
        self.stream, self.num_workers, self.pin_memory = stream, num_workers, pin_memory

    @property
    def fingerprints(self) -> dict[str, str]:
        return dict(self.stream.join.fingerprints) if self.stream.join is not None else {}

    def __iter__(self) -> Iterator[tuple[dict, dict]]:
        stream = self.stream
        plans = stream.plans
        workers = len(plans)
        if max(1, self.num_workers) != workers:
            raise ConfigError(
                f"the stream was planned for {workers} workers, the loader has {self.num_workers}"
            )
        # Its own generator: a DataLoader draws its workers' base seed from the generator it is given,
        # else from the global RNG, and a resumed run would take that draw at another step than the
        # uninterrupted run did, shifting every later dropout mask (tests/test_resume.py).
        loader = DataLoader(
            stream,
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            prefetch_factor=2 if self.num_workers else None,
            generator=torch.Generator().manual_seed(stream.config.seed),
        )
        start = stream.start
        skipped = Counter(start.get("skipped", {}))
        handed_out = int(start.get("batch", 0))
        saved = [plan_to_json(plan) for plan in plans]
        reading = [first_epoch(plan) for plan in plans]  # the epoch each worker has not finished yet
        last_epoch_with_batch = min(reading)
        pieces: dict[int, tuple[int, list]] = {}  # worker -> (epoch, the pieces its plan reads in that epoch)
        for item in loader:
            worker, (epoch, index, offset) = item.pop("_worker"), item.pop("_position")
            skipped.update(item.pop("_skipped"))
            if pieces.get(worker, (None,))[0] != epoch:
                pieces[worker] = epoch, plans[worker].pieces(epoch, stream.deal(worker, workers))
            # Positions count from the plan the worker started with; only this worker's entry changes.
            left = plans[worker].after(epoch, pieces[worker][1], index, offset)
            saved[worker], reading[worker] = plan_to_json(left), first_epoch(left)
            if (
                "input_ids" not in item
            ):  # every sample of this chunk was skipped, or the worker's epoch was empty
                if (
                    min(reading) > last_epoch_with_batch + 1
                ):  # every worker finished an epoch with nothing usable
                    raise CorpusError(
                        f"rank {stream.rank} of {stream.world}: a whole epoch of {stream.config.data!r} "
                        f"yielded no usable sample (skipped: {dict(skipped)}; a corpus with fewer "
                        "samples than ranks gives some rank none)"
                    )
                continue
            last_epoch_with_batch = max(last_epoch_with_batch, epoch)
            handed_out += 1
            state = LoaderState(
                epoch=epoch,
                batch=handed_out,
                skipped=dict(skipped),
                epochs_done=min(reading),
                world=stream.world,
                rank=stream.rank,
                next_worker=(worker + 1) % workers,
                workers=tuple(saved),
            )
            yield item, state.to_dict()


def first_epoch(plan: WorkerPlan) -> int:
    """The lowest epoch a plan still reads from."""
    return plan.pending[0].epoch if plan.pending else plan.next_epoch


def rank_state(saved: list[dict], rank: int, world: int, *, other_world: bool = False) -> dict | None:
    """This rank's loader state from the states every rank of the saved run wrote (one per rank).

    The interface a resume uses (train.py); the policy for a run saved at another world size lives
    here, beside the state format it depends on. The same world size: the rank's own state (an
    exact resume). Another: refused unless `other_world`, because a resume also restores each
    rank's RNG state (train.py `_restore`), which has no counterpart at another world size; the
    loader itself can continue there: with `other_world`, every rank gets all saved states and
    reads its share of what they had left (module docstring), without repeating or losing a
    sample; the skipped counts so far go to rank 0, so the ranks' sum stays the run's total.
    Cost: every rank plans from every saved state (JSON, no tar read, except for states of the
    earlier format, whose position is found by counting samples).
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


def build_loader(
    config: DataConfig,
    *,
    tokenizer,
    layout: TokenLayout,
    transform: ImageTransform,
    tasks=(),
    rank: int = 0,
    world: int = 1,
    state: dict | LoaderState | None = None,
    pin_memory: bool = False,
    storage_options: dict | None = None,
) -> Loader:
    """The whole data path for one rank. `tasks` = teachers whose targets are joined (() = no cache needed).

    Fails before any worker starts if the cache's teacher fingerprints differ from
    `config.expect_fingerprints` or a task has no targets in the cache.
    """
    if isinstance(state, LoaderState):
        state = state.to_dict()
    if storage_options is None:  # default: the config's (DataConfig.storage_options, --storage-options)
        storage_options = dict(config.storage_options) or None
    join = None
    if tasks:
        if not config.cache:
            raise ConfigError(f"teachers {list(tasks)} need a target cache (DataConfig.cache / --cache)")
        join = TargetJoin(
            config.cache,
            tasks,
            expect_fingerprints=config.expect_fingerprints,
            storage_options=storage_options,
        )
    stream = SampleStream(
        config,
        tokenizer=tokenizer,
        layout=layout,
        transform=transform,
        join=join,
        rank=rank,
        world=world,
        start=state,
        storage_options=storage_options,
    )
    if (
        join is not None
    ):  # in this process, before the workers fork: they inherit one index, not build one each
        join.open_keyed(shard.name for shard in stream.shards)
    return Loader(stream, num_workers=config.num_workers, pin_memory=pin_memory)
