"""Trainable-only checkpoints: only the trained tensors + a hashed reference to the frozen base.

Round trip (exact), a chain of trainable-only folders keeps its root base, a changed or missing base is
refused with a ConfigError naming folder, base and hashes, and the training loop writes them in PT
(full folders with train.save_frozen).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from olavlm.schemas.errors import ConfigError
from olavlm.trainer.freeze import apply_stage
from olavlm.trainer.student.build import (
    BASE_KEY,
    LLAVA_DIR,
    TRAINABLE_FILE,
    build_student,
    load_student,
    save_student,
)
from olavlm.trainer.student.model import OlaVlm
from tests._student import SPECS, tiny_config, tiny_folders


def _pt_student(vision_model: str | None = None, llm: str | None = None) -> OlaVlm:
    """A tiny student in PT whose trainable tensors moved away from their initial values."""
    changes = {k: v for k, v in (("vision_model", vision_model), ("llm", llm)) if v}
    config = tiny_config(**changes)
    torch.manual_seed(0)
    model = build_student(config, SPECS)
    apply_stage(model, "pt")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    return model


def _size(folder) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _assert_same_state(a: OlaVlm, b: OlaVlm) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert not [k for k in sa if not torch.equal(sa[k], sb[k])]


def test_trainable_only_round_trip_is_exact_and_chains_keep_the_root_base(tmp_path):
    model = _pt_student()
    full = save_student(model, tmp_path / "full")
    first = save_student(model, tmp_path / "first", trainable_only=True)
    assert not (first / LLAVA_DIR).exists() and (first / TRAINABLE_FILE).exists()
    assert _size(first) < _size(full) / 2
    with safe_open(first / TRAINABLE_FILE, "pt") as f:
        saved = set(f.keys())
    assert saved == {
        n.removeprefix("llava.")
        for n, p in model.named_parameters()
        if p.requires_grad and n.startswith("llava.")
    }  # the projector in PT, nothing frozen
    base = json.loads((first / "olavlm.json").read_text())[BASE_KEY]
    assert base["source"]["llm"] == tiny_folders().llm and base["hash"].startswith("sampled-sha256:")

    loaded = load_student(first)
    _assert_same_state(model, loaded)
    # a resume's next checkpoint: loaded from `first`, saved again; it must not depend on `first`
    apply_stage(loaded, "pt")
    second = save_student(loaded, tmp_path / "second", trainable_only=True)
    assert json.loads((second / "olavlm.json").read_text())[BASE_KEY]["source"] == base["source"]
    shutil.rmtree(first)
    _assert_same_state(model, load_student(second))


def test_a_frozen_tensor_that_left_the_base_is_saved_too(tmp_path):
    """E.g. a stage that trained the LLM, then one that freezes it: the trained values travel in the overlay."""
    model = _pt_student()
    first = load_student(save_student(model, tmp_path / "full"))
    with torch.no_grad():
        first.llava.model.language_model.norm.weight.mul_(2)  # changed, then frozen
    again = load_student(save_student(first, tmp_path / "full2"))  # its base: this full folder
    apply_stage(again, "pt")
    folder = save_student(again, tmp_path / "tro", trainable_only=True)
    _assert_same_state(again, load_student(folder))


def test_a_changed_or_missing_base_is_refused_naming_both_hashes(tmp_path):
    from transformers import AutoModelForCausalLM

    base = tmp_path / "base"
    shutil.copytree(Path(tiny_folders().llm).parent, base)
    vision, llm = base / "vision", base / "llm"
    folder = save_student(_pt_student(str(vision), str(llm)), tmp_path / "ckpt", trainable_only=True)
    saved_hash = json.loads((folder / "olavlm.json").read_text())[BASE_KEY]["hash"]

    lm = AutoModelForCausalLM.from_pretrained(llm)
    with torch.no_grad():
        lm.model.layers[0].mlp.up_proj.weight.add_(0.5)  # another base: a fine-tune of the same LLM
    lm.save_pretrained(llm)
    with pytest.raises(ConfigError) as refused:
        load_student(folder)
    message = str(refused.value)
    assert str(folder) in message and str(llm) in message and saved_hash in message
    assert message.count("sampled-sha256:") == 2

    shutil.rmtree(llm)
    with pytest.raises(ConfigError, match="cannot be built") as missing:
        load_student(folder)
    assert (
        str(folder) in str(missing.value)
        and str(llm) in str(missing.value)
        and saved_hash in str(missing.value)
    )


@pytest.mark.timeout(300)
def test_pt_training_writes_trainable_only_checkpoints_and_keeps_the_last_n(tmp_path, one_thread):
    from olavlm.schemas.config import DataConfig, ModelConfig, RunConfig, TrainConfig
    from olavlm.trainer import checkpoint
    from olavlm.trainer.student.presets import TINY_HEADS, build_tiny_student
    from olavlm.trainer.train import train
    from tests._trainer_data import make_cache, make_corpus

    samples = make_corpus(tmp_path / "corpus", shards=1, per_shard=4)
    make_cache(tmp_path / "cache", samples, shapes={"gen": (1, 24), "depth": (64, 32), "seg": (64, 48)})
    student = build_tiny_student(tmp_path / "student", seed=0)

    def config(out, **train):
        return RunConfig(
            model=ModelConfig(vision_model=student.vision_model, llm=student.llm, **TINY_HEADS),
            data=DataConfig(
                data=str(tmp_path / "corpus"),
                cache=str(tmp_path / "cache"),
                batch_size=2,
                num_workers=0,
                max_length=256,
            ),
            train=TrainConfig(
                **{"stage": "pt", "steps": 3, "out": str(out), "save_every": 1, "log_every": 1, **train}
            ),
        )

    train(config(tmp_path / "pt", keep_last=2))
    steps = sorted(p.name for p in (tmp_path / "pt" / checkpoint.CHECKPOINTS).glob("step-*"))
    assert steps == [checkpoint.step_name(2), checkpoint.step_name(3)]
    model = checkpoint.model_dir(tmp_path / "pt")
    assert (model / TRAINABLE_FILE).exists() and not (model / LLAVA_DIR).exists()
    assert json.loads((model / "olavlm.json").read_text())[BASE_KEY]["source"]["llm"] == student.llm
    load_student(model)  # rebuilds from the student folders

    train(config(tmp_path / "pt-full", steps=1, save_frozen=True))
    model = checkpoint.model_dir(tmp_path / "pt-full")
    assert (model / LLAVA_DIR).is_dir() and not (model / TRAINABLE_FILE).exists()


def test_relative_base_folders_are_recorded_absolute(tmp_path, monkeypatch):
    shutil.copytree(Path(tiny_folders().llm).parent, tmp_path / "base")
    monkeypatch.chdir(tmp_path)
    model = _pt_student("base/vision", "base/llm")
    folder = save_student(model, tmp_path / "ckpt", trainable_only=True)
    source = json.loads((folder / "olavlm.json").read_text())[BASE_KEY]["source"]
    assert source["llm"] == str(tmp_path / "base" / "llm") and source["vision_model"] == str(
        tmp_path / "base" / "vision"
    )
    monkeypatch.chdir(tmp_path / "base")  # another working directory
    _assert_same_state(model, load_student(folder))


def test_keep_last_keeps_the_full_checkpoint_that_kept_trainable_only_ones_need(tmp_path):
    """A PT run resumed from a full checkpoint of its own OUT records that folder as the frozen base of its
    next (trainable-only) checkpoints: keep_last=1 removes the checkpoints in between, never that base."""
    from olavlm.trainer import checkpoint

    common = dict(
        optimizer_full={"state": {}, "param_groups": []},
        loader_states=[{}],
        rng_states=[{}],
        config={},
        fingerprints={},
    )
    model = _pt_student()
    checkpoint.save(tmp_path, 1, save_model=lambda p: save_student(model, p), **common)  # full (save_frozen)
    resumed = load_student(checkpoint.model_dir(tmp_path))  # --resume
    apply_stage(resumed, "pt")
    for step in (2, 3):
        checkpoint.save(
            tmp_path,
            step,
            save_model=lambda p: save_student(resumed, p, trainable_only=True),
            keep_last=1,
            **common,
        )
    left = sorted(p.name for p in (tmp_path / checkpoint.CHECKPOINTS).glob("step-*"))
    assert left == [checkpoint.step_name(1), checkpoint.step_name(3)]  # step 2 pruned, its base kept
    _assert_same_state(load_student(checkpoint.model_dir(tmp_path)), resumed)
