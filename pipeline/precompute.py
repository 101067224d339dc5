"""`ola precompute CORPUS CACHE`: teacher targets for every image of a corpus, as one Ray job.

The data path, one (teacher set, corpus shard) at a time:

    1. preprocess_shard  CPU task, streaming generator: tar -> decode -> resize -> uint8 batches
    2. TeacherWorker     actor (one GPU each where GPUs exist): normalise, forward, encode
                         (int8 quantised on the device) -> one result per teacher and batch
    3. write_shard_task  CPU task: the shard's results -> `TargetCache.write_shard` (atomic commit)

Design choices and their cost:
- Ray core, not Ray Data: the corpus shard must stay the unit of work and of
  commit (design.md), and Ray Data re-blocks rows across files. One driver
  thread per shard in flight submits the shard's batches to the least-busy
  actor as the generator yields them; at most `shards_in_flight` shards run at
  once, and each shard has at most MAX_PENDING_BATCHES batches queued at the
  actors, which bounds memory. Cost: a driver thread per shard in flight
  (cheap; they only wait), and a shard's whole output sits in the object store
  until its writer runs (spilled to disk by Ray if it must).
- Batches never cross shard boundaries, so a batch's content depends only on
  the shard and the batch size: a rerun (after a crash) computes exactly the
  same batches and therefore bit-identical targets. Cost: the last batch of a
  shard is usually short.
- Decoding overlaps compute: generators keep running while the actors work;
  actors receive uint8 arrays and never touch a tar or a JPEG. Compression and
  writing happen in the writer task, off the actor.
- Ray retries tasks (at-least-once); `write_shard` is idempotent and commits
  by rename (or commit.json last on object stores), so a retry never
  duplicates or half-writes a shard. A SIGKILLed job leaves only staging
  folders, removed by `clean_staging` at the next start.
- Resume is per (teacher, shard): committed pairs are skipped, so adding a
  teacher to an existing cache runs only that teacher.
- Specs (with the weights hash) are computed where the weights are loaded: in
  the actors for a run, in-process for `--dry-run` (which therefore loads the
  teachers once on the CPU).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tarfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from olavlm.schemas import quant
from olavlm.schemas.cache import SampleError, TargetCache
from olavlm.schemas.corpus import (
    CorpusShard,
    ReadFailure,
    iter_samples,
    list_shards,
    sha256_hex,
    split_member_name,
)
from olavlm.schemas.errors import ConfigError
from olavlm.schemas.spec import STORAGE_DTYPES, TeacherSpec

from .preprocess import input_shape, prepare_all
from .presets import PRESETS, TEACHER_NAMES, TeacherSource, preset_sources, with_overrides

MAX_PENDING_BATCHES = 2
"""Batches of one shard queued at the actors before its driver thread waits (bounds memory)."""
CPU_ACTOR_CPUS = 0.5
"""Logical CPUs of a CPU-only teacher actor: fractional, else 2 actors on 2 CPUs starve the tasks."""
CPU_TASK_CPUS = 0.25
"""Logical CPUs of a preprocess or writer task when no GPU is used (they share the cores with torch)."""
CPU_TASK_NICE = 10
"""Niceness of preprocess and writer tasks in CPU-only runs (see `background_priority`)."""
COMPUTE_DTYPES = ("auto", "float32", "float16", "bfloat16")


@dataclass(frozen=True, kw_only=True)
class PrecomputeConfig:
    """One precompute job; the CLI options map onto these fields."""

    corpus: str
    """Folder, brace pattern or fsspec URL of WebDataset tar shards."""
    cache: str
    """Target cache root: local folder or fsspec URL (s3://...)."""
    teachers: tuple[str, ...] = TEACHER_NAMES
    """Which teachers to run (and to resume): any of depth, seg, gen."""
    preset: str = "paper"
    """Teacher weights: paper (hub checkpoints), tiny or small (seeded random, offline)."""
    overrides: dict[str, str] = field(default_factory=dict)
    """Teacher name -> hub id or folder replacing the preset's weights (same recipe)."""
    dtype: str = "float16"
    """Storage dtype: float16, bfloat16 or int8 (lossy, fidelity recorded per shard)."""
    compute_dtype: str = "auto"
    """Teacher compute dtype: auto = float16 on GPU, float32 on CPU."""
    batch_size: int = 16
    """Images per teacher forward (batches never cross shard boundaries)."""
    address: str | None = None
    """Ray cluster address to join; None starts a local Ray (or reuses the one this process runs)."""
    actors: int | None = None
    """Teacher actors; default: one per GPU, or 1 without GPUs."""
    num_gpus: int | None = None
    """GPUs to use; default: all GPUs Ray sees (0 = CPU only)."""
    cpu_threads: int | None = None
    """torch threads per CPU actor; default: the cluster's CPUs divided among the actors."""
    shards_in_flight: int | None = None
    """Shards preprocessed at once; default 2 x actors + 1."""
    dry_run: bool = False
    """Print the plan and exit."""
    overwrite: bool = False
    """Replace a teacher whose stored spec differs (deletes its committed shards)."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    """fsspec options of the cache root (e.g. {'client_kwargs': {'endpoint_url': ...}})."""
    corpus_storage_options: dict[str, Any] = field(default_factory=dict)
    """fsspec options of the corpus."""
    progress: bool = True
    """Show a progress bar (images/s, ETA) on stderr."""

    def __post_init__(self) -> None:
        if self.dtype not in STORAGE_DTYPES:
            raise ConfigError(f"--dtype {self.dtype!r} is not one of {', '.join(STORAGE_DTYPES)}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ConfigError(f"compute dtype {self.compute_dtype!r} is not one of {', '.join(COMPUTE_DTYPES)}")
        if self.preset not in PRESETS:
            raise ConfigError(f"--preset {self.preset!r} is not one of {', '.join(PRESETS)}")
        if not self.teachers or len(set(self.teachers)) != len(self.teachers):
            raise ConfigError(f"--teachers {','.join(self.teachers)!r}: give each teacher once, at least one")
        if self.batch_size < 1 or (self.actors is not None and self.actors < 1):
            raise ConfigError("--batch-size and --actors must be >= 1")

    def sources(self) -> dict[str, TeacherSource]:
        sources = with_overrides(preset_sources(self.preset, tuple(t for t in self.teachers if t in TEACHER_NAMES)),
                                 self.overrides)
        missing = [t for t in self.teachers if t not in sources]
        if missing:
            raise ConfigError(f"unknown teacher(s) {missing}: neither preset teachers ({', '.join(TEACHER_NAMES)}) "
                             "nor added with --teacher NAME=KIND:PATH_OR_ID")
        return {t: sources[t] for t in self.teachers}


# -- plan ---------------------------------------------------------------------------------------
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
        """Uncompressed bytes still to write (zstd saves ~15% on 16-bit features)."""
        total = 0
        for shard, names in self.todo.items():
            for name in names:
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
            lines.append(f"         {spec.provenance()}")  # revision + weights hash (issue 9)
        lines.append(f"estimated bytes to write: {self.estimated_bytes() / 1e6:.1f} MB (uncompressed)")
        return "\n".join(lines)


def count_samples(shard: CorpusShard, storage_options: dict | None = None) -> int:
    """Samples in a tar from its headers only (local files seek past the data)."""
    import fsspec

    keys, previous = 0, None
    with contextlib.suppress(tarfile.TarError, EOFError, OSError):
        with fsspec.open(shard.url, "rb", **(storage_options or {})) as raw, tarfile.open(fileobj=raw, mode="r:") as tar:
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
            counts = pool.map(lambda s: count_samples(s, config.corpus_storage_options), shards)
            samples = dict(zip([s.name for s in shards], counts))
    return Plan(specs=specs, shards=shards, todo=todo, done={n: len(c) for n, c in committed.items()},
                spec_status=status, samples=samples)


def plan_precompute(config: PrecomputeConfig) -> Plan:
    """`--dry-run`: load the teachers on this machine's CPU for their specs, then compare with the cache."""
    from .teachers import load_teacher

    shards = list_shards(config.corpus, config.corpus_storage_options)
    specs = {}
    for name, source in config.sources().items():
        spec = load_teacher(source, device="cpu").spec
        specs[name] = dataclasses.replace(spec, dtype=config.dtype)
    return make_plan(config, specs, shards)


# -- stage 1: CPU preprocessing ----------------------------------------------------------------
def _batch(keys, sha256s, errors, inputs, recipes) -> dict[str, Any]:
    arrays = {}
    for name, recipe in recipes.items():
        height, width = input_shape(recipe)
        arrays[name] = np.stack(inputs[name]) if inputs[name] else np.zeros((0, height, width, 3), np.uint8)
    return {"keys": list(keys), "sha256s": list(sha256s), "errors": list(errors), "inputs": arrays}


def preprocess_batches(
    url: str, recipes: dict[str, dict], batch_size: int, storage_options: dict | None = None
) -> Iterator[dict[str, Any]]:
    """Batches of one shard: keys, image sha256s, errors since the last batch, uint8 inputs per teacher.

    Always ends with one batch (maybe empty) carrying the trailing errors, so that
    for every shard: samples in the tar = sum of keys + sum of errors.
    """
    keys, sha256s, errors, inputs = [], [], [], {name: [] for name in recipes}
    seen: set[str] = set()
    for item in iter_samples(url, storage_options):
        # at this point: a whole sample's files, or a ReadFailure for a broken tar
        if isinstance(item, ReadFailure):
            errors.append((item.key, "read", item.reason))
            continue
        if item.key in seen:
            errors.append((item.key, "read", f"key {item.key!r} appears twice in {url}"))
            continue
        seen.add(item.key)
        data = item.image_bytes
        if data is None:
            errors.append((item.key, "decode", f"no image file in sample (has: {', '.join(sorted(item.files))})"))
            continue
        try:
            prepared = prepare_all(data, recipes)
        except ValueError as exc:  # undecodable, empty, too large: recorded, the job goes on
            errors.append((item.key, "decode", str(exc)))
            continue
        # at this point: one uint8 (H, W, 3) array per teacher
        keys.append(item.key)
        sha256s.append(sha256_hex(data))
        for name, array in prepared.items():
            inputs[name].append(array)
        if len(keys) == batch_size:
            yield _batch(keys, sha256s, errors, inputs, recipes)
            keys, sha256s, errors, inputs = [], [], [], {name: [] for name in recipes}
    yield _batch(keys, sha256s, errors, inputs, recipes)


def background_priority(nice: int) -> None:
    """CPU-only runs: tasks share the cores with the teachers' torch threads, so they yield to them.

    Sets this worker process's niceness (absolute, so repeated calls do not stack).
    Without it, a decode that lands on a core in the middle of a torch parallel
    region stalls all of torch's threads at the region's barrier.
    """
    if nice:
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, 0, nice)


