"""SIGKILL `ola train` (plain, and sharded under torchrun) at random moments, inside saves too, and
`ola precompute` (local disk, S3) inside a shard write, and resume each time: nothing a resume needs
is lost, and the result equals an uninterrupted run's exactly. The kill/resume logic is bench/kill.py's
(`ola bench torture` runs it with more kills, docs/BENCHMARKS.md); here a few kills keep `make test` short.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from olavlm.bench.kill import torture_precompute, torture_train
from olavlm.trainer.student.presets import build_tiny_student
from tests._precompute_data import build_corpus, local_ray
from tests._trainer_data import make_cache, make_corpus
from tests.test_resume import DROPOUT, SHAPES, run_config

ray_local = pytest.fixture(scope="module")(local_ray)


@pytest.fixture(scope="module")
def run_data(tmp_path_factory):
    """test_resume's corpus, cache and tiny student with attention dropout (an RNG consumer in every step)."""
    d = tmp_path_factory.mktemp("kill")
    make_cache(
        d / "cache", make_corpus(d / "corpus", shards=2, per_shard=6, text_only_every=5), shapes=SHAPES
    )
    student = build_tiny_student(d / "student", seed=0)
    config = Path(student.llm) / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "attention_dropout": DROPOUT}))
    return d, student


def kill_config(run_data, steps: int, fsdp: bool):
    """test_resume's run saving every step, keep_last 2, frozen weights saved: the plain or sharded layout."""
    config = run_config(run_data, "unused", keep_last=2, save_frozen=True, fsdp=fsdp)
    return dataclasses.replace(config, train=dataclasses.replace(config.train, steps=steps, save_every=1))


def assert_exact(result: dict) -> None:
    print(
        f"{result.get('layout', result.get('store'))}: {result['kills']} of {result['trials']} kills landed, "
        f"{result['kills_in_save']} inside a save; {result['launches']} launches, {result['seconds']} s"
    )
    assert result["problems"] == []
    assert result["kills_in_save"] >= 1  # teeth: the first kill waits for a save to begin, and landed
    if "layout" in result:  # teeth: a launch resumed from a checkpoint and logged steps compared above
        assert result["resumed_records"] >= 1


def test_a_run_removes_what_killed_saves_left_and_nothing_else(tmp_path):
    """A killed save's staging folder, a half-pruned folder and LATEST's temporary file go (a checkpoint's
    size each, kept for good otherwise); checkpoints, LATEST, a replaced step's set-aside copy and
    anything else stay."""
    from olavlm.trainer import checkpoint

    base = tmp_path / checkpoint.CHECKPOINTS
    left = [base / ".step-00000003.tmp-k2x9", base / ".step-00000001.removing-77", base / ".LATEST.tmp-77"]
    kept = [base / "step-00000002", base / ".step-00000002.old-5", base / "LATEST", base / "notes"]
    for path in left[:2] + kept[:2] + kept[3:]:
        (path / "model").mkdir(parents=True)
    left[2].write_text("step-00000003")
    kept[2].write_text("step-00000002")
    assert sorted(checkpoint.remove_leftovers(tmp_path)) == sorted(left)
    assert sorted(base.iterdir()) == sorted(kept)
    assert checkpoint.remove_leftovers(tmp_path / "no-run-here") == []


@pytest.mark.slow  # an uninterrupted run, two killed launches and the resume that finishes: 4 interpreters
@pytest.mark.timeout(600)
def test_plain_training_killed_at_random_moments_resumes_exactly(run_data, tmp_path):
    result = torture_train(kill_config(run_data, steps=6, fsdp=False), tmp_path, processes=1, kills=2, seed=0)
    assert_exact(result)


@pytest.mark.slow  # torchrun: three launches of two processes
@pytest.mark.timeout(600)
def test_sharded_training_of_two_processes_killed_inside_a_save_resumes_exactly(run_data, tmp_path):
    result = torture_train(kill_config(run_data, steps=4, fsdp=True), tmp_path, processes=2, kills=1, seed=0)
    assert_exact(result)


@pytest.mark.slow  # three Ray jobs: the uninterrupted one, a killed one, the rerun
@pytest.mark.timeout(600)
@pytest.mark.parametrize("store", ["local", "s3"])
def test_precompute_killed_inside_a_write_reruns_to_the_same_cache(ray_local, store, request, tmp_path):
    """Local disk commits by renaming a staging folder, S3 by writing commit.json last: each job is killed
    after its first commit, while another shard is being written; the rerun keeps what was committed,
    replaces the half-written shard and finishes the rest (4 shards x 2 teachers)."""
    build_corpus(tmp_path / "corpus", shards=4, per_shard=4)
    s3 = store == "s3"
    result = torture_precompute(
        str(tmp_path / "corpus"),
        "s3://olavlm/killed" if s3 else str(tmp_path / "cache"),
        address=ray_local.get_runtime_context().gcs_address,
        workdir=tmp_path,
        options=request.getfixturevalue("s3_options") if s3 else None,
        kills=1,
    )
    assert_exact(result)
    assert 0 < result["committed_at_kills"][0] < 4 * 2  # the rerun had committed shards to keep
    assert result["rows"] == 2 * 16  # two teachers' rows, all compared
