"""The three stages of the precompute job, in the order a batch goes through them.

    1. preprocess_shard  CPU task, streaming generator: tar -> decode -> resize -> uint8 batches
    2. TeacherWorker     actor (one GPU each where GPUs exist): normalise, forward, encode
    3. write_shard_task  CPU task: the shard's results -> `TargetCache.write_shard` (atomic commit)

Each stage runs without Ray (tests and `ola bench` call them directly); precompute.py wraps them
with `ray.remote`. Design choice: actors receive uint8 arrays and never touch a tar or a JPEG, and
compression and writing happen in the writer task, off the actor's critical path. Cost: a batch
crosses the object store twice (inputs to the actor, encoded targets to the writer).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from olavlm.schemas import quant
from olavlm.schemas.cache import SampleError, TargetCache
from olavlm.schemas.corpus import ReadFailure, iter_samples, sha256_hex
from olavlm.schemas.manifest import NO_IMAGE

from .preprocess import device_prepare, input_shape, prepare_all, resizes_on_device
from .presets import TeacherSource
from .sources import TeacherLoadError


# -- stage 1: CPU preprocessing ----------------------------------------------------------------
def _batch(keys, sha256s, errors, inputs, recipes) -> dict[str, Any]:
    arrays = {}
    for name, recipe in recipes.items():
        if resizes_on_device(recipe):  # decoded images of any sizes: the actor resizes, then stacks
            arrays[name] = list(inputs[name])
            continue
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
            errors.append((item.key, "decode", f"{NO_IMAGE} (has: {', '.join(sorted(item.files))})"))
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
    """CPU-only runs: set this worker's niceness (absolute: calls do not stack) so tasks yield to the
    teachers' torch threads; a decode landing mid parallel region would stall them all at its barrier."""
    if nice:
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, 0, nice)


def preprocess_shard(url, recipes, batch_size, storage_options, nice=0):
    """Ray streaming-generator task around `preprocess_batches`."""
    background_priority(nice)
    yield from preprocess_batches(url, recipes, batch_size, storage_options)


# -- stage 2: teacher actors -------------------------------------------------------------------
TEST_CRASH_ON_KEY = "OLAVLM_TEST_CRASH_ON_KEY"
"""Test-only hook (tests/test_ray_restarts.py): 'KEY=MARKER_FILE' in an actor's environment makes
the first actor whose batch holds KEY create MARKER_FILE and exit at once, as a crashed process
would; the marker makes it happen once, so the restarted actor computes the retried batch."""


def _crash_if_asked(keys: list[str]) -> None:
    key, _, marker = os.environ.get(TEST_CRASH_ON_KEY, "").partition("=")
    if key and key in keys:
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL))  # atomic: one crash over all actors
        except FileExistsError:
            return
        os._exit(13)


class TeacherWorker:
    """Holds the teachers (loaded once) on one device; turns uint8 batches into encoded targets."""

    def __init__(
        self,
        sources: list[TeacherSource],
        storage_dtype: str,
        compute_dtype: str,
        threads: int | None,
        speed: dict[str, str] | None = None,
        concurrency: int = 1,
    ):
        """`speed`: `teachers.speed_up`'s levers (swin_attention, compile); `concurrency`: the actor's
        max_concurrency (above 1 each calling thread gets its own CUDA stream, so that calls overlap)."""
        import torch

        from .teachers import load_teacher

        if threads:
            torch.set_num_threads(threads)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = None if compute_dtype == "auto" else getattr(torch, compute_dtype)
        self.load_error: TeacherLoadError | None = None
        try:
            self.teachers = {
                s.name: load_teacher(s, device=self.device, dtype=dtype, **(speed or {})) for s in sources
            }
        except (
            TeacherLoadError
        ) as exc:  # kept for `specs`: raised in __init__, Ray keeps only a traceback text
            self.teachers, self.load_error = {}, exc
        self.storage_dtype = storage_dtype
        self.streams = {} if concurrency > 1 and self.device == "cuda" else None

    def specs(self) -> dict[str, dict]:
        if self.load_error is not None:
            raise self.load_error
        return {
            n: dataclasses.replace(t.spec, dtype=self.storage_dtype).to_dict()
            for n, t in self.teachers.items()
        }

    def stream(self):
        """This calling thread's CUDA stream as a context (concurrent actors), else a no-op context."""
        if self.streams is None:
            return contextlib.nullcontext()
        import torch

        thread = threading.get_ident()
        if thread not in self.streams:  # only this thread writes its key
            self.streams[thread] = torch.cuda.Stream()
        return torch.cuda.stream(self.streams[thread])

    def compute(self, batch: dict[str, Any], names: list[str]) -> tuple:
        with self.stream():
            return self.compute_batch(batch, names)

    def compute_batch(self, batch: dict[str, Any], names: list[str]) -> tuple:
        """-> (one result dict per name, (images in the batch, samples preprocessing refused, seconds
        spent computing)); the refused ones are counted here once, whatever the number of teachers."""
        import torch

        from .encode import encode_on_device

        _crash_if_asked(batch["keys"])
        start = time.perf_counter()
        results = []
        for name in names:
            recipe = self.teachers[name].spec.preprocess
            if resizes_on_device(recipe):  # --device-resize: a list of decoded images, resized here
                images = device_prepare(batch["inputs"][name], recipe, self.device)
            else:
                images = torch.from_numpy(
                    np.require(batch["inputs"][name], requirements="W")
                )  # store arrays are read-only
                if self.device == "cuda":
                    images = images.pin_memory()
            targets, keys, sha256s, errors = drop_non_finite(name, self.teachers[name](images), batch)
            encoded = encode_on_device(targets, self.storage_dtype)
            results.append(
                {
                    "keys": keys,
                    "sha256s": sha256s,
                    "errors": errors,
                    "values": encoded.values,
                    "scale": encoded.scale,
                    "fidelity": encoded.fidelity,
                }
            )
        if self.device == "cuda":
            torch.cuda.current_stream().synchronize()  # encode_on_device waited; explicit for the timing
        return (*results, (len(batch["keys"]), len(batch["errors"]), time.perf_counter() - start))


def drop_non_finite(name: str, targets, batch: dict[str, Any]) -> tuple:
    """Rows with NaN/inf move from the batch to its errors (stage 'teacher'); never stored.

    int8 would turn them into plausible finite values, and a committed shard is never
    recomputed, so they are caught here, before encoding. -> (targets, keys, sha256s, errors)
    """
    finite = targets.flatten(1).isfinite().all(1)  # [B]
    if bool(finite.all()):  # a device sync, as the encoding's copy to the host is anyway
        return targets, batch["keys"], batch["sha256s"], batch["errors"]
    keep = finite.cpu().tolist()
    errors = list(batch["errors"]) + [
        (key, "teacher", f"teacher {name!r} returned NaN/inf for this image")
        for key, ok in zip(batch["keys"], keep)
        if not ok
    ]
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
    commit = cache.write_shard(
        teacher, shard, keys, sha256s, values, scale=scale, errors=errors, fidelity=fidelity
    )
    return {
        "teacher": teacher,
        "shard": shard,
        "rows": commit.rows,
        "errors": commit.errors,
        "written": commit.written,
        "bytes": cache.root.size(teacher, shard),
    }


def write_shard_task(cache_url, storage_options, teacher, shard, nice, *results):
    """Ray task around `write_shard_results` (its arguments arrive resolved from the object store)."""
    background_priority(nice)
    return write_shard_results(TargetCache(cache_url, storage_options), teacher, shard, list(results))
