"""SIGKILL the precompute job at random moments: no partial shard is ever committed and the rerun
completes to a cache equal to an uninterrupted run's.

The job runs as `ola precompute` in its own process group and joins this
module's Ray instance (`--address`), as a job on a cluster does; the kill takes
the whole driver process group down, and Ray then kills the job's actors and
tasks, writers included, wherever they are.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time

import numpy as np
import pytest

from olavlm.schemas.cache import TargetCache
from olavlm.schemas.inspect import verify_cache
from tests._precompute_data import build_corpus, cli_command, local_ray, read_cache

TEACHERS = ("depth", "gen")
TRIALS = 5
SHARDS, PER_SHARD = 6, 8


ray_local = pytest.fixture(scope="module")(local_ray)


@pytest.fixture(scope="module")
def ray_address(ray_local):
    return ray_local.get_runtime_context().gcs_address


def job(corpus, cache, address) -> list[str]:
    return cli_command(
        "precompute",
        str(corpus),
        str(cache),
        "--preset",
        "tiny",
        "--teachers",
        ",".join(TEACHERS),
        "--batch-size",
        "4",
        "--address",
        address,
        "--no-progress",
    )


def wait_for(process: subprocess.Popen, ready, timeout: float = 120) -> None:
    start = time.monotonic()
    while not ready():
        assert process.poll() in (None, 0), f"job failed with exit code {process.returncode}"
        assert time.monotonic() - start < timeout, "job did not get there"
        time.sleep(0.02)


def commits(cache_root) -> list:
    return list(cache_root.glob("*/*/commit.json"))


def run_to_end(argv, cache_root) -> None:
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(process, (cache_root / "cache.json").exists)  # actors loaded: the shards start now
    _, stderr = process.communicate(timeout=240)
    assert process.returncode == 0, stderr[-3000:]


def assert_committed_shards_are_whole(cache_root, reference: dict[str, dict[str, np.ndarray]]) -> int:
    """Every committed (teacher, shard) holds exactly the reference rows; returns how many are committed."""
    cache = TargetCache(cache_root)
    committed = 0
    for teacher in cache.teachers():
        stored = read_cache(cache_root, teacher)
        for shard in cache.committed_shards(teacher):
            committed += 1
            keys = cache.open_shard(teacher, shard).keys
            assert keys == sorted(k for k in reference[teacher] if k.startswith(f"s{int(shard[-6:])}-"))
            for key in keys:
                np.testing.assert_array_equal(stored[key], reference[teacher][key])
    return committed


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_sigkill_at_random_moments_then_rerun_equals_uninterrupted(ray_address, tmp_path):
    corpus = tmp_path / "corpus"
    build_corpus(corpus, shards=SHARDS, per_shard=PER_SHARD)
    uninterrupted = tmp_path / "reference"
    run_to_end(job(corpus, uninterrupted, ray_address), uninterrupted)
    reference = {t: read_cache(uninterrupted, t) for t in TEACHERS}
    assert all(len(v) == SHARDS * PER_SHARD for v in reference.values())

    registered = os.path.getmtime(uninterrupted / "cache.json")
    stamps = sorted(os.path.getmtime(p) for p in commits(uninterrupted))
    window = stamps[-1] - stamps[0]  # from the first commit to the last

    # even trials: a moment of the whole shard phase; odd trials: a moment between the first and last commit
    rng = random.Random(20241209)
    plan = [
        ("phase", rng.uniform(0.0, 0.9) * (stamps[-1] - registered))
        if t % 2 == 0
        else ("commits", rng.uniform(0.0, 0.8) * window)
        for t in range(TRIALS)
    ]
    assert len({round(m, 2) for _, m in plan}) == TRIALS
    seen_partial = 0
    for trial, (anchor, moment) in enumerate(plan):
        cache_root = tmp_path / f"killed-{trial}"
        process = subprocess.Popen(
            job(corpus, cache_root, ray_address),
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(
            process,
            (cache_root / "cache.json").exists
            if anchor == "phase"
            else lambda root=cache_root: commits(root),
        )
        time.sleep(moment)
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)  # the job's process group, as `kill -9 -PGID`
        process.wait(timeout=60)
        committed = assert_committed_shards_are_whole(cache_root, reference)
        seen_partial += 0 < committed < len(TEACHERS) * SHARDS
        print(f"trial {trial}: killed {moment:.2f} s after {anchor} began, {committed} committed")
        run_to_end(job(corpus, cache_root, ray_address), cache_root)
        for teacher in TEACHERS:
            stored = read_cache(cache_root, teacher)
            assert sorted(stored) == sorted(reference[teacher])
            for key, value in reference[teacher].items():
                np.testing.assert_array_equal(stored[key], value)
        assert verify_cache(TargetCache(cache_root)).ok
        staging = [p for t in TEACHERS for p in (cache_root / t / ".staging").glob("*")]
        assert staging == [], staging
    print(f"{seen_partial} of {TRIALS} kills left some but not all shards committed")
    assert seen_partial >= 1  # at least one kill landed between commits
