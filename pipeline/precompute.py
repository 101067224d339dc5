"""`ola precompute CORPUS CACHE`: teacher targets for every image of a corpus, as one Ray job.

This module is the driver, `precompute(PrecomputeConfig) -> Summary`; the job's options, plan,
stages and progress live beside it (pipeline/README.md), and its public names are in `__all__`.

Design choice: Ray core, not Ray Data, so the corpus shard stays the unit of work and of commit
(Ray Data re-blocks rows across files). One driver thread per shard in flight submits the shard's
batches to the least-busy actor; batches never cross shards, so a rerun computes bit-identical
targets, and every step is idempotent, so Ray's retries never duplicate or half-write a shard.
Resume is per (teacher, shard). Cost: a shard's whole output sits in the object store until its
writer runs, and the last batch of a shard is usually short. Without `--address` the job starts
a fresh local Ray and never joins RAY_ADDRESS or a cluster registered by `ray start`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from olavlm.schemas.cache import TargetCache
from olavlm.schemas.corpus import CorpusShard, list_shards
from olavlm.schemas.errors import ConfigError
from olavlm.schemas.keyindex import open_index
from olavlm.schemas.spec import TeacherSpec
from olavlm.schemas.storage import Root

from .config import COMPUTE_DTYPES, PrecomputeConfig
from .plan import Plan, make_plan, plan_precompute
from .presets import TeacherSource
from .progress import Summary, progress_bar
from .sources import TeacherLoadError
from .stages import TeacherWorker, drop_non_finite, preprocess_batches, preprocess_shard, write_shard_task

__all__ = [
    "COMPUTE_DTYPES",
    "Plan",
    "PrecomputeConfig",
    "Summary",
    "check_cache_reachable",
    "default_shards_in_flight",
    "drop_non_finite",
    "plan_precompute",
    "precompute",
    "preprocess_batches",
    "ray_session",
]

MAX_PENDING_BATCHES = 2
"""Batches of one shard queued at the actors before its driver thread waits (bounds memory)."""
CPU_ACTOR_CPUS = 0.5
"""Logical CPUs of a CPU-only teacher actor: fractional, else 2 actors on 2 CPUs starve the tasks."""
CPU_TASK_CPUS = 0.25
"""Logical CPUs of a preprocess or writer task when no GPU is used (they share the cores with torch)."""
CPU_TASK_NICE = 10
"""Niceness of preprocess and writer tasks in CPU-only runs (see `stages.background_priority`)."""


@contextlib.contextmanager
def ray_session(address: str | None, runtime_env: dict | None = None):
    """Join `address`, reuse this process's Ray, or start a fresh local one (and stop it afterwards).

    address None -> `address="local"`: never RAY_ADDRESS or a cluster registered by `ray start`.
    `runtime_env` (working_dir, pip, env_vars, ...) goes to ray.init as the job's runtime env.
    """
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # silences the token warning of local clusters
    import ray

    if ray.is_initialized():
        yield ray
        return
    ray.init(
        address=address or "local",
        runtime_env=runtime_env or None,
        include_dashboard=False,
        logging_level="ERROR",
        log_to_driver=True,
    )
    try:
        yield ray
    finally:
        ray.shutdown()


def is_local_path(url: str) -> bool:
    """A path on this machine's disk (a plain path or file://), as opposed to an object store or other remote fs."""
    return "://" not in str(url) or str(url).startswith("file://")


def check_cache_reachable(cache_url: str, nodes: list[dict]) -> None:
    """Refuse a local cache path on a cluster of more than one alive node (`ray.nodes()` entries).

    Writers run on any node, so each would write its shards to its own disk: a cache scattered over the
    nodes, each part unusable alone. Cost: a folder that every node mounts (NFS) is refused too.
    """
    alive = [n for n in nodes if n.get("Alive")]
    if len(alive) > 1 and is_local_path(cache_url):
        raise ConfigError(
            f"cache {cache_url!r} is a local path, but the Ray cluster has {len(alive)} nodes: each node's writers "
            "would write to their own disk. Give an object-store URL that every node reaches, e.g. "
            "s3://bucket/prefix (with --storage-options for its endpoint and credentials)."
        )


def probe_cache_write(cache_url: str, storage_options: dict, name: str, token: str) -> str | None:
    """On a cluster node: read the probe file the driver wrote at the cache root, write one of its own,
    delete both. None if all worked, else where and why not."""
    import socket

    where = f"node {socket.gethostname()}"
    try:
        root = Root(cache_url, storage_options)
        try:
            seen = root.read_json(name)
        except FileNotFoundError:
            return f"{where} does not see {root.url_of(name)}, which the driver wrote: another disk"
        if seen.get("token") != token:
            return f"{where} reads another {root.url_of(name)} than the driver wrote"
        own = f"{name}.{socket.gethostname()}"
        root.write_json({"token": token}, own)
        root.rm(own)
        root.rm(name)
    except Exception as exc:  # any failure is the answer: permissions, endpoint, credentials, ...
        return f"{where}: {type(exc).__name__}: {exc}"
    return None


