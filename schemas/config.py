"""Configuration of the trainer, as frozen keyword-only dataclasses.

Every field is documented where it is declared; the CLI maps options onto these
fields by name (never by hand-copying each flag), the effective config is saved
as JSON with every checkpoint, and `docs/CONFIG.md` is generated from them.
Configs are never mutated: derive a new one with `dataclasses.replace`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .errors import ConfigError

# Fixed choices are `Literal` types: the field annotations, the CLI's choices (cli/options.py),
# docs/CONFIG.md and every check of a value (`check_choices`, `coerce`) read them from here.
Stage = Literal["pt", "vpt", "ift"]
STAGES: tuple[str, ...] = typing.get_args(Stage)
ImageAspectRatio = Literal["crop", "pad"]
IMAGE_ASPECT_RATIOS: tuple[str, ...] = typing.get_args(ImageAspectRatio)
OnMissing = Literal["error", "skip"]
ON_MISSING: tuple[str, ...] = typing.get_args(OnMissing)
OnNonfinite = Literal["stop", "skip"]
ON_NONFINITE: tuple[str, ...] = typing.get_args(OnNonfinite)
StudentPreset = Literal["", "tiny"]
STUDENT_PRESETS: tuple[str, ...] = typing.get_args(StudentPreset)
TASK_ORDER = ("gen", "depth", "seg")
"""Task tokens follow the image tokens in this order (docs/METHOD.md, "Task tokens"); other teachers come after, sorted."""
PAPER_LAYERS_32 = {"depth": (8, 20), "seg": (10, 18), "gen": (12, 20)}
"""The paper's distillation layers for a 32-layer LLM, in the paper's numbering: layer i is the
output of the i-th decoder block counted from 1, i.e. transformers' `hidden_states[i]`
(`hidden_states[0]` is the embedding output). The authors' code parses "8-20" as `int(i) - 1` into
`hidden_states[1:]`, which is the same tensor."""
STAGE_IMAGE_ASPECT_RATIO = {"pt": "crop", "vpt": "pad", "ift": "pad"}
"""LLaVA-1.5's `--image_aspect_ratio` per stage in the authors' scripts (PT: the processor's resize and
centre crop; VPT, IFT and probing: pad to a square with the processor's mean colour first)."""


def scaled_layers(
    num_layers: int, reference: dict[str, tuple[int, ...]] = PAPER_LAYERS_32
) -> dict[str, tuple[int, ...]]:
    """The paper's layers scaled to an LLM of `num_layers` blocks: round(i * num_layers / 32), kept in 1..num_layers."""
    out = {}
    for task, layers in reference.items():
        out[task] = tuple(
            sorted({min(num_layers, max(1, round(layer * num_layers / 32))) for layer in layers})
        )
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
    preset: StudentPreset = ""
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

    def __post_init__(self) -> None:
        check_choices(self, "model")


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
    """Shuffle seed; the order is a function of (seed, epoch, world size, num_workers) only."""
    image_aspect_ratio: Literal["", ImageAspectRatio] = ""
    """'crop' (resize the short side, centre crop: LLaVA's default) or 'pad' (pad to a square with the processor's mean colour, then the processor: LLaVA-1.5's expand2square); '' = the stage default, crop for PT and pad for VPT and IFT."""
    shuffle_block: int = 64
    """Rows read together from one shard before shuffling (sequential cache reads)."""
    on_missing: OnMissing = "error"
    """Missing or mismatched target: 'error' stops naming key and shard; 'skip' counts and logs it."""
    expect_fingerprints: dict[str, str] = field(default_factory=dict)
    """Teacher spec fingerprints the run requires of the cache ({} = take the cache's, record them)."""
    caption_prompt: str = "Describe the image briefly."
    """Caption-only samples (img2dataset's `jpg` + `txt` + `json` layout, no 'conversations'): the user turn is `<image>` + this prompt and the caption is the answer (LLaVA's PT form); '' = refuse such samples (bad_json)."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    """fsspec options for `data` and `cache` URLs, e.g. {"endpoint_url": "http://127.0.0.1:9000", "anon": false}; saved in each checkpoint's config.json, so keep secrets in the environment or a credentials profile."""

    def __post_init__(self) -> None:
        check_choices(self, "data")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """One training run: stage, optimisation, checkpoints, logging."""

    stage: Stage = "pt"
    """'pt' (projector + heads + task tokens), 'vpt' (projector + LLM; vision frozen unless unfreeze_vision), 'ift' (projector + LLM)."""
    unfreeze_vision: bool = False
    """VPT only: train the CLIP tower too (the authors' `unfreeze_mm_vision_tower`, off in their vpt.sh)."""
    distill: bool = True
    """Add the embedding losses (PT only in the paper); False = the NTP-only baseline."""
    steps: int = 1000
    """Optimizer steps; the warm-up + cosine schedule spans them. Raised on resume, it stretches the schedule over the new total: from the resumed step on the rate is the longer schedule's (after a finished run it rises again)."""
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
    """Checkpoint (or run folder: its latest) to continue exactly: weights, optimizer, loader, RNG. Checkpoints go to its run folder unless `out` is given; options equal to the saved run's are accepted, other changes only to steps, out, save_every, log_every, keep_last and the logging sinks."""
    out: str = "runs/ola"
    """Output folder: checkpoints and metrics.jsonl."""
    save_every: int = 500
    """Checkpoint every N steps (and at the end)."""
    keep_last: int = 0
    """Keep only the newest N checkpoints (0 = keep all); the one LATEST names is never removed."""
    save_frozen: bool = False
    """Save the frozen weights too. Off: when most weights are frozen (PT) a checkpoint holds only the trainable tensors and a reference (paths + hash) to the frozen base it is rebuilt from."""
    log_every: int = 10
    """Metrics line every N steps."""
    seed: int = 0
    """Seed of parameter init and dropout."""
    on_nonfinite: OnNonfinite = "stop"
    """NaN/inf loss: 'stop' with an error naming step and term, or 'skip' the step."""
    fsdp: bool = False
    """FSDP2 (fully_shard) instead of DDP, for full fine-tuning of large LLMs."""
    tensorboard: bool = False
    """Also write TensorBoard event files to OUT/tensorboard (needs `pip install 'olavlm[tensorboard]'`)."""
    wandb: bool = False
    """Also log to Weights & Biases (needs `pip install 'olavlm[wandb]'`; WANDB_MODE=offline is honoured)."""
    wandb_project: str = "olavlm"
    """The wandb project the run logs to (with `wandb`); the run is named after OUT."""

    def __post_init__(self) -> None:
        check_choices(self, "train")


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Everything `ola train` needs; saved as config.json in every checkpoint."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


@functools.cache
def literal_choices(cls: type) -> dict[str, tuple[Any, ...]]:
    """Field name -> its allowed values, for every `Literal`-typed field of a config dataclass."""
    return {
        name: typing.get_args(annotation)
        for name, annotation in field_types(cls).items()
        if typing.get_origin(annotation) is Literal
    }


def choices_text(choices: tuple[Any, ...]) -> str:
    """('pt', 'vpt', 'ift') -> "'pt', 'vpt', 'ift'"."""
    return ", ".join(repr(choice) for choice in choices)


def check_choices(config: Any, section: str = "") -> None:
    """A ConfigError naming `section.field` (a flat config: `field`) unless every `Literal` field of
    `config` (any config dataclass) holds one of its values."""
    for name, choices in literal_choices(type(config)).items():
        value = getattr(config, name)
        if value not in choices:
            where = f"{section}.{name}" if section else name
            raise ConfigError(f"{where}: {value!r} is not one of {choices_text(choices)}")


# -- typed values: one conversion for options, TOML, YAML and JSON ----------------------------------
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
_NUMBERS = {int: (int, "an integer"), float: ((int, float), "a number")}


def coerce(annotation: Any, value: Any, *, name: str = "") -> Any:
    """`value` (a command-line string or a value read from a config file) as the field type `annotation`.

    Strings convert ("1e-3" -> 0.001, "gen,depth" -> ("gen", "depth"), "0-3" in an int tuple -> 0, 1, 2, 3,
    JSON text -> dict); a wrong type raises ConfigError naming `name` (a field or an option)."""
    try:
        return _coerce(annotation, value)
    except (TypeError, ValueError) as exc:
        where = f"{name}: " if name else ""
        raise ConfigError(f"{where}{exc}") from None


def _coerce(annotation: Any, value: Any) -> Any:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin is Literal:
        for choice in args:  # a command-line string also matches a non-string choice by its text
            if value == choice or (
                isinstance(value, str) and not isinstance(choice, str) and value == str(choice)
            ):
                return choice
        raise ValueError(f"expected one of {choices_text(args)}, got {value!r}")
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value)
            except (TypeError, ValueError) as exc:
                errors.append(str(exc))
        raise ValueError("; ".join(errors))
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
            return value.lower() in _TRUE
        raise ValueError(f"expected true or false, got {value!r}")
    if annotation in _NUMBERS:  # a YAML 1.1 reader returns `1e-3` as a string
        accepted, what = _NUMBERS[annotation]
        if isinstance(value, accepted) and not isinstance(value, bool):
            return annotation(value)
        with contextlib.suppress(ValueError):
            if isinstance(value, str):
                return annotation(value.strip())
        raise ValueError(f"expected {what}, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"expected a string, got {value!r}")
    if origin is tuple:
        item = args[0] if args else Any
        if isinstance(value, str):
            parts = [p.strip() for p in value.split(",") if p.strip()]
            if item is int:
                return tuple(n for p in parts for n in _int_range(p))
            value = parts
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"expected a list, got {value!r}")
        return tuple(_coerce(item, v) for v in value)
    if origin is dict:
        key_type, value_type = args if args else (Any, Any)
        if isinstance(value, str):
            value = json.loads(value) if value.strip() else {}
        if not isinstance(value, dict):
            raise ValueError(f"expected a mapping (a JSON object on the command line), got {value!r}")
        return {_coerce(key_type, k): _coerce(value_type, v) for k, v in value.items()}
    if dataclasses.is_dataclass(annotation) and isinstance(annotation, type):
        if isinstance(value, annotation):
            return value
        if isinstance(value, dict):
            return from_dict(annotation, value)
        raise ValueError(f"expected a section (mapping), got {value!r}")
    raise TypeError(f"unsupported config type {annotation!r}")


