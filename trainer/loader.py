"""Stage 5 of the data path: the loader. Puts stages 1-4 together and yields (batch, state).

Per rank, the batch sequence is a pure function of (seed, epoch, world size,
batch size): raw samples of the rank's stream (source.py) are cut into chunks
of `batch_size`; chunk j becomes batch j. DataLoader worker w builds the chunks
with index = w mod num_workers (counted from where this loader started), and the
DataLoader collects from its workers round-robin, so the order does not depend
on the number of workers. The loader runs over epochs without end; training is
counted in steps.

The state after a batch is {"epoch", "batch" (next chunk of that epoch),
"skipped" (counts per reason, cumulative)}: two integers locate the next batch
exactly, so a checkpoint stores it as JSON and `build_loader(..., state=...)`
continues with the very next batch. Samples dropped under on_missing='skip'
leave their batch smaller (a chunk whose samples were all dropped yields
nothing); they are counted in the state, hence in the metrics.

Cost: every worker reads (not decodes) all of its rank's tar bytes; resuming
mid-epoch re-reads the tar bytes of the batches before the position.
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

from .collate import Example, collate
from .images import ImageTransform
from .join import BATCH_DTYPES, TargetJoin
from .source import epoch_units, rank_stream, shards_of, split_by_node, split_by_worker
from .text import ChatRenderer, TextError, sample_conversation, tokenize
from .tokens import TokenLayout

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
        parts = [f"{reason}: {n} (first: {', '.join(self.first[reason])})" for reason, n in sorted(self.counts.items())]
        log.warning("skipped samples %s: %s", when, "; ".join(parts))


SKIP_REASONS = ("read", "bad_json", "bad_image", "missing_target", "sha256_mismatch", "too_long", "no_labels",
                "template")


@dataclass(frozen=True, kw_only=True)
class LoaderState:
    """Where a rank's loader stands: the next batch is chunk `batch` of epoch `epoch`."""

    epoch: int = 0
    """Epoch of the next batch."""
    batch: int = 0
    """Index of the next chunk (of `batch_size` raw samples) within that epoch."""
    skipped: dict[str, int] = field(default_factory=dict)
    """Samples dropped so far (on_missing='skip'), per reason."""

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch, "skipped": dict(self.skipped)}

    @classmethod
    def from_dict(cls, data: dict) -> LoaderState:
        return cls(epoch=int(data["epoch"]), batch=int(data["batch"]), skipped=dict(data.get("skipped", {})))


class SampleStream(IterableDataset):
    """Yields collated batches (plus their position) for one rank; see the module docstring."""

    def __init__(self, config: DataConfig, *, tokenizer, layout: TokenLayout, transform: ImageTransform,
                 join: TargetJoin | None, rank: int = 0, world: int = 1, start: LoaderState = LoaderState(),
                 storage_options: dict | None = None):
        if config.on_missing not in ("error", "skip"):
            raise ConfigError(f"on_missing must be 'error' or 'skip', not {config.on_missing!r}")
        self.config, self.tokenizer, self.layout, self.transform, self.join = config, tokenizer, layout, transform, join
        self.rank, self.world, self.start, self.storage_options = rank, world, start, storage_options
        self.shards = shards_of(config.data, storage_options)
        self.render = ChatRenderer(tokenizer)
        self.skips = SkipLog()
        shapes = join.shapes() if join is not None else {}
        dtypes = {t: BATCH_DTYPES[s.dtype] for t, s in join.specs.items()} if join is not None else {}
        self._collate_args = dict(pad_id=layout.pad_token_id, image_size=transform.crop, mean=transform.mean,
                                  std=transform.std, target_shapes=shapes, target_dtypes=dtypes)

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
            conversations = sample_conversation(sample.files, has_image=image_bytes is not None,
                                                caption_prompt=self.config.caption_prompt)
            text = tokenize(conversations, self.tokenizer, self.layout, has_image=image_bytes is not None,
                            max_length=self.config.max_length, render=self.render)
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

    # -- the stream ----------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if info is not None:  # one worker = one core: Blosc's own threads would only oversubscribe
            import numcodecs.blosc

            numcodecs.blosc.use_threads = False
        cfg = self.config
        epoch, first = self.start.epoch, self.start.batch
        counter = 0  # chunks since this loader started: decides the worker
        while True:
            units = split_by_node(epoch_units(self.shards, seed=cfg.seed, epoch=epoch, world=self.world),
                                  self.rank, self.world)
            stream = rank_stream(units, seed=cfg.seed, epoch=epoch, block=cfg.shuffle_block,
                                 storage_options=self.storage_options)
            index, chunk, any_sample = 0, [], False
            for sample in stream:
                any_sample = True
                chunk.append(sample)
                if len(chunk) < cfg.batch_size:
                    continue
                if index >= first:
                    if split_by_worker(counter, worker, workers):
                        yield self._emit(chunk, epoch, index)
                    counter += 1
                index, chunk = index + 1, []
            if chunk and index >= first:
                if split_by_worker(counter, worker, workers):
                    yield self._emit(chunk, epoch, index)
                counter += 1
            self.skips.flush(f"up to the end of epoch {epoch} (this worker)")
            if not any_sample:
                raise CorpusError(f"rank {self.rank} of {self.world} got no sample in epoch {epoch} of "
                                  f"{cfg.data!r}: the corpus has fewer samples than ranks")
            epoch, first = epoch + 1, 0

    def _emit(self, chunk, epoch: int, index: int) -> dict:
        batch, skipped = self.build_batch(chunk)
        out = batch if batch is not None else {}
        out["_position"] = (epoch, index + 1)
        out["_skipped"] = dict(skipped)
        return out


