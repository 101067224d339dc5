"""`resolve_run(config) -> Run`: everything the loop needs decided before a weight is loaded.

A `RunConfig` says what the user asked for; a `Run` what will happen: the config merged with a
resumed checkpoint's (`Run.config`, saved as config.json), the tiny preset's folders, the start
checkpoint's model config, the distilled teachers and their target shapes, the fingerprints the
data path requires. On resume only `RESUMABLE` options may change; another given option that
differs from the saved (effective) value is refused, naming both, and OUT is the resumed run's own
folder unless given. Design choice: pure, reading small JSON files only, so every refusal comes
before minutes of model loading. Cost: the tiny preset's folder is named here but built by the
loop (`ensure_tiny_student`).
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
"""A saved student's metadata file (trainer/student/build.py CONFIG_FILE): its config and target shapes."""


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
    if not start_from:  # a start checkpoint's layers were checked when it was built
        _check_layers(model_cfg)
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
    """The saved run's config with the given RESUMABLE options on top; OUT is the resumed run's folder
    unless --out is given (never the folder recorded in the saved config: the run may have been copied)."""
    saved = from_dict(RunConfig, json.loads((Path(resume) / checkpoint.CONFIG).read_text()))
    default = TrainConfig()
    if given is None:
        given = {
            f"train.{name}" for name in RESUMABLE if getattr(config.train, name) != getattr(default, name)
        }
    else:
        _refuse_changes(config, saved, given, resume)
    changed = {name: getattr(config.train, name) for name in RESUMABLE if f"train.{name}" in given}
    changed.setdefault("out", _run_folder(resume))
    _refuse_foreign_out(changed["out"], resume)
    return dataclasses.replace(saved, train=dataclasses.replace(saved.train, resume=resume, **changed))


def _refuse_changes(config: RunConfig, saved: RunConfig, given: Collection[str], resume: str) -> None:
    """A given option outside RESUMABLE must equal the saved run's effective value: re-running the command
    that started the run (its config file, its --preset) with --resume is accepted."""
    mine, _ = _apply_preset(  # the folders it names are compared by preset name below, not by path
        dataclasses.replace(config, train=dataclasses.replace(config.train, out=saved.train.out))
    )
    refused = []
    for name in sorted(set(given) - {f"train.{n}" for n in RESUMABLE + ("resume",)}):
        section, _, field = name.partition(".")
        old, new = getattr(getattr(saved, section), field), getattr(getattr(mine, section), field)
        if name == "model.preset":
            old, new = _preset_of(saved.model), config.model.preset
        if old != new:
            refused.append(f"{name} (saved {old!r}, given {new!r})")
    if refused:
        raise ConfigError(
            f"--resume {resume}: the saved run defines {'; '.join(refused)}; a resume may only "
            f"change {', '.join('train.' + n for n in RESUMABLE)}"
        )


def _preset_of(model: ModelConfig) -> str:
    """The preset a saved (resolved) model config was made from: 'tiny' for the tiny student's folders and
    heads, else ''."""
    tiny = all(Path(p).parent.name == TINY_STUDENT_DIR for p in (model.vision_model, model.llm))
    return "tiny" if tiny and all(getattr(model, k) == v for k, v in TINY_HEADS.items()) else ""


def _run_folder(resume: str) -> str:
    """OUT of the checkpoint OUT/checkpoints/step-N being resumed."""
    step = Path(resume)
    if step.parent.name != checkpoint.CHECKPOINTS:
        raise ConfigError(
            f"--resume {resume}: not in a run folder (RUN/{checkpoint.CHECKPOINTS}/step-N); "
            "give --out for the resumed run"
        )
    return str(step.parent.parent)


def _refuse_foreign_out(out: str, resume: str) -> None:
    """Writing (and pruning, keep_last) in another run's checkpoints folder is refused."""
    if Path(out).resolve() == Path(resume).parent.parent.resolve():
        return
    try:
        other = checkpoint.find(out)
    except FileNotFoundError:
        return
    raise ConfigError(
        f"--resume {resume} would write into train.out {out}, which holds another run's checkpoints "
        f"({other.name}): resume into the run's own folder ({Path(resume).parent.parent}) or a new --out"
    )


def _llm_depth(model: ModelConfig) -> tuple[int, str] | None:
    """(number of LLM layers, the config.json it was read from) when a local folder or the hub cache
    holds the LLM's config.json (nothing is downloaded); None otherwise."""
    path = Path(model.llm) / "config.json"
    try:
        if model.llm and not Path(model.llm).exists():  # a hub id: its cached config.json, if any
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(model.llm, "config.json")
            path = Path(cached) if isinstance(cached, str) else path
        meta = json.loads(path.read_text())
    except Exception:  # noqa: BLE001 - unknown here (not a repo id, not cached, not JSON): the build checks
        return None
    depth = meta.get("num_hidden_layers") or meta.get("text_config", {}).get("num_hidden_layers")
    return (int(depth), str(path)) if depth else None


def _check_layers(model: ModelConfig) -> None:
    """model.layers within the LLM's 1..depth, before minutes of model loading (when the depth is known)."""
    known = _llm_depth(model) if model.layers else None
    if known is None:
        return
    depth, source = known
    bad = {t: [n for n in v if not 1 <= n <= depth] for t, v in model.layers.items()}
    bad = {t: v for t, v in bad.items() if v}
    if bad:
        raise ConfigError(
            f"model.layers: {bad} outside the LLM's layers 1..{depth} ({source}; paper numbering: layer i = "
            "hidden_states[i])"
        )


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