def check_cache_writable(ray, cache_url: str, storage_options: dict) -> None:
    """The driver (which writes cache.json) and a Ray task (as the shard writers) must reach the same
    cache: checked before any teacher loads, so a wrong path fails in seconds, not after the teachers ran."""
    root = Root(cache_url, storage_options)
    name, token = f".olavlm-probe-{uuid.uuid4().hex[:12]}.json", uuid.uuid4().hex
    try:
        root.write_json({"token": token}, name)
    except OSError as exc:
        raise ConfigError(f"cache {cache_url!r} is not writable from this machine: {exc}") from None
    try:
        probe = ray.remote(probe_cache_write).options(num_cpus=CPU_TASK_CPUS, max_retries=0)
        problem = ray.get(probe.remote(cache_url, storage_options, name, token))
    finally:
        root.rm(name)
    if problem:
        raise ConfigError(
            f"cache {cache_url!r} is not writable from the Ray cluster as this machine sees it ({problem}): "
            "give a cache that this machine and every node reach (an object-store URL with "
            "--storage-options, or an absolute path on a shared disk)"
        )


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
    # restarted actors reload their teachers; their lost batches are retried (pure functions of the batch)
    options.update(max_restarts=config.max_restarts, max_task_retries=config.max_retries)
    worker_cls = ray.remote(TeacherWorker)
    workers = [
        worker_cls.options(**options, max_concurrency=config.actor_concurrency).remote(
            list(sources.values()),
            config.dtype,
            config.compute_dtype,
            threads,
            {"swin_attention": config.swin_attention, "compile": config.compile},
            config.actor_concurrency,
        )
        for _ in range(actors)
    ]
    return workers, task_cpus


