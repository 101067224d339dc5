"""Checkpoint discovery: LATEST, a dangling LATEST after a crash, run vs checkpoint vs model folders."""

from __future__ import annotations

import json

import pytest

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

        return checkpoint.save(tmp_path, step, save_model=save_model, optimizer_full={"state": {}, "param_groups": []},
                               loader_states=[{}], rng_states=[{}], config={}, fingerprints={})

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
