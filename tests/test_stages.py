"""Freeze policies: after one optimizer step per stage, exactly the stated parts changed."""

from __future__ import annotations

import pytest
import torch

from olavlm.trainer.freeze import PARTS, STAGE_LR, apply_stage, parts, trainable_parts, uses_embedding_losses
from tests._student import SAMPLES, make_batch, tiny_model

# Never reached by a gradient with vision_feature_layer -2: the CLIP tower's last block and post-layernorm.
UNUSED = ("llava.model.vision_tower.encoder.layers.1.", "llava.model.vision_tower.post_layernorm.")


# The authors' scripts: PT trains the projector (+ our heads, task tokens, scales); vpt.sh and finetune.sh
# train projector + LLM with the vision tower frozen (`unfreeze_mm_vision_tower` is off by default).
AUTHORS = {
    ("pt", False): {"projector", "heads", "task_tokens", "logit_scales"},
    ("vpt", False): {"projector", "llm"},
    ("vpt", True): {"projector", "llm", "vision"},
    ("ift", False): {"projector", "llm"},
}


@pytest.mark.parametrize("stage,unfreeze_vision", sorted(AUTHORS))
def test_one_step_changes_exactly_the_trainable_parts(stage, unfreeze_vision):
    model = tiny_model()
    groups = apply_stage(model, stage, unfreeze_vision=unfreeze_vision)
    trainable = trainable_parts(stage, unfreeze_vision=unfreeze_vision)
    assert {g["name"] for g in groups} == set(trainable) == AUTHORS[(stage, unfreeze_vision)]
    assert all(g["lr"] == STAGE_LR[stage] for g in groups)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    model(make_batch(model, SAMPLES), distill=uses_embedding_losses(stage))["loss"].backward()
    opt.step()
    for part, params in parts(model).items():
        changed = {n for n, p in params if not torch.equal(p, before[n])}
        if part in trainable:
            expected = {n for n, _ in params if not n.startswith(UNUSED)}
            # Embedding rows of tokens absent from the batch get zero gradient: check the rest moved.
            if part == "llm":
                assert changed, f"{stage}: no LLM parameter changed"
                assert {n for n in expected if "embed_tokens" not in n and "lm_head" not in n} <= changed
            else:
                assert changed == expected, f"{stage}/{part}: unchanged {sorted(expected - changed)[:3]}"
        else:
            assert not changed, f"{stage}: frozen part {part} changed: {sorted(changed)[:3]}"


def test_every_parameter_has_a_part_and_unknown_stage_fails():
    model = tiny_model()
    assert sum(len(v) for v in parts(model).values()) == len(list(model.parameters()))
    assert set(parts(model)) == set(PARTS)
    with pytest.raises(ValueError, match="unknown stage"):
        apply_stage(model, "sft")
    with pytest.raises(ValueError, match="VPT stage only"):
        apply_stage(model, "pt", unfreeze_vision=True)


def test_ift_keeps_frozen_task_tokens_in_the_sequence():
    model = tiny_model()
    apply_stage(model, "ift")
    batch = make_batch(model, SAMPLES)
    with torch.no_grad():
        base = model(batch, distill=False)["ntp"]
        model.task_embeddings.add_(1.0)  # the frozen tokens still shape the LLM's input
        assert not torch.equal(base, model(batch, distill=False)["ntp"])
