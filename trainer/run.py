"""`resolve_run(config) -> Run`: everything the loop needs decided before a weight is loaded.

A `RunConfig` says what the user asked for; a `Run` says what will happen: the
config merged with the checkpoint being resumed, the tiny preset turned into
folders, the model config taken from the checkpoint it starts from, the teachers
whose targets are distilled (`targets`) and every head's target shape, the
fingerprints the data path requires, and the model folder to start from. The
effective config (saved as config.json) is `Run.config`.

Design choices and their cost:
- Pure: it reads small JSON files (the resumed checkpoint's config, the start
  checkpoint's olavlm.json, the cache's cache.json) and builds nothing, so every
  refusal (unknown stage, distillation without targets) happens before minutes
  of model loading and is tested without torch work. Cost: the tiny preset's
  folder is named here but built by the loop (`ensure_tiny_student`).
- On resume the saved run defines the config; only the options in `RESUMABLE`
  change it. `given` names the options the user typed (the CLI knows); without
  it (a RunConfig built in code) a field counts as given when it differs from
  its default, as it always has. A given option outside `RESUMABLE` whose value
  differs from the saved one is refused rather than silently ignored.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from olavlm.schemas.cache import TargetCache
from olavlm.schemas.config import ModelConfig, RunConfig, TrainConfig, from_dict
from olavlm.schemas.errors import ConfigError
from olavlm.schemas.spec import TeacherSpec
from olavlm.trainer import checkpoint
from olavlm.trainer.freeze import STAGE_LR, uses_embedding_losses
from olavlm.trainer.student.presets import TINY_HEADS, TINY_STUDENT_DIR

RESUMABLE = ("steps", "out", "save_every", "log_every", "keep_last", "tensorboard", "wandb", "wandb_project")
"""TrainConfig fields a resumed run may change; the saved config defines every other field."""
MODEL_META = "olavlm.json"
"""A saved student's metadata file (trainer/student/model.py CONFIG_FILE): its config and target shapes."""


@dataclass(frozen=True)
class Run:
    """A resolved training run (see the module docstring)."""

    config: RunConfig
    """The effective config: resolved model config, data.expect_fingerprints filled; saved with checkpoints."""
    distill: bool
    """Embedding losses on (stage PT and train.distill)."""
    targets: dict[str, TeacherSpec]
    """Teachers distilled in this run -> their specs in the cache (the join reads these); {} = NTP only."""
    target_shapes: dict[str, tuple[int, int]]
    """Every task head's target shape (T, D), distilled or not (IFT keeps the PT heads)."""
    teacher_specs: dict[str, TeacherSpec]
    """Cache specs of the model's tasks (recorded in saved students)."""
    fingerprints: dict[str, str]
    """Fingerprints of `targets`, recorded in every checkpoint."""
    start_from: str
    """Model folder to load ('' = a new student from the model config)."""
    resume: str
    """Checkpoint folder to continue exactly ('' = a fresh run)."""
    tiny_student: str
    """Folder the tiny preset student must exist in ('' = no preset)."""


def resolve_run(config: RunConfig, *, given: Collection[str] | None = None) -> Run:
    """Resolve `config` (see the module docstring); user errors raise ConfigError naming the option."""
    resume = ""
    if config.train.resume:
        resume = str(checkpoint.find(config.train.resume))
        config = _resumed_config(config, resume, given)
    config, tiny = _apply_preset(config)
    tcfg, dcfg = config.train, config.data
    if tcfg.stage not in STAGE_LR:
        raise ConfigError(f"train.stage: unknown stage {tcfg.stage!r} (one of {tuple(STAGE_LR)})")
    if tcfg.on_nonfinite not in ("stop", "skip"):
        raise ConfigError(f"train.on_nonfinite must be 'stop' or 'skip', not {tcfg.on_nonfinite!r}")
    if tcfg.keep_last < 0:  # here, not at the first checkpoint: that would have been written already
        raise ConfigError(f"train.keep_last: {tcfg.keep_last} (must be >= 0; 0 keeps every checkpoint)")
    distill = tcfg.distill and uses_embedding_losses(tcfg.stage)

    cache_specs: dict[str, TeacherSpec] = {}
    if dcfg.cache:
        cache = TargetCache(dcfg.cache, dict(dcfg.storage_options) or None)
        cache.check_specs(dcfg.expect_fingerprints)
        cache_specs = cache.specs()
    elif distill:
        raise ConfigError(
            "stage pt with distillation needs --cache (or --no-distill for the NTP-only baseline)"
        )

    start_from = (
        str(checkpoint.find(resume) / checkpoint.MODEL)
        if resume
        else (str(checkpoint.find(tcfg.init_from) / checkpoint.MODEL) if tcfg.init_from else "")
    )
    model_cfg, shapes = _model_config(config.model, start_from, cache_specs, distill, dcfg.cache)
    specs = {t: cache_specs[t] for t in model_cfg.tasks if t in cache_specs}
    targets = dict(specs) if distill else {}
    if distill and set(model_cfg.tasks) - set(targets):
        raise ConfigError(
            f"tasks {sorted(set(model_cfg.tasks) - set(targets))} have no targets in {dcfg.cache} "
            f"(its teachers: {sorted(cache_specs)})"
        )
    fingerprints = {t: s.fingerprint for t, s in targets.items()}
    dcfg = dataclasses.replace(dcfg, expect_fingerprints={**fingerprints, **dcfg.expect_fingerprints})
    effective = dataclasses.replace(
        config, model=model_cfg, data=dcfg, train=dataclasses.replace(tcfg, resume="")
    )
    return Run(
        config=effective,
        distill=distill,
        targets=targets,
        target_shapes=shapes,
        teacher_specs=specs,
        fingerprints=fingerprints,
        start_from=start_from,
        resume=resume,
        tiny_student=tiny,
    )


