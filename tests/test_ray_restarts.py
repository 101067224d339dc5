"""A teacher actor dies in the middle of `ola precompute` (os._exit when its batch holds a chosen key,
through the test-only hook in pipeline/stages.py, switched on with `--runtime-env` env_vars): Ray
restarts it (`max_restarts`) and retries the batch it lost (`max_retries`), and the cache equals an
uninterrupted run's, bit for bit. With `--max-restarts 0` the same crash fails the job, so the
restart is what saves it. The uninterrupted reference runs in this process on the module's local Ray;
the crashing jobs are `ola precompute` processes joining that Ray with `--address`, each with its own
runtime env (a job's env_vars reach only that job's workers)."""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest

from olavlm.pipeline.precompute import PrecomputeConfig
from olavlm.pipeline.precompute import precompute as run_in_process
from olavlm.pipeline.stages import TEST_CRASH_ON_KEY
from olavlm.schemas.cache import TargetCache
from tests._precompute_data import build_corpus, cli_command, local_ray, read_cache

TEACHERS = ("depth", "gen")
CRASH_KEY = "s1-002"
"""A key in the middle of the job: shard 1 of 3 (3 samples each), in its second batch (batch size 2)."""

ray_local = pytest.fixture(scope="module")(local_ray)


def precompute(ray, corpus, cache, *options: str) -> subprocess.CompletedProcess:
    """`ola precompute` in its own process, joining this process's Ray."""
    argv = cli_command(
        "precompute",
        str(corpus),
        str(cache),
        "--preset",
        "tiny",
        "--teachers",
        ",".join(TEACHERS),
        "--batch-size",
        "2",
        "--json",
        "--no-progress",
        "--address",
        ray.get_runtime_context().gcs_address,
        *options,
    )
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(argv, capture_output=True, text=True, timeout=400, env=env)


def crash_once(marker) -> tuple[str, str]:
    return "--runtime-env", json.dumps({"env_vars": {TEST_CRASH_ON_KEY: f"{CRASH_KEY}={marker}"}})


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_a_killed_actor_is_restarted_and_the_cache_equals_an_uninterrupted_run(ray_local, tmp_path):
    corpus = tmp_path / "corpus"
    keys = build_corpus(corpus, shards=3, per_shard=3)
    assert CRASH_KEY in keys
    reference = run_in_process(
        PrecomputeConfig(
            corpus=str(corpus),
            cache=str(tmp_path / "reference"),
            preset="tiny",
            teachers=TEACHERS,
            batch_size=2,
            progress=False,
        )
    )
    assert reference.committed == 3 * len(TEACHERS) and reference.errors == 0, reference

    marker = tmp_path / "crashed"
    run = precompute(
        ray_local,
        corpus,
        tmp_path / "cache",
        *crash_once(marker),
        "--max-restarts",
        "1",
        "--max-retries",
        "1",
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert marker.exists(), "the hook did not fire: no actor computed the crash key"
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert summary["shards"] == 3 and summary["images"] == len(keys) and summary["errors"] == 0, summary
    for teacher in TEACHERS:
        assert sorted(TargetCache(tmp_path / "cache").committed_shards(teacher)) == [
            f"shard-{s:06d}" for s in range(3)
        ]
        expected, got = read_cache(tmp_path / "reference", teacher), read_cache(tmp_path / "cache", teacher)
        assert sorted(got) == sorted(expected) == sorted(keys)
        for key in keys:
            np.testing.assert_array_equal(got[key], expected[key], err_msg=f"{teacher} {key}")

    no_restart = precompute(
        ray_local,
        corpus,
        tmp_path / "no-restart",
        *crash_once(tmp_path / "crashed-too"),
        "--max-restarts",
        "0",
    )
    assert (tmp_path / "crashed-too").exists()
    assert no_restart.returncode != 0, "the job survived an actor crash without restarts"
    assert "ActorDiedError" in no_restart.stderr, no_restart.stderr[-3000:]