def _int_range(text: str) -> list[int]:
    """'8' -> [8]; '0-3' -> [0, 1, 2, 3]; '-2' -> [-2]."""
    low, sep, high = text[1:].partition("-")
    if sep:
        return list(range(int(text[0] + low), int(high) + 1))
    return [int(text)]


def field_types(cls: type) -> dict[str, Any]:
    """Field name -> resolved annotation (the modules use `from __future__ import annotations`)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def from_dict(cls: type, data: dict[str, Any], *, prefix: str = "") -> Any:
    """Build a (nested) config dataclass from a dict (TOML, YAML, JSON, a saved config.json): every value
    is converted to its field's type; an unknown key or a wrong type is a ConfigError naming `section.field`."""
    types_ = field_types(cls)
    kwargs = {}
    for name, value in data.items():
        if name not in types_:
            where = f" in [{prefix[:-1]}]" if prefix else ""
            raise ConfigError(f"{cls.__name__}: unknown config key {name!r}{where} (known: {sorted(types_)})")
        annotation = types_[name]
        if dataclasses.is_dataclass(annotation) and isinstance(value, dict):
            kwargs[name] = from_dict(annotation, value, prefix=f"{prefix}{name}.")
        else:
            kwargs[name] = coerce(annotation, value, name=prefix + name)
    return cls(**kwargs)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The raw sections of a .toml, .yaml/.yml or .json config file (typed later by `from_dict`)."""
    path = Path(path)
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text) or {}
    elif path.suffix == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10: the same parser as a package
            import tomli as tomllib

        data = tomllib.loads(text)
    elif path.suffix == ".json":
        data = json.loads(text)
    else:
        raise ConfigError(f"{path}: config files are .toml, .yaml/.yml or .json")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected sections (a mapping) at the top level")
    return data


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`overrides` on top of `base`, section by section (nested dicts merge, other values replace)."""
    out = dict(base)
    for key, value in overrides.items():
        out[key] = (
            merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        )
    return out


def flat_names(data: dict[str, Any], prefix: str = "") -> set[str]:
    """{'train': {'steps': 3}} -> {'train.steps'}: the fields a dict of overrides sets."""
    out = set()
    for key, value in data.items():
        if isinstance(value, dict) and key in SECTION_NAMES and not prefix:
            out |= flat_names(value, f"{key}.")
        else:
            out.add(prefix + key)
    return out


SECTION_NAMES = ("model", "data", "train")