def preprocess_shard(url, recipes, batch_size, storage_options, nice=0):
    """Ray streaming-generator task around `preprocess_batches`."""
    background_priority(nice)
    yield from preprocess_batches(url, recipes, batch_size, storage_options)


# -- stage 2: teacher actors -------------------------------------------------------------------
class TeacherWorker:
    """Holds the teachers (loaded once) on one device; turns uint8 batches into encoded targets."""

    def __init__(self, sources: list[TeacherSource], storage_dtype: str, compute_dtype: str, threads: int | None):
        import torch

        from .teachers import load_teacher

        if threads:
            torch.set_num_threads(threads)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = None if compute_dtype == "auto" else getattr(torch, compute_dtype)
        self.teachers = {s.name: load_teacher(s, device=self.device, dtype=dtype) for s in sources}
        self.storage_dtype = storage_dtype

    def specs(self) -> dict[str, dict]:
        return {n: dataclasses.replace(t.spec, dtype=self.storage_dtype).to_dict() for n, t in self.teachers.items()}

    def compute(self, batch: dict[str, Any], names: list[str]) -> tuple:
        """-> (one result dict per name, (images in the batch, seconds spent computing))."""
        import torch

        from .encode import encode_on_device

        start = time.perf_counter()
        results = []
        for name in names:
            images = torch.from_numpy(np.require(batch["inputs"][name], requirements="W"))  # store arrays are read-only
            if self.device == "cuda":
                images = images.pin_memory()
            targets, keys, sha256s, errors = drop_non_finite(name, self.teachers[name](images), batch)
            encoded = encode_on_device(targets, self.storage_dtype)
            results.append({"keys": keys, "sha256s": sha256s, "errors": errors,
                            "values": encoded.values, "scale": encoded.scale, "fidelity": encoded.fidelity})
        if self.device == "cuda":
            torch.cuda.synchronize()  # encode_on_device already waited; explicit for the timing
        return (*results, (len(batch["keys"]), time.perf_counter() - start))