def default_shards_in_flight(actors: int, resources: dict, *, gpus: bool, shard_bytes: int = 0) -> int:
    """Shards preprocessed at once when --shards-in-flight is not given (`resources`: Ray's cluster resources).

    Without GPUs 2 x actors + 1: the tasks share the cores with torch. With GPUs one shard per CPU the
    actors leave, so host decoding grows with the node; capped where the shards' targets, each waiting in
    the object store for its writer (`shard_bytes` uncompressed), would fill more than half of it.
    Never fewer than 2 x actors + 1.
    """
    floor = 2 * actors + 1
    if not gpus:
        return floor
    wanted = int(resources.get("CPU", 0)) - actors
    store = resources.get("object_store_memory", 0)
    if shard_bytes and store:
        wanted = min(wanted, int(store / 2 // shard_bytes))
    return max(floor, wanted)


def precompute(config: PrecomputeConfig) -> Summary:
    """Run the job (see the module docstring). Raises CorpusError / SpecMismatchError / ValueError on bad input."""
    if "://" not in config.cache:  # the cluster's tasks resolve a relative path against their own folder
        config = dataclasses.replace(config, cache=os.path.abspath(config.cache))
    shards = list_shards(config.corpus, config.corpus_options)  # empty or missing corpus fails here
    cache = TargetCache(config.cache, config.storage_options)
    sources = config.sources()
    with ray_session(config.address, config.runtime_env) as ray:
        check_cache_reachable(config.cache, ray.nodes())
        check_cache_writable(ray, config.cache, config.storage_options)  # before the teachers load
        workers, task_cpus = _start_actors(ray, config, sources)
        try:
            summary = _register_and_run(ray, config, cache, shards, workers, task_cpus)
        finally:
            for worker in workers:  # a reused Ray session (tests, notebooks) must not keep our actors
                ray.kill(worker)
    build_key_indexes(cache, list(sources))
    return summary


def build_key_indexes(cache: TargetCache, teachers: list[str]) -> None:
    """Build the key index (schemas/keyindex.py) of each teacher of the run, once, after the last commit,
    so a keyed training run only opens it. Local caches only: an object-store cache's index lives on the
    reading machine's disk, where its trainers (or `ola cache index`) build it."""
    if cache.root.is_local:
        for teacher in teachers:
            open_index(cache, teacher)


def keep_stored_codec(spec: TeacherSpec, stored: TeacherSpec | None) -> TeacherSpec:
    """A cache goes on with the codec it was started with: a spec that differs from the stored one *only*
    in its codec takes the stored codec, so resuming neither refuses the run nor mixes codecs. Any other
    difference is left for `register` to refuse."""
    if stored is None or stored.fingerprint == spec.fingerprint:
        return spec
    adopted = dataclasses.replace(spec, codec=stored.storage_codec)
    return adopted if adopted.fingerprint == stored.fingerprint else spec


def _register_and_run(ray, config, cache, shards, workers, task_cpus) -> Summary:
    try:
        all_specs = ray.get([w.specs.remote() for w in workers])  # also waits for every actor to load
    except TeacherLoadError as exc:  # Ray's copy carries the actor's traceback: keep the one line
        raise TeacherLoadError(str(getattr(exc, "cause", None) or exc)) from None
    specs = {name: TeacherSpec.from_dict(d) for name, d in all_specs[0].items()}
    for other in all_specs[1:]:
        if {n: TeacherSpec.from_dict(d).fingerprint for n, d in other.items()} != {
            n: s.fingerprint for n, s in specs.items()
        }:
            raise RuntimeError(
                "teacher actors disagree on the teacher specs (different weights on different nodes?)"
            )
    stored = cache.specs()
    specs = {name: keep_stored_codec(spec, stored.get(name)) for name, spec in specs.items()}
    for spec in specs.values():
        cache.register(spec, overwrite=config.overwrite)  # refuses a different spec unless overwrite
        cache.clean_staging(spec.name)  # leftovers of killed runs; no writer of ours runs yet
    # counting remote tars costs a range request per member: the progress bar then shows no ETA
    local_corpus = all(is_local_path(s.url) for s in shards)
    plan = make_plan(config, specs, shards, count=local_corpus)
    return _run(ray, config, plan, workers, task_cpus)


def _run(ray, config: PrecomputeConfig, plan: Plan, workers: list, task_cpus: float) -> Summary:
    pool = ActorPool(workers)
    nice = CPU_TASK_NICE if task_cpus < 1 else 0  # fractional CPUs = no GPU: the tasks share cores with torch
    recipes = {name: spec.preprocess for name, spec in plan.specs.items()}
    preprocess = ray.remote(preprocess_shard).options(
        num_cpus=task_cpus, num_returns="streaming", max_retries=config.max_retries
    )
    writer = ray.remote(write_shard_task).options(num_cpus=task_cpus, max_retries=config.max_retries)
    skipped = sum(len(plan.specs) - len(plan.todo.get(s.name, ())) for s in plan.shards)
    lock = threading.Lock()
    totals = {"images": 0, "unusable": 0, "teacher_seconds": 0.0, "commits": []}

    progress, task = progress_bar(config.progress, sum(plan.samples.get(s, 0) for s in plan.todo))

    def run_shard(shard: CorpusShard) -> list[dict]:
        names = list(plan.todo[shard.name])
        generator = preprocess.remote(
            shard.url, {n: recipes[n] for n in names}, config.batch_size, config.corpus_options, nice
        )
        results: dict[str, list] = {n: [] for n in names}
        pending: list[tuple[int, Any]] = []

        def settle(entry) -> None:
            index, count_ref = entry
            count, unusable, busy = ray.get(count_ref)
            pool.release(index)
            with lock:
                totals["images"] += count
                totals["unusable"] += unusable
                totals["teacher_seconds"] += busy
            if progress is not None:  # the plan counts every sample: those without an image finish too
                progress.advance(task, count + unusable)

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
        return ray.get(
            [
                writer.remote(cache_url, config.storage_options, n, shard.name, nice, *results[n])
                for n in names
            ]
        )

    start = time.perf_counter()
    todo_shards = [s for s in plan.shards if s.name in plan.todo]
    in_flight = config.shards_in_flight or default_shards_in_flight(
        len(workers),
        ray.cluster_resources(),
        gpus=task_cpus >= 1,  # a whole CPU per task = the actors run on GPUs
        shard_bytes=max((plan.shard_bytes(s.name) for s in todo_shards), default=0),
    )
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
            fidelity = {
                "cosine_min": min(i["cosine_min"] for i in infos),
                "max_rel_error": max(i["max_rel_error"] for i in infos),
            }
    return Summary(
        shards=len(plan.shards),
        committed=len(commits),
        skipped=skipped,
        samples=sum(c["rows"] for c in commits),
        errors=sum(c["errors"] for c in commits),
        bytes=sum(c["bytes"] for c in commits),
        images=totals["images"],
        seconds=seconds,
        fidelity=fidelity,
        teacher_seconds=totals["teacher_seconds"],
        unusable_samples=totals["unusable"],
        actors=len(workers),
        shards_in_flight=in_flight,
    )
