"""Configs: round trip through dicts, unknown keys named, docs/CONFIG.md current."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from olavlm.schemas.config import (
    STAGES,
    DataConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    from_dict,
    literal_choices,
    scaled_layers,
    to_dict,
)
from olavlm.schemas.config_doc import config_reference, field_docs
from olavlm.schemas.errors import ConfigError


def test_round_trip_and_unknown_key():
    config = RunConfig(
        model=ModelConfig(layers={"depth": (1, 2)}, tasks=("depth",)), train=TrainConfig(steps=7)
    )
    assert from_dict(RunConfig, to_dict(config)) == config
    with pytest.raises(ValueError, match="'stpes'"):
        from_dict(RunConfig, {"train": {"stpes": 3}})


def test_every_field_is_documented():
    for cls in (ModelConfig, DataConfig, TrainConfig):
        undocumented = {f.name for f in dataclasses.fields(cls)} - set(field_docs(cls))
        assert not undocumented, f"{cls.__name__}: fields without a docstring: {undocumented}"


def test_fixed_choices_are_literals_checked_everywhere():
    """One Literal per fixed choice: files, options and direct construction all refuse another value."""
    assert literal_choices(TrainConfig) == {"stage": STAGES, "on_nonfinite": ("stop", "skip")}
    assert literal_choices(DataConfig) == {
        "image_aspect_ratio": ("", "crop", "pad"),
        "on_missing": ("error", "skip"),
    }
    assert literal_choices(ModelConfig) == {"preset": ("", "tiny")}
    assert from_dict(RunConfig, {"train": {"stage": "vpt"}}).train.stage == "vpt"
    with pytest.raises(ConfigError, match=r"train\.stage: expected one of 'pt', 'vpt', 'ift', got 'sft'"):
        from_dict(RunConfig, {"train": {"stage": "sft"}})
    with pytest.raises(ConfigError, match=r"data\.on_missing: 'ignore' is not one of 'error', 'skip'"):
        DataConfig(on_missing="ignore")
    with pytest.raises(ConfigError, match=r"train\.on_nonfinite"):
        dataclasses.replace(TrainConfig(), on_nonfinite="zero")
    assert "`'pt' \\| 'vpt' \\| 'ift'`" in config_reference()


def test_config_reference_is_current():
    page = Path(__file__).parents[1] / "docs" / "CONFIG.md"
    assert page.read_text() == config_reference(), (
        "regenerate: python -m olavlm.schemas.config_doc > docs/CONFIG.md"
    )


def test_paper_layers_scale_with_depth():
    assert scaled_layers(32) == {"depth": (8, 20), "seg": (10, 18), "gen": (12, 20)}
    assert scaled_layers(16) == {"depth": (4, 10), "seg": (5, 9), "gen": (6, 10)}
    assert all(0 <= layer < 4 for layers in scaled_layers(4).values() for layer in layers)