def drop_non_finite(name: str, targets, batch: dict[str, Any]) -> tuple:
    """Rows with NaN/inf move from the batch to its errors (stage 'teacher'); never stored.

    int8 would turn them into plausible finite values, and a committed shard is never
    recomputed, so they are caught here, before encoding. -> (targets, keys, sha256s, errors)
    """
    finite = targets.flatten(1).isfinite().all(1)  # [B]
    if bool(finite.all()):  # a device sync, as the encoding's copy to the host is anyway
        return targets, batch["keys"], batch["sha256s"], batch["errors"]
    keep = finite.cpu().tolist()
    errors = list(batch["errors"]) + [(key, "teacher", f"teacher {name!r} returned NaN/inf for this image")
                                      for key, ok in zip(batch["keys"], keep) if not ok]
    keys = [k for k, ok in zip(batch["keys"], keep) if ok]
    sha256s = [h for h, ok in zip(batch["sha256s"], keep) if ok]
    return targets[finite], keys, sha256s, errors


# -- stage 3: writer ---------------------------------------------------------------------------
def write_shard_results(cache: TargetCache, teacher: str, shard: str, results: list[dict]) -> dict[str, Any]:
    """Concatenate a shard's batch results and commit them through `TargetCache.write_shard`."""
    from .encode import combine_fidelity

    spec = cache.spec(teacher)
    keys = [k for r in results for k in r["keys"]]
    sha256s = [h for r in results for h in r["sha256s"]]
    errors = [SampleError(key, stage, reason) for r in results for key, stage, reason in r["errors"]]
    empty = np.zeros((0, *spec.shape), quant.zarr_dtype(spec.dtype))
    values = np.concatenate([empty] + [r["values"] for r in results])
    scale = None
    fidelity = None
    if spec.dtype == "int8":
        scale = np.concatenate([np.zeros((0, spec.shape[0]), np.float32)] + [r["scale"] for r in results])
        fidelity = combine_fidelity([r["fidelity"] for r in results])
    commit = cache.write_shard(teacher, shard, keys, sha256s, values, scale=scale, errors=errors, fidelity=fidelity)
    return {"teacher": teacher, "shard": shard, "rows": commit.rows, "errors": commit.errors,
            "written": commit.written, "bytes": cache.root.size(teacher, shard)}