class Loader:
    """Iterate to get (batch, state): `state` is what to save to continue right after `batch`."""

    def __init__(self, stream: SampleStream, *, num_workers: int, pin_memory: bool = False):
        self.stream, self.num_workers, self.pin_memory = stream, num_workers, pin_memory

    @property
    def fingerprints(self) -> dict[str, str]:
        return dict(self.stream.join.fingerprints) if self.stream.join is not None else {}

    def __iter__(self) -> Iterator[tuple[dict, dict]]:
        # Its own generator: a DataLoader draws its workers' base seed from the generator it is given,
        # else from the global RNG, and a resumed run would take that draw at another step than the
        # uninterrupted run did, shifting every later dropout mask (tests/test_resume.py).
        loader = DataLoader(self.stream, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
                            prefetch_factor=2 if self.num_workers else None,
                            generator=torch.Generator().manual_seed(self.stream.config.seed))
        skipped = Counter(self.stream.start.skipped)
        last_epoch_with_batch = self.stream.start.epoch
        for item in loader:
            epoch, batch_index = item.pop("_position")
            skipped.update(item.pop("_skipped"))
            state = LoaderState(epoch=epoch, batch=batch_index, skipped=dict(skipped)).to_dict()
            if "input_ids" not in item:  # every sample of this chunk was skipped
                if epoch > last_epoch_with_batch + 1:
                    raise CorpusError(f"a whole epoch of {self.stream.config.data!r} yielded no usable sample "
                                      f"(skipped: {dict(skipped)})")
                continue
            last_epoch_with_batch = epoch
            yield item, state


def rank_state(saved: list[dict], rank: int, world: int) -> dict | None:
    """This rank's loader state from the states every rank of the saved run wrote (one per rank).

    The interface a resume uses (train.py); the policy for a run saved at another world size lives
    here, beside the state format it depends on. Today: the same world size only.
    """
    if len(saved) != world:
        raise ConfigError(f"the checkpoint was written by {len(saved)} ranks, this run has {world}: "
                          "an exact resume needs the same world size")
    return saved[rank]


def build_loader(config: DataConfig, *, tokenizer, layout: TokenLayout, transform: ImageTransform,
                 tasks=(), rank: int = 0, world: int = 1, state: dict | LoaderState | None = None,
                 pin_memory: bool = False, storage_options: dict | None = None) -> Loader:
    """The whole data path for one rank. `tasks` = teachers whose targets are joined (() = no cache needed).

    Fails before any worker starts if the cache's teacher fingerprints differ from
    `config.expect_fingerprints` or a task has no targets in the cache.
    """
    if isinstance(state, dict):
        state = LoaderState.from_dict(state)
    if storage_options is None:  # default: the config's (DataConfig.storage_options, --storage-options)
        storage_options = dict(config.storage_options) or None
    join = None
    if tasks:
        if not config.cache:
            raise ConfigError(f"teachers {list(tasks)} need a target cache (DataConfig.cache / --cache)")
        join = TargetJoin(config.cache, tasks, expect_fingerprints=config.expect_fingerprints,
                          storage_options=storage_options)
    stream = SampleStream(config, tokenizer=tokenizer, layout=layout, transform=transform, join=join, rank=rank,
                          world=world, start=state or LoaderState(), storage_options=storage_options)
    return Loader(stream, num_workers=config.num_workers, pin_memory=pin_memory)
