"""`train()` applies each stage's recipe: PT crops and VPT pads (the processor saved with every checkpoint
says which), VPT leaves the vision tower as it was unless `unfreeze_vision`."""

from __future__ import annotations

import pytest
import torch

from olavlm.schemas.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from olavlm.schemas.errors import ConfigError
from olavlm.trainer import checkpoint
from olavlm.trainer.student.build import load_student
from olavlm.trainer.student.model import OlaVlm
from olavlm.trainer.train import train
from tests._trainer_data import make_cache, make_corpus

SHAPES = {"gen": (1, 24), "depth": (64, 32), "seg": (64, 48)}


@pytest.fixture(scope="module")
def pt_checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("recipe")
    samples = make_corpus(d / "corpus", shards=1, per_shard=4, text_only_every=0)
    make_cache(d / "cache", samples, shapes=SHAPES)
    config = RunConfig(
        model=ModelConfig(preset="tiny"),
        data=DataConfig(
            data=str(d / "corpus"), cache=str(d / "cache"), batch_size=2, num_workers=0, max_length=256
        ),
        train=TrainConfig(stage="pt", steps=1, out=str(d / "pt"), save_every=1, log_every=1),
    )
    return d, train(config)["checkpoint"]


def _vpt(d, start: str, out: str, **train_fields) -> OlaVlm:
    config = RunConfig(
        model=ModelConfig(preset="tiny"),
        data=DataConfig(data=str(d / "corpus"), batch_size=2, num_workers=0, max_length=256),
        train=TrainConfig(
            stage="vpt",
            distill=False,
            steps=1,
            out=str(d / out),
            save_every=1,
            log_every=1,
            init_from=start,
            **train_fields,
        ),
    )
    return load_student(checkpoint.model_dir(train(config)["checkpoint"]))


def _vision(model: OlaVlm) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.llava.state_dict().items() if k.startswith("model.vision_tower.")}


@pytest.mark.timeout(300)
def test_pt_crops_vpt_pads_and_freezes_the_vision_tower(pt_checkpoint):
    d, start = pt_checkpoint
    pt = load_student(checkpoint.model_dir(start))
    assert not getattr(pt.image_processor, "do_pad", False)  # PT: the processor's resize + centre crop
    vpt = _vpt(d, start, "vpt")
    assert vpt.image_processor.do_pad  # VPT: expand2square first, saved with the checkpoint
    before, after = _vision(pt), _vision(vpt)
    assert all(torch.equal(before[k], after[k]) for k in before)  # the authors' vpt.sh: vision frozen
    projector = "model.multi_modal_projector.linear_1.weight"
    assert not torch.equal(pt.llava.state_dict()[projector], vpt.llava.state_dict()[projector])
    unfrozen = _vpt(d, start, "vpt-unfrozen", unfreeze_vision=True)
    assert any(not torch.equal(before[k], v) for k, v in _vision(unfrozen).items())


@pytest.mark.timeout(300)
def test_image_aspect_ratio_override(pt_checkpoint):
    d, start = pt_checkpoint
    config = RunConfig(
        model=ModelConfig(preset="tiny"),
        data=DataConfig(
            data=str(d / "corpus"), batch_size=2, num_workers=0, max_length=256, image_aspect_ratio="crop"
        ),
        train=TrainConfig(
            stage="ift",
            distill=False,
            steps=1,
            out=str(d / "ift-crop"),
            save_every=1,
            log_every=1,
            init_from=start,
        ),
    )
    model = load_student(checkpoint.model_dir(train(config)["checkpoint"]))
    assert not getattr(model.image_processor, "do_pad", False)
    # an unknown mode is refused when the config is built, naming the field and the choices
    with pytest.raises(
        ConfigError, match=r"data\.image_aspect_ratio: 'square' is not one of '', 'crop', 'pad'"
    ):
        DataConfig(data=str(d / "corpus"), image_aspect_ratio="square")