def write_shard_task(cache_url, storage_options, teacher, shard, nice, *results):
    """Ray task around `write_shard_results` (its arguments arrive resolved from the object store)."""
    background_priority(nice)
    return write_shard_results(TargetCache(cache_url, storage_options), teacher, shard, list(results))


# -- the driver --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Summary:
    shards: int
    """Corpus shards."""
    committed: int
    """(teacher, shard) pairs committed by this run."""
    skipped: int
    """(teacher, shard) pairs that were already committed."""
    samples: int
    """Target rows written by this run (all teachers)."""
    errors: int
    """Error rows recorded by this run (all teachers)."""
    bytes: int
    """Bytes written by this run."""
    images: int
    """Images pushed through the teachers."""
    seconds: float
    """Wall time from the first batch to the last commit (excludes Ray start and model loading)."""
    fidelity: dict[str, float] | None = None
    """int8 only: worst shard's cosine_min and max_rel_error."""
    teacher_seconds: float = 0.0
    """Seconds the actors spent in teacher forward + encode, summed over actors."""
    actors: int = 1
    """Teacher actors of the run."""

    @property
    def teacher_busy(self) -> float:
        """Share of the run's wall time the actors spent computing (1.0 = never waiting for input)."""
        return self.teacher_seconds / (self.seconds * self.actors) if self.seconds > 0 else 0.0

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def describe(self) -> str:
        text = (f"{self.shards} shards: {self.committed} (teacher, shard) committed, {self.skipped} already done; "
                f"{self.samples} targets, {self.errors} errors, {self.bytes / 1e6:.1f} MB in {self.seconds:.1f} s "
                f"({self.images_per_second:.1f} images/s, teachers busy {self.teacher_busy:.0%})")
        if self.fidelity:
            text += f"; int8 cosine_min {self.fidelity['cosine_min']:.5f}, max_rel_error {self.fidelity['max_rel_error']:.4f}"
        return text