def _resumed_config(config: RunConfig, resume: str, given: Collection[str] | None) -> RunConfig:
    """The saved run's config with the given RESUMABLE options on top."""
    saved = from_dict(RunConfig, json.loads((Path(resume) / checkpoint.CONFIG).read_text()))
    default = TrainConfig()
    if given is None:
        given = {
            f"train.{name}" for name in RESUMABLE if getattr(config.train, name) != getattr(default, name)
        }
    else:
        refused = []
        for name in sorted(set(given) - {f"train.{n}" for n in RESUMABLE + ("resume",)}):
            section, _, field = name.partition(".")
            if getattr(getattr(config, section), field) != getattr(getattr(saved, section), field):
                refused.append(name)
        if refused:
            raise ConfigError(
                f"--resume {resume}: the saved run defines {', '.join(refused)}; a resume may only "
                f"change {', '.join('train.' + n for n in RESUMABLE)}"
            )
    changed = {name: getattr(config.train, name) for name in RESUMABLE if f"train.{name}" in given}
    return dataclasses.replace(saved, train=dataclasses.replace(saved.train, resume=resume, **changed))


def _apply_preset(config: RunConfig) -> tuple[RunConfig, str]:
    """`model.preset = 'tiny'` -> the student folders under OUT/tiny-student (built by the loop)."""
    preset = config.model.preset
    if not preset:
        return config, ""
    if preset != "tiny":
        raise ConfigError(f"model.preset: unknown preset {preset!r} (known: 'tiny')")
    folder = Path(config.train.out) / TINY_STUDENT_DIR
    model = dataclasses.replace(
        config.model, preset="", vision_model=str(folder / "vision"), llm=str(folder / "llm"), **TINY_HEADS
    )
    return dataclasses.replace(config, model=model), str(folder)


def _model_config(
    model_cfg: ModelConfig, start_from: str, cache_specs: dict[str, TeacherSpec], distill: bool, cache: str
) -> tuple[ModelConfig, dict[str, tuple[int, int]]]:
    """(model config, target shapes): a start checkpoint defines both; else the config and the cache do."""
    if start_from:
        meta = json.loads((Path(start_from) / MODEL_META).read_text())
        saved = from_dict(ModelConfig, meta["model_config"])
        shapes = {t: (int(s[0]), int(s[1])) for t, s in meta["target_shapes"].items()}
        return dataclasses.replace(saved, llava_checkpoint=start_from), shapes
    available = [t for t in model_cfg.tasks if t in cache_specs]
    if not available:
        if distill:
            raise ConfigError(
                f"stage pt with distillation: none of the configured tasks {list(model_cfg.tasks)} "
                f"has targets in {cache} (its teachers: {sorted(cache_specs)}); set --tasks to "
                "some of them, or --no-distill for the NTP-only baseline"
            )
        return dataclasses.replace(model_cfg, tasks=()), {}  # no targets at all: the plain LLaVA baseline
    missing = [t for t in model_cfg.tasks if t not in cache_specs]
    if missing:
        raise ConfigError(f"tasks {missing} have no targets in {cache} (its teachers: {sorted(cache_specs)})")
    return model_cfg, {t: tuple(cache_specs[t].shape) for t in model_cfg.tasks}
