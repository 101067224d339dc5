"""Configuration of the trainer, as frozen keyword-only dataclasses.

Every field is documented where it is declared; the CLI maps options onto these
fields by name (never by hand-copying each flag), the effective config is saved
as JSON with every checkpoint, and `docs/CONFIG.md` is generated from them.
Configs are never mutated: derive a new one with `dataclasses.replace`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

STAGES = ("pt", "vpt", "ift")
TASK_ORDER = ("gen", "depth", "seg")
"""Task tokens follow the image tokens in this order (method.md); other teachers come after, sorted."""
PAPER_LAYERS_32 = {"depth": (8, 20), "seg": (10, 18), "gen": (12, 20)}
"""The paper's distillation layers for a 32-layer LLM, in the paper's numbering: layer i is the
output of the i-th decoder block counted from 1, i.e. transformers' `hidden_states[i]`
(`hidden_states[0]` is the embedding output). The authors' code parses "8-20" as `int(i) - 1` into
`hidden_states[1:]`, which is the same tensor."""
IMAGE_ASPECT_RATIOS = ("crop", "pad")
STAGE_IMAGE_ASPECT_RATIO = {"pt": "crop", "vpt": "pad", "ift": "pad"}
"""LLaVA-1.5's `--image_aspect_ratio` per stage in the authors' scripts (PT: the processor's resize and
centre crop; VPT, IFT and probing: pad to a square with the processor's mean colour first)."""


def scaled_layers(num_layers: int, reference: dict[str, tuple[int, ...]] = PAPER_LAYERS_32) -> dict[str, tuple[int, ...]]:
    """The paper's layers scaled to an LLM of `num_layers` blocks: round(i * num_layers / 32), kept in 1..num_layers."""
    out = {}
    for task, layers in reference.items():
        out[task] = tuple(sorted({min(num_layers, max(1, round(layer * num_layers / 32))) for layer in layers}))
    return out


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """The student (LLaVA-1.5 layout) and its distillation heads."""

    vision_model: str = ""
    """Hub id or folder of the CLIP vision tower (paper: openai/clip-vit-large-patch14-336)."""
    llm: str = ""
    """Hub id or folder of the decoder-only causal LM (and its tokenizer)."""
    llava_checkpoint: str = ""
    """Start from an existing LLaVA / olavlm checkpoint instead of vision_model + llm."""
    preset: str = ""
    """'tiny': a seeded tiny student built offline (tests, demo); sets vision_model, llm and small heads."""
    vision_feature_layer: int = -2
    """CLIP layer whose patch features feed the projector (CLS dropped)."""
    tasks: tuple[str, ...] = TASK_ORDER
    """Teachers to distil; each needs targets in the cache. Empty = NTP only."""
    tokens_per_task: int = 8
    """Learnable task tokens per task, inserted after the image tokens."""
    layers: dict[str, tuple[int, ...]] = field(default_factory=dict)
    """LLM layers per task in the paper's numbering (layer i = `hidden_states[i]`, 1..num_layers); empty = the paper's (8, 20) / (10, 18) / (12, 20) scaled to the LLM depth."""
    head_width: int = 1024
    """Internal width of each Perceiver-resampler head."""
    head_num_heads: int = 16
    """Attention heads in each predictor head."""
    head_ffn_mult: int = 4
    """Feed-forward expansion of each predictor head."""
    info_nce_weight: float = 0.3
    """Weight of InfoNCE beside smooth-L1 in each embedding loss."""
    task_loss_weight: float = 0.5
    """Each task's loss = this x sum over its layers."""
    logit_scale_init: float = 2.0
    """Initial log logit scale of each task's InfoNCE (exp(s) clamped at logit_scale_max)."""
    logit_scale_max: float = 100.0
    """Clamp of exp(logit scale)."""
    gradient_checkpointing: bool = False
    """Recompute LLM activations in the backward pass (memory for ~30% compute)."""


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """The streaming data path: WebDataset image-text shards joined with cached targets."""

    data: str = ""
    """Training shards: folder, brace pattern or fsspec URL of WebDataset tars."""
    cache: str = ""
    """Target cache root written by `ola precompute` (local folder or fsspec URL)."""
    max_length: int = 2048
    """Token budget per sample; truncation never cuts image or task tokens."""
    batch_size: int = 8
    """Samples per device per micro-step."""
    num_workers: int = 2
    """DataLoader worker processes per rank."""
    seed: int = 0
    """Shuffle seed; the order is a function of (seed, epoch) only."""
    image_aspect_ratio: str = ""
    """'crop' (resize the short side, centre crop: LLaVA's default) or 'pad' (pad to a square with the processor's mean colour, then the processor: LLaVA-1.5's expand2square); '' = the stage default, crop for PT and pad for VPT and IFT."""
    shuffle_block: int = 64
    """Rows read together from one shard before shuffling (sequential cache reads)."""
    on_missing: str = "error"
    """Missing or mismatched target: 'error' stops naming key and shard; 'skip' counts and logs it."""
    expect_fingerprints: dict[str, str] = field(default_factory=dict)
    """Teacher spec fingerprints the run requires of the cache ({} = take the cache's, record them)."""


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """One training run: stage, optimisation, checkpoints, logging."""

    stage: str = "pt"
    """'pt' (projector + heads + task tokens), 'vpt' (projector + LLM; vision frozen unless unfreeze_vision), 'ift' (projector + LLM)."""
    unfreeze_vision: bool = False
    """VPT only: train the CLIP tower too (the authors' `unfreeze_mm_vision_tower`, off in their vpt.sh)."""
    distill: bool = True
    """Add the embedding losses (PT only in the paper); False = the NTP-only baseline."""
    steps: int = 1000
    """Optimizer steps."""
    lr: float = 0.0
    """Peak learning rate; 0 = the stage default (PT 1e-3, VPT/IFT 2e-5)."""
    warmup_ratio: float = 0.03
    """Linear warm-up as a fraction of the steps, then cosine decay to 0."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    grad_accum: int = 1
    """Micro-steps per optimizer step."""
    grad_clip: float = 1.0
    """Max global gradient norm (0 = off)."""
    bf16: bool = True
    """bf16 autocast on CUDA (ignored on CPU)."""
    init_from: str = ""
    """Checkpoint to start from (IFT starts from a PT checkpoint)."""
    resume: str = ""
    """Checkpoint (or run folder: its latest) to continue exactly: weights, optimizer, loader, RNG."""
    out: str = "runs/ola"
    """Output folder: checkpoints and metrics.jsonl."""
    save_every: int = 500
    """Checkpoint every N steps (and at the end)."""
    log_every: int = 10
    """Metrics line every N steps."""
    seed: int = 0
    """Seed of parameter init and dropout."""
    on_nonfinite: str = "stop"
    """NaN/inf loss: 'stop' with an error naming step and term, or 'skip' the step."""
    fsdp: bool = False
    """FSDP2 (fully_shard) instead of DDP, for full fine-tuning of large LLMs."""
    tensorboard: bool = False
    """Also write TensorBoard event files."""


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Everything `ola train` needs; saved as config.json in every checkpoint."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Build a (nested) config dataclass from a dict; unknown keys are an error naming the key."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in data.items():
        if name not in fields:
            raise ValueError(f"{cls.__name__}: unknown config key {name!r} (known: {sorted(fields)})")
        ftype = fields[name].type
        sub = {"ModelConfig": ModelConfig, "DataConfig": DataConfig, "TrainConfig": TrainConfig}.get(str(ftype))
        if sub is not None and isinstance(value, dict):
            value = from_dict(sub, value)
        elif isinstance(value, list):
            value = tuple(value)
        elif name == "layers" and isinstance(value, dict):
            value = {k: tuple(v) for k, v in value.items()}
        kwargs[name] = value
    return cls(**kwargs)
