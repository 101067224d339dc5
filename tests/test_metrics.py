"""The metrics interface (trainer/metrics.py): metrics.jsonl always, TensorBoard and wandb when asked,
a ConfigError naming the extra when their package is missing. No model is trained: `Metrics` is fed
records shaped like the training loop's."""

from __future__ import annotations

import json
import sys
import types

import pytest

from olavlm.schemas.config import RunConfig, TrainConfig
from olavlm.schemas.errors import ConfigError
from olavlm.trainer.metrics import METRICS, WANDB_ID, Metrics
from olavlm.trainer.train import read_metrics

TERMS = ["loss", "ntp", "gen"]


def config(out, **train) -> RunConfig:
    return RunConfig(
        train=TrainConfig(**{"stage": "pt", "steps": 4, "log_every": 2, "out": str(out), **train})
    )


def record(step: int) -> dict:
    return {
        "step": step,
        "loss": 1.0 / step,
        "ntp": 0.5 / step,
        "gen": 0.25 * step,
        "lr": 1e-3 * step,
        "samples_per_s": 10.0 + step,
        "tokens_per_s": 100.0 + step,
        "grad_norm": None,
        "skipped": {},
    }


def log_steps(metrics: Metrics, steps=range(1, 5)) -> None:
    try:
        for step in steps:
            metrics.log(record(step), TERMS)
    finally:
        metrics.close()


def test_jsonl_is_always_written_every_log_every_steps_and_appended_on_resume(tmp_path):
    log_steps(Metrics(config(tmp_path), main=True, step=0))
    assert [r["step"] for r in read_metrics(tmp_path)] == [2, 4]
    assert read_metrics(tmp_path)[1] == record(4)  # the whole record, not only the scalars
    assert json.loads((tmp_path / "config.json").read_text())["train"]["steps"] == 4
    log_steps(Metrics(config(tmp_path, steps=6), main=True, step=4), steps=[5, 6])  # a resumed run appends
    assert [r["step"] for r in read_metrics(tmp_path)] == [2, 4, 6]


def test_other_ranks_write_nothing(tmp_path):
    log_steps(Metrics(config(tmp_path / "rank1"), main=False, step=0))
    assert not (tmp_path / "rank1").exists()


def test_missing_tensorboard_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # `import` of a None entry fails
    with pytest.raises(ConfigError, match=r"tensorboard.*pip install 'olavlm\[tensorboard\]'"):
        Metrics(config(tmp_path, tensorboard=True), main=True, step=0)


def test_missing_wandb_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ConfigError, match=r"train.wandb.*pip install 'olavlm\[wandb\]'"):
        Metrics(config(tmp_path, wandb=True), main=True, step=0)


def test_tensorboard_events_are_written_and_readable(tmp_path):
    pytest.importorskip(
        "tensorboard",
        reason="tensorboard is an optional extra, not installed here; "
        "test_missing_tensorboard_names_the_extra covers the error path",
    )
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log_steps(Metrics(config(tmp_path, tensorboard=True), main=True, step=0))
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {
        f"train/{n}" for n in [*TERMS, "lr", "samples_per_s", "tokens_per_s"]
    }
    assert [(e.step, round(e.value, 6)) for e in events.Scalars("train/gen")] == [(2, 0.5), (4, 1.0)]


class FakeWandb(types.ModuleType):
    """The part of the wandb API the sink uses, recording every call."""

    def __init__(self):
        super().__init__("wandb")
        self.calls: list[tuple] = []
        self.util = types.SimpleNamespace(generate_id=lambda: "run-id-1")

    def init(self, **kwargs):
        self.calls.append(("init", kwargs))
        fake = self

        class Run:
            def log(self, data, step):
                fake.calls.append(("log", data, step))

            def finish(self):
                fake.calls.append(("finish",))

        return Run()


def test_wandb_gets_init_scalars_per_logged_step_and_finish_and_resume_keeps_the_run_id(
    tmp_path, monkeypatch
):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "my-run"
    log_steps(Metrics(config(out, wandb=True, wandb_project="ola-test"), main=True, step=0))
    (name, init), *logs, finish = fake.calls
    assert name == "init" and finish == ("finish",)
    assert init["project"] == "ola-test" and init["name"] == "my-run" and init["dir"] == str(out)
    assert init["id"] == "run-id-1" and init["resume"] == "allow" and "mode" not in init  # WANDB_MODE decides
    assert init["config"]["train"]["wandb_project"] == "ola-test"
    assert [(step, data["train/gen"], data["train/lr"]) for _, data, step in logs] == [
        (2, 0.5, 2e-3),
        (4, 1.0, 4e-3),
    ]
    assert set(logs[0][1]) == {f"train/{n}" for n in [*TERMS, "lr", "samples_per_s", "tokens_per_s"]}
    assert (out / METRICS).exists()  # jsonl beside wandb, not instead of it

    fake.calls.clear()
    fake.util.generate_id = lambda: "a-new-id"  # a resumed run must not start a second wandb run
    log_steps(Metrics(config(out, steps=6, wandb=True), main=True, step=4), steps=[5, 6])
    assert fake.calls[0][1]["id"] == "run-id-1" == (out / WANDB_ID).read_text().strip()
