"""Checkpoint discovery: LATEST, a dangling LATEST after a crash, run vs checkpoint vs model folders."""

from __future__ import annotations

import json

import pytest

from olavlm.schemas.errors import ConfigError
from olavlm.trainer import checkpoint


def fake_step(run, step: int):
    folder = run / checkpoint.CHECKPOINTS / checkpoint.step_name(step)
    (folder / checkpoint.MODEL).mkdir(parents=True)
    (folder / checkpoint.MODEL / "olavlm.json").write_text("{}")
    (folder / checkpoint.TRAINER).write_text(json.dumps({"step": step}))
    return folder


def test_find_follows_latest_and_survives_a_dangling_one(tmp_path):
    run = tmp_path / "run"
    s10, s20 = fake_step(run, 10), fake_step(run, 20)
    (run / checkpoint.CHECKPOINTS / checkpoint.LATEST).write_text(s10.name)
    assert checkpoint.find(run) == s10  # LATEST wins, even over a newer folder
    (run / checkpoint.CHECKPOINTS / checkpoint.LATEST).write_text("step-00000030")  # crashed save of step 30
    assert checkpoint.find(run) == s20  # newest complete step instead
    assert checkpoint.model_dir(run) == s20 / checkpoint.MODEL
    assert checkpoint.model_dir(s10) == s10 / checkpoint.MODEL
    assert checkpoint.model_dir(s10 / checkpoint.MODEL) == s10 / checkpoint.MODEL
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        checkpoint.find(tmp_path / "empty")


def test_resaving_a_step_replaces_it_whole(tmp_path):
    def save(step, marker):
        def save_model(path):
            path.mkdir(parents=True)
            (path / "marker.txt").write_text(marker)

        return checkpoint.save(
            tmp_path,
            step,
            save_model=save_model,
            optimizer_full={"state": {}, "param_groups": []},
            loader_states=[{}],
            rng_states=[{}],
            config={},
            fingerprints={},
        )

    first = save(5, "old")
    second = save(5, "new")
    assert first == second and (second / checkpoint.MODEL / "marker.txt").read_text() == "new"
    leftovers = [p.name for p in (tmp_path / checkpoint.CHECKPOINTS).iterdir() if p.name.startswith(".")]
    assert leftovers == []  # no staging or set-aside folder left behind


def test_latest_and_done(tmp_path):
    """What the demo and `ola bench fidelity` ask of a run folder: its latest checkpoint and whether it is finished."""
    import json

    from olavlm.trainer import checkpoint

    assert checkpoint.latest_and_done(tmp_path / "none", 10) == ("", False)
    step = tmp_path / "run" / checkpoint.CHECKPOINTS / checkpoint.step_name(4)
    step.mkdir(parents=True)
    (step / checkpoint.TRAINER).write_text(json.dumps({"step": 4}))
    assert checkpoint.latest_and_done(tmp_path / "run", 10) == (str(step), False)
    assert checkpoint.latest_and_done(tmp_path / "run", 4) == (str(step), True)


def _save_empty(out, step: int, keep_last: int):
    def save_model(path):
        path.mkdir(parents=True)

    return checkpoint.save(
        out,
        step,
        save_model=save_model,
        optimizer_full={"state": {}, "param_groups": []},
        loader_states=[{}],
        rng_states=[{}],
        config={},
        fingerprints={},
        keep_last=keep_last,
    )


def test_keep_last_removes_only_older_complete_step_folders(tmp_path):
    base = tmp_path / checkpoint.CHECKPOINTS
    for step in (1, 2, 3):
        _save_empty(tmp_path, step, keep_last=0)
    assert sorted(p.name for p in base.glob("step-*")) == [checkpoint.step_name(s) for s in (1, 2, 3)]
    # things prune must leave alone: a staging folder, a half-written step, a foreign folder, a file
    staging = base / ".step-00000009.tmp-abc"
    staging.mkdir()
    half = base / checkpoint.step_name(0)
    (half / checkpoint.MODEL).mkdir(parents=True)  # no trainer.json: being written (or a crashed writer's)
    (base / "notes").mkdir()
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    _save_empty(tmp_path, 4, keep_last=2)
    assert sorted(p.name for p in base.glob("step-*")) == [checkpoint.step_name(s) for s in (0, 3, 4)]
    assert staging.is_dir() and (base / "notes").is_dir() and (tmp_path / "metrics.jsonl").exists()
    assert not [p for p in base.iterdir() if ".removing-" in p.name]
    assert checkpoint.find(tmp_path).name == checkpoint.step_name(4)


def test_keep_last_never_removes_latest_nor_newer_folders(tmp_path):
    """A run restarted from an earlier step: LATEST names an older folder than one already on disk."""
    base = tmp_path / checkpoint.CHECKPOINTS
    for step in (1, 2, 7):
        _save_empty(tmp_path, step, keep_last=0)
    _save_empty(tmp_path, 3, keep_last=1)
    assert (base / checkpoint.LATEST).read_text() == checkpoint.step_name(3)
    assert sorted(p.name for p in base.glob("step-*")) == [checkpoint.step_name(s) for s in (3, 7)]
    with pytest.raises(ConfigError, match="keep_last"):
        checkpoint.prune(tmp_path, -1)


def test_a_negative_keep_last_is_refused_before_training(tmp_path):
    """By resolve_run, before any checkpoint is written (prune used to refuse it after the first one, and
    on rank 0 only, which left the other ranks of a torchrun at the checkpoint's barrier)."""
    from olavlm.schemas.config import RunConfig, TrainConfig
    from olavlm.trainer.run import resolve_run

    with pytest.raises(ConfigError, match=r"train\.keep_last: -1"):
        resolve_run(RunConfig(train=TrainConfig(keep_last=-1, out=str(tmp_path / "run"))))
    assert not (tmp_path / "run").exists()
