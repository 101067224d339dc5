"""`resolve_run`: what a training run will do, decided before any weight is loaded (no model is built here)."""

from __future__ import annotations

import pytest

from olavlm.schemas.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from olavlm.schemas.errors import ConfigError
from olavlm.trainer.run import resolve_run
from tests._trainer_data import make_cache, make_corpus

SHAPES = {"gen": (1, 24), "depth": (64, 32), "seg": (64, 48)}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    samples = make_corpus(d / "corpus", shards=1, per_shard=3)
    make_cache(d / "cache", samples, tasks=("depth",), shapes=SHAPES)
    return d


def config(d, tasks=("gen", "depth", "seg"), **train) -> RunConfig:
    return RunConfig(
        model=ModelConfig(preset="tiny", tasks=tasks),
        data=DataConfig(data=str(d / "corpus"), cache=str(d / "cache")),
        train=TrainConfig(out=str(d / "out"), **train),
    )


def test_targets_fingerprints_and_preset(data):
    run = resolve_run(config(data, tasks=("depth",)))
    assert set(run.targets) == {"depth"} and run.target_shapes == {"depth": SHAPES["depth"]}
    assert run.fingerprints == {"depth": run.targets["depth"].fingerprint}
    assert run.config.data.expect_fingerprints == run.fingerprints  # the join refuses another cache
    assert run.tiny_student == str(data / "out" / "tiny-student") and run.config.model.preset == ""
    assert run.config.model.head_width == 32 and run.start_from == "" and run.resume == ""


def test_pt_distillation_without_any_configured_task_in_the_cache_is_refused(data):
    with pytest.raises(ConfigError) as err:
        resolve_run(config(data, tasks=("gen", "seg")))
    message = str(err.value)
    assert "['gen', 'seg']" in message and "its teachers: ['depth']" in message and "--no-distill" in message


def test_ntp_baseline_and_bad_options(data):
    baseline = resolve_run(config(data, tasks=("gen",), distill=False))
    assert baseline.targets == {} and baseline.config.model.tasks == () and not baseline.distill
    with pytest.raises(ConfigError, match=r"tasks \[.gen.\] have no targets"):
        resolve_run(config(data, tasks=("gen", "depth")))  # gen has no targets: named
    with pytest.raises(ConfigError, match="train.stage"):
        resolve_run(config(data, stage="bogus"))
    with pytest.raises(ConfigError, match="needs --cache"):
        resolve_run(RunConfig(model=ModelConfig(preset="tiny")))


def test_layers_beyond_the_llm_depth_are_refused_before_the_model_is_built(data, tmp_path):
    """The LLM's depth is read from its config.json (a local folder here; the hub cache for an id)."""
    import dataclasses
    import json

    llm = tmp_path / "llm"
    llm.mkdir()
    (llm / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 4}))
    run = dataclasses.replace(
        config(data, tasks=("depth",)),
        model=ModelConfig(vision_model="clip", llm=str(llm), tasks=("depth",), layers={"depth": (2, 9)}),
    )
    with pytest.raises(ConfigError, match=r"model.layers: \{'depth': \[9\]\} outside the LLM's layers 1..4"):
        resolve_run(run)
    fits = dataclasses.replace(run, model=dataclasses.replace(run.model, layers={"depth": (2, 4)}))
    assert resolve_run(fits).config.model.layers == {"depth": (2, 4)}