@contextlib.contextmanager
def ray_session(address: str | None):
    """Join `address`, reuse this process's Ray, or start a local one (and stop it afterwards)."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # silences the token warning of local clusters
    import ray

    if ray.is_initialized():
        yield ray
        return
    ray.init(address=address, include_dashboard=False, logging_level="ERROR", log_to_driver=True)
    try:
        yield ray
    finally:
        ray.shutdown()


class ActorPool:
    """Least-busy choice among the teacher actors; deterministic ties (lowest index)."""

    def __init__(self, actors: list):
        self.actors = actors
        self.pending = [0] * len(actors)
        self.lock = threading.Lock()

    def acquire(self) -> int:
        with self.lock:
            index = min(range(len(self.actors)), key=lambda i: (self.pending[i], i))
            self.pending[index] += 1
            return index

    def release(self, index: int) -> None:
        with self.lock:
            self.pending[index] -= 1


def _start_actors(ray, config: PrecomputeConfig, sources: dict[str, TeacherSource]) -> tuple[list, float]:
    """Teacher actors (one GPU each, or a fractional CPU) and the CPU share of the tasks beside them."""
    gpus = int(ray.cluster_resources().get("GPU", 0)) if config.num_gpus is None else config.num_gpus
    actors = config.actors or max(1, gpus)
    if gpus and actors > gpus:  # the extra actors would wait for a GPU forever
        raise ConfigError(f"--actors {actors} needs {actors} GPUs, {gpus} available (one GPU per actor)")
    if gpus:
        options = {"num_gpus": 1, "num_cpus": 1}
        threads = config.cpu_threads
        task_cpus = 1.0
    else:
        options = {"num_gpus": 0, "num_cpus": CPU_ACTOR_CPUS}
        threads = config.cpu_threads or max(1, int(ray.cluster_resources().get("CPU", 1)) // actors)
        task_cpus = CPU_TASK_CPUS
    worker_cls = ray.remote(TeacherWorker)
    workers = [
        worker_cls.options(**options).remote(list(sources.values()), config.dtype, config.compute_dtype, threads)
        for _ in range(actors)
    ]
    return workers, task_cpus


def precompute(config: PrecomputeConfig) -> Summary:
    """Run the job (see the module docstring). Raises CorpusError / SpecMismatchError / ValueError on bad input."""
    shards = list_shards(config.corpus, config.corpus_storage_options)  # empty or missing corpus fails here
    cache = TargetCache(config.cache, config.storage_options)
    sources = config.sources()
    with ray_session(config.address) as ray:
        workers, task_cpus = _start_actors(ray, config, sources)
        try:
            return _register_and_run(ray, config, cache, shards, workers, task_cpus)
        finally:
            for worker in workers:  # a reused Ray session (tests, notebooks) must not keep our actors
                ray.kill(worker)


def _register_and_run(ray, config, cache, shards, workers, task_cpus) -> Summary:
    all_specs = ray.get([w.specs.remote() for w in workers])  # also waits for every actor to load
    specs = {name: TeacherSpec.from_dict(d) for name, d in all_specs[0].items()}
    for other in all_specs[1:]:
        if {n: TeacherSpec.from_dict(d).fingerprint for n, d in other.items()} != {n: s.fingerprint for n, s in specs.items()}:
            raise RuntimeError("teacher actors disagree on the teacher specs (different weights on different nodes?)")
    for spec in specs.values():
        cache.register(spec, overwrite=config.overwrite)  # refuses a different spec unless overwrite
        cache.clean_staging(spec.name)  # leftovers of killed runs; no writer of ours runs yet
    # counting remote tars costs a range request per member: the progress bar then shows no ETA
    local_corpus = all("://" not in s.url or s.url.startswith("file://") for s in shards)
    plan = make_plan(config, specs, shards, count=local_corpus)
    return _run(ray, config, plan, workers, task_cpus)


def _run(ray, config: PrecomputeConfig, plan: Plan, workers: list, task_cpus: float) -> Summary:
    pool = ActorPool(workers)
    nice = CPU_TASK_NICE if task_cpus < 1 else 0  # fractional CPUs = no GPU: the tasks share cores with torch
    recipes = {name: spec.preprocess for name, spec in plan.specs.items()}
    preprocess = ray.remote(preprocess_shard).options(num_cpus=task_cpus, num_returns="streaming")
    writer = ray.remote(write_shard_task).options(num_cpus=task_cpus)
    skipped = sum(len(plan.specs) - len(plan.todo.get(s.name, ())) for s in plan.shards)
    lock = threading.Lock()
    totals = {"images": 0, "teacher_seconds": 0.0, "commits": []}

    progress, task = _progress(config, sum(plan.samples.get(s, 0) for s in plan.todo))

    def run_shard(shard: CorpusShard) -> list[dict]:
        names = list(plan.todo[shard.name])
        generator = preprocess.remote(shard.url, {n: recipes[n] for n in names}, config.batch_size,
                                      config.corpus_storage_options, nice)
        results: dict[str, list] = {n: [] for n in names}
        pending: list[tuple[int, Any]] = []

        def settle(entry) -> None:
            index, count_ref = entry
            count, busy = ray.get(count_ref)
            pool.release(index)
            with lock:
                totals["images"] += count
                totals["teacher_seconds"] += busy
            if progress is not None:
                progress.advance(task, count)

        for batch_ref in generator:
            index = pool.acquire()
            refs = workers[index].compute.options(num_returns=len(names) + 1).remote(batch_ref, names)
            for name, ref in zip(names, refs[:-1]):
                results[name].append(ref)
            pending.append((index, refs[-1]))
            while len(pending) > MAX_PENDING_BATCHES:
                settle(pending.pop(0))
        while pending:
            settle(pending.pop(0))
        cache_url = config.cache
        return ray.get([writer.remote(cache_url, config.storage_options, n, shard.name, nice, *results[n]) for n in names])

    start = time.perf_counter()
    todo_shards = [s for s in plan.shards if s.name in plan.todo]
    in_flight = config.shards_in_flight or 2 * len(workers) + 1
    threads = ThreadPoolExecutor(max(1, in_flight))
    with progress or contextlib.nullcontext():
        futures = [threads.submit(run_shard, shard) for shard in todo_shards]
        try:
            for future in futures:  # in shard order; the first failure stops the job
                totals["commits"].extend(future.result())
        finally:
            threads.shutdown(wait=True, cancel_futures=True)  # shards not started yet are dropped
    seconds = time.perf_counter() - start
    commits = totals["commits"]
    fidelity = None
    if config.dtype == "int8" and commits:
        cache = TargetCache(config.cache, config.storage_options)
        infos = [cache.commit_info(c["teacher"], c["shard"])["fidelity"] for c in commits]
        infos = [i for i in infos if i]
        if infos:
            fidelity = {"cosine_min": min(i["cosine_min"] for i in infos),
                        "max_rel_error": max(i["max_rel_error"] for i in infos)}
    return Summary(
        shards=len(plan.shards), committed=len(commits), skipped=skipped,
        samples=sum(c["rows"] for c in commits), errors=sum(c["errors"] for c in commits),
        bytes=sum(c["bytes"] for c in commits), images=totals["images"], seconds=seconds, fidelity=fidelity,
        teacher_seconds=totals["teacher_seconds"], actors=len(workers),
    )


def _progress(config: PrecomputeConfig, total: int):
    if not config.progress:
        return None, None
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class ImagesPerSecond(ProgressColumn):
        def render(self, task) -> Text:
            return Text(f"{task.speed or 0:.1f} images/s")

    progress = Progress(TextColumn("precompute"), BarColumn(), MofNCompleteColumn(), ImagesPerSecond(),
                        TextColumn("ETA"), TimeRemainingColumn(), console=Console(stderr=True))
    return progress, progress.add_task("images", total=total or None)
