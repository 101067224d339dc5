"""Stage 5 of the data path: the loader. Puts stages 1-4 together and yields (batch, state).

Worker w reads only its own units (source.py) and cuts its raw samples into chunks of
`batch_size`, never across epochs; the DataLoader collects from its workers in turn, over epochs
without end. `state` is what to save to continue right after its batch (loader_state.py); samples
skipped under on_missing='skip' leave their batch smaller and are counted there. Cost: workers
whose units hold more samples run ahead, so batches of two epochs interleave near an epoch's end.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from olavlm.schemas.config import DataConfig
from olavlm.schemas.corpus import IMAGE_EXTENSIONS, CorpusError, sha256_hex
from olavlm.schemas.errors import ConfigError, DataError
from olavlm.trainer.data.collate import Example, collate
from olavlm.trainer.data.images import ImageTransform
from olavlm.trainer.data.join import BATCH_DTYPES, TargetJoin
from olavlm.trainer.data.loader_state import LoaderState, first_epoch, plan_to_json, start_plans, worker_deal
from olavlm.trainer.data.source import iter_piece, shards_of
from olavlm.trainer.data.text import ChatRenderer, TextError, sample_conversation, tokenize
from olavlm.trainer.student.tokens import TokenLayout

log = logging.getLogger(__name__)


class SkipLog:
    """Skipped samples (on_missing='skip') logged as summaries, one worker's counts each.

    The first of each reason is logged at once; then its count and first `keys` keys, every `every`
    skips and at each epoch's end. Cost: later bad keys are not named (on_missing='error' stops there).
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
        self.plans, self.next_worker = start_plans(
            self.start,
            self.shards,
            seed=config.seed,
            corpus=config.data,
            rank=rank,
            world=world,
            workers=max(1, config.num_workers),
        )
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

        With `buffers`, the targets go into their row `row` (zeros without an image), not `Example.targets`.
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

    # -- what each worker reads ---------------------------------------------------------------
    def deal(self, worker: int, workers: int):
        """epoch -> the units `worker` of `workers` on this rank reads in a whole epoch."""
        return worker_deal(
            self.shards,
            seed=self.config.seed,
            world=self.world,
            rank=self.rank,
            worker=worker,
            workers=workers,
        )

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
        # The worker whose batch the DataLoader asks for first.
        worker = (process + self.next_worker) % processes
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
            # Every sample of this chunk was skipped, or the worker's epoch was empty.
            if "input_ids" not in item:
                # Every worker finished an epoch with nothing usable.
                if min(reading) > last_epoch_with_batch + 1:
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

    Fails before any worker starts if the cache's fingerprints differ from `config.expect_fingerprints`
    or a task has no targets in the cache.
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
    if join is not None:  # before the workers fork: they inherit one index, not build one each
        join.open_keyed(shard.name for shard in stream.shards)
    return Loader(stream, num_workers=config.num_workers, pin_memory=pin_memory)
