"""The plan of a precompute job (`ola precompute --dry-run`): what is done, what is left, what it costs.

`make_plan` compares the teachers' specs with the cache: per teacher, the shards committed under the
same spec and those to do, with sample counts from the tars' headers (a `pipe:` shard is read once
whole). The driver makes the same plan to pick its shards, so a dry run shows what a run would do.
Cost: `plan_precompute` loads every teacher once on this machine's CPU, because the spec (and its
weights hash) exists only where the weights are loaded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from olavlm.schemas import quant
from olavlm.schemas.cache import TargetCache
from olavlm.schemas.corpus import CorpusShard, list_shards, open_shard, split_member_name
from olavlm.schemas.spec import TeacherSpec

from .config import PrecomputeConfig


@dataclass(frozen=True)
class Plan:
    """What a run would do: per teacher, shards done and to do; samples and bytes to write."""

    specs: dict[str, TeacherSpec]
    shards: list[CorpusShard]
    todo: dict[str, tuple[str, ...]]
    """Shard name -> teachers still to compute for it (shards with nothing to do are absent)."""
    done: dict[str, int]
    """Teacher -> committed shards."""
    spec_status: dict[str, str]
    """Teacher -> 'new', 'same' or 'differs (fields)'."""
    samples: dict[str, int]
    """Shard name -> samples in its tar (counted from the tar headers)."""

    def estimated_bytes(self) -> int:
        """Uncompressed bytes still to write: an upper bound, the codec saves some of it."""
        return sum(self.shard_bytes(shard) for shard in self.todo)

    def shard_bytes(self, shard: str) -> int:
        """Uncompressed bytes of one shard's targets still to write (0 when its samples were not counted)."""
        total = 0
        for name in self.todo.get(shard, ()):
            spec = self.specs[name]
            tokens, width = spec.shape
            per_value = np.dtype(quant.zarr_dtype(spec.dtype)).itemsize
            scale = 4 * tokens if spec.dtype == "int8" else 0
            total += self.samples.get(shard, 0) * (tokens * width * per_value + scale)
        return total

    def describe(self) -> str:
        lines = [f"corpus: {len(self.shards)} shards, {sum(self.samples.values())} samples"]
        for name, spec in self.specs.items():
            todo = [s for s, names in self.todo.items() if name in names]
            samples = sum(self.samples.get(s, 0) for s in todo)
            lines.append(
                f"  {name:6s} {spec.kind:18s} shape {spec.shape[0]}x{spec.shape[1]} {spec.dtype:8s} "
                f"spec {spec.fingerprint} ({self.spec_status[name]}): {self.done[name]} shards done, "
                f"{len(todo)} to do ({samples} samples)"
            )
            lines.append(f"         {spec.provenance()}")  # revision + weights hash
        lines.append(f"estimated bytes to write: {self.estimated_bytes() / 1e6:.1f} MB (uncompressed)")
        return "\n".join(lines)


def count_samples(shard: CorpusShard, storage_options: dict | None = None) -> int:
    """Samples in a tar from its headers (local files seek past the data; `pipe:` streams read through it).
    A shard that cannot be read counts what was read before the failure (0 if nothing): the dry run
    reports, the run itself raises."""
    keys, previous = 0, None
    with contextlib.suppress(tarfile.TarError, EOFError, OSError):
        with open_shard(shard.url, storage_options) as raw, tarfile.open(fileobj=raw, mode="r:") as tar:
            for member in tar:
                key, ext = split_member_name(member.name)
                if not member.isfile() or not ext or key.startswith("__"):
                    continue
                if key != previous:
                    keys, previous = keys + 1, key
    return keys


def _spec_status(cache: TargetCache, spec: TeacherSpec) -> str:
    stored = cache.specs().get(spec.name)
    if stored is None:
        return "new"
    if stored.fingerprint == spec.fingerprint:
        return "same"
    return f"differs in {', '.join(stored.diff(spec))}"


def make_plan(
    config: PrecomputeConfig, specs: dict[str, TeacherSpec], shards: list[CorpusShard], count: bool = True
) -> Plan:
    """Compare the specs with the cache; `count` reads every tar's headers for the sample counts."""
    cache = TargetCache(config.cache, config.storage_options)
    status = {name: _spec_status(cache, spec) for name, spec in specs.items()}
    committed = {
        name: set(cache.committed_shards(name)) if status[name] == "same" else set() for name in specs
    }
    todo = {}
    for shard in shards:
        names = tuple(n for n in specs if shard.name not in committed[n])
        if names:
            todo[shard.name] = names
    samples = {}
    if count:
        with ThreadPoolExecutor(8) as pool:  # header reads: local tars seek past the data
            counts = pool.map(lambda s: count_samples(s, config.corpus_options), shards)
            samples = dict(zip([s.name for s in shards], counts))
    return Plan(
        specs=specs,
        shards=shards,
        todo=todo,
        done={n: len(c) for n, c in committed.items()},
        spec_status=status,
        samples=samples,
    )


def plan_precompute(config: PrecomputeConfig) -> Plan:
    """`--dry-run`: load the teachers on this machine's CPU for their specs, then compare with the cache."""
    from .teachers import load_teacher

    shards = list_shards(config.corpus, config.corpus_options)
    specs = {}
    for name, source in config.sources().items():
        spec = load_teacher(source, device="cpu").spec
        specs[name] = dataclasses.replace(spec, dtype=config.dtype)
    return make_plan(config, specs, shards)
