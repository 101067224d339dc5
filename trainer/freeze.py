"""Freeze policies of the training stages (docs/METHOD.md), as one function.

`apply_stage(model, stage)` sets `requires_grad` and returns one AdamW param group per part:

    vision        CLIP tower                       llava.model.vision_tower
    projector     mlp2x_gelu                       llava.model.multi_modal_projector
    llm           decoder, embeddings, lm_head     llava.model.language_model, llava.lm_head
    task_tokens   task-token embeddings            task_embeddings
    heads         embedding predictors             heads
    logit_scales  InfoNCE temperatures             logit_scales

PT trains projector, heads, task tokens and logit scales (the only stage with embedding losses);
VPT projector + LLM, the vision tower frozen as in the authors' vpt.sh unless `unfreeze_vision`;
IFT projector + LLM, task tokens frozen but in the sequence. With vision_feature_layer -2 the CLIP
tower's last block gets no gradient, even when trainable.
"""

from __future__ import annotations

from torch import nn

from olavlm.schemas.errors import ConfigError

STAGE_LR = {"pt": 1e-3, "vpt": 2e-5, "ift": 2e-5}
"""Default peak learning rate per stage (paper)."""

TRAINABLE = {
    "pt": ("projector", "heads", "task_tokens", "logit_scales"),
    "vpt": ("projector", "llm"),
    "ift": ("projector", "llm"),
}
PARTS = ("vision", "projector", "llm", "task_tokens", "heads", "logit_scales")

_PREFIXES = {
    "vision": ("llava.model.vision_tower.",),
    "projector": ("llava.model.multi_modal_projector.",),
    "llm": ("llava.model.language_model.", "llava.lm_head."),
    "task_tokens": ("task_embeddings",),
    "heads": ("heads.",),
    "logit_scales": ("logit_scales.",),
}


def uses_embedding_losses(stage: str) -> bool:
    """Only PT distils (the paper's ablation: embedding losses during IFT hurt)."""
    _check(stage)
    return stage == "pt"


def parts(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Every parameter of an OlaVlm, by part; an unknown parameter is an error naming it."""
    out: dict[str, list[tuple[str, nn.Parameter]]] = {name: [] for name in PARTS}
    for name, param in model.named_parameters():  # tied weights appear once
        part = next((p for p, prefixes in _PREFIXES.items() if name.startswith(prefixes)), None)
        if part is None:
            raise ValueError(f"parameter {name!r} belongs to no part of {PARTS}")
        out[part].append((name, param))
    return out


def trainable_parts(stage: str, *, unfreeze_vision: bool = False) -> tuple[str, ...]:
    """The parts `stage` trains; `unfreeze_vision` adds the vision tower (VPT only)."""
    _check(stage)
    if unfreeze_vision and stage != "vpt":
        raise ConfigError(f"unfreeze_vision applies to the VPT stage only, not {stage!r}")
    return (*TRAINABLE[stage], "vision") if unfreeze_vision else TRAINABLE[stage]


def apply_stage(
    model: nn.Module, stage: str, *, lr: float = 0.0, weight_decay: float = 0.0, unfreeze_vision: bool = False
) -> list[dict]:
    """Freeze/unfreeze `model` for `stage`; return AdamW param groups of the trainable parts.

    lr = 0 takes the stage default (STAGE_LR). Each group carries its part's name.
    """
    trainable_now = trainable_parts(stage, unfreeze_vision=unfreeze_vision)
    lr = lr or STAGE_LR[stage]
    groups = []
    for part, params in parts(model).items():
        trainable = part in trainable_now
        for _, param in params:
            param.requires_grad_(trainable)
        if trainable and params:
            groups.append(
                {"name": part, "params": [p for _, p in params], "lr": lr, "weight_decay": weight_decay}
            )
    return groups


def _check(stage: str) -> None:
    if stage not in TRAINABLE:
        raise ConfigError(f"unknown stage {stage!r}: one of {tuple(TRAINABLE)}")
