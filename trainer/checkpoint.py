"""Checkpoints: one folder per saved step, safe formats only, written atomically.

OUT/checkpoints/step-NNNNNNNN/ holds model/ (student/build.py), the AdamW state (optimizer.safetensors
or optimizer/ shards), trainer.json (step, param groups, loader and RNG state per rank, teacher
fingerprints) and config.json; LATEST names the newest. `save_state` (every rank) picks the layout:
trainable-only when most weights are frozen (PT) unless `train.save_frozen`, sharded under FSDP2
(each rank writes its shards; any process count reads them), else plain (rank 0 writes). Loaders go
through `model_dir` and `build.load_student`. Design choice: a folder is written under a temporary
name and renamed into place, LATEST after it, so a crash leaves the previous checkpoint intact and
findable. Cost: a sharded save needs a staging folder every rank sees.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import time
from pathlib import Path

import torch

from olavlm.schemas.errors import OlaError
from olavlm.trainer.atomic import atomic_dir
from olavlm.trainer.parallel import full_optimizer_state, full_tensors, gather, is_fsdp
from olavlm.trainer.student.build import (
    BASE_KEY,
    CONFIG_FILE,
    overlay_names,
    save_student,
    trainable_only_default,
)
from olavlm.trainer.student.sharded import aliases, broadcast, load_sharded, save_sharded, without_aliases

CHECKPOINTS = "checkpoints"
LATEST = "LATEST"
MODEL = "model"
OPTIMIZER = "optimizer.safetensors"
OPTIMIZER_SHARDS = "optimizer"
SHARDS = "shards"
TRAINER = "trainer.json"
CONFIG = "config.json"
STEP_NAME = re.compile(r"step-(\d{8,})")


class CheckpointError(OlaError, RuntimeError):
    """Raised on the other ranks when rank 0 failed to write a checkpoint (rank 0 raises the cause)."""


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def find(path: str | Path) -> Path:
    """A checkpoint folder, or a run folder / its checkpoints folder -> its latest checkpoint."""
    path = Path(path)
    if (path / TRAINER).exists():
        return path
    for base in (path / CHECKPOINTS, path):
        if (base / LATEST).exists():
            found = base / (base / LATEST).read_text().strip()
            if (found / TRAINER).exists():
                return found
        # LATEST missing or dangling (a crash between a checkpoint's renames): the newest complete step
        complete = sorted(p for p in base.glob("step-*") if (p / TRAINER).exists()) if base.is_dir() else []
        if complete:
            return complete[-1]
    raise FileNotFoundError(f"{path}: no checkpoint here (expected {TRAINER}, or {CHECKPOINTS}/{LATEST})")


def latest_and_done(out: str | Path, steps: int) -> tuple[str, bool]:
    """A run folder's latest checkpoint ('' if none) and whether it reached `steps`: what a driver that
    trains, resumes or skips a run needs (the demo, `ola bench fidelity`)."""
    try:
        found = find(out)
    except FileNotFoundError:
        return "", False
    return str(found), json.loads((found / TRAINER).read_text())["step"] >= steps


def model_dir(path: str | Path) -> Path:
    """An OlaVlm model folder as given, or a checkpoint / run folder -> its (latest) model folder.

    Anything else (e.g. an exported plain LLaVA folder) is returned unchanged.
    """
    path = Path(path)
    if (path / "olavlm.json").exists():
        return path
    try:
        return find(path) / MODEL
    except FileNotFoundError:
        return path


# -- RNG ------------------------------------------------------------------------------------------
def rng_state() -> dict:
    """Torch CPU (and current CUDA device) generator states, base64 in JSON."""
    state = {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
    return state


def set_rng_state(state: dict) -> None:
    def tensor(text: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)

    torch.set_rng_state(tensor(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensor(state["cuda"]))


# -- optimizer ------------------------------------------------------------------------------------
def optimizer_tensors(state: dict) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """A full optimizer state dict keyed by parameter names -> (flat tensors, JSON-able param groups)."""
    tensors = {}
    for name, entry in state["state"].items():
        for key, value in entry.items():
            value = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            tensors[f"{name}/{key}"] = value.detach().cpu().contiguous()
    return tensors, json.loads(json.dumps(state["param_groups"]))


def optimizer_state(tensors: dict[str, torch.Tensor], groups: list[dict]) -> dict:
    state: dict[str, dict] = {}
    for flat, value in tensors.items():
        name, key = flat.rsplit("/", 1)
        state.setdefault(name, {})[key] = value
    return {"state": state, "param_groups": groups}


# -- save / load ----------------------------------------------------------------------------------
def save(
    out: str | Path,
    step: int,
    *,
    save_model,
    optimizer_full: dict | None,
    loader_states: list[dict],
    rng_states: list[dict],
    config: dict,
    fingerprints: dict[str, str],
    keep_last: int = 0,
    param_groups: list[dict] | None = None,
    write_shards=None,
) -> Path:
    """Write checkpoint `step` under OUT/checkpoints atomically (call on rank 0 only).

    `save_model(path)` writes the model folder. `optimizer_full`: a full optimizer state dict, or None with
    `param_groups` and `write_shards(staging folder)`, which every rank calls (`save_state`). `keep_last` > 0:
    `prune` once LATEST names the new checkpoint.
    """
    from safetensors.torch import save_file

    base = Path(out) / CHECKPOINTS
    final = base / step_name(step)
    # atomic_dir: a rerun of the same step replaces the old folder by renames, never rmtree-then-write
    with atomic_dir(final) as tmp:
        save_model(tmp / MODEL)
        if optimizer_full is not None:
            tensors, groups = optimizer_tensors(optimizer_full)
            save_file(tensors, str(tmp / OPTIMIZER))
        else:
            groups = json.loads(json.dumps(param_groups))
        if write_shards is not None:
            write_shards(tmp)
        trainer = {
            "step": step,
            "param_groups": groups,
            "loader": loader_states,
            "rng": rng_states,
            "fingerprints": fingerprints,
            "time": time.time(),
        }
        (tmp / TRAINER).write_text(json.dumps(trainer, indent=1))
        (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
        for f in tmp.rglob("*"):  # data on disk before the rename makes it visible
            if f.is_file():
                with open(f, "rb") as handle:
                    os.fsync(handle.fileno())
    latest_tmp = base / f".{LATEST}.tmp-{os.getpid()}"
    latest_tmp.write_text(final.name)
    os.replace(latest_tmp, base / LATEST)
    if keep_last:
        prune(out, keep_last)
    return final


def remove_leftovers(out: str | Path) -> list[Path]:
    """Remove what killed saves left under OUT/checkpoints (a staging folder, a folder being pruned, LATEST's
    temporary file: a checkpoint's size each); a run calls it on rank 0 before its first save."""
    stale = [*(Path(out) / CHECKPOINTS).glob(".*.tmp-*"), *(Path(out) / CHECKPOINTS).glob(".*.removing-*")]
    for path in stale:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return stale


def prune(out: str | Path, keep_last: int) -> list[Path]:
    """Remove the complete `step-*` folders of OUT/checkpoints older than its newest `keep_last`; returns them.

    Never the one LATEST names, a staging or newer folder, or a kept trainable-only one's frozen base; a
    folder is renamed aside before it is deleted, so `find` never picks a half-deleted one.
    """
    from olavlm.schemas.errors import ConfigError

    if keep_last < 0:
        raise ConfigError(f"train.keep_last: {keep_last} (must be >= 0; 0 keeps every checkpoint)")
    base = Path(out) / CHECKPOINTS
    if keep_last == 0 or not (base / LATEST).exists():
        return []
    latest = (base / LATEST).read_text().strip()
    if not (latest_match := STEP_NAME.fullmatch(latest)):
        return []
    latest_step = int(latest_match.group(1))
    steps = sorted(
        (int(m.group(1)), p)
        for p in base.iterdir()
        if (m := STEP_NAME.fullmatch(p.name))
        and p.is_dir()
        and not p.is_symlink()
        and (p / TRAINER).exists()
        and int(m.group(1)) <= latest_step
    )
    needed = {name for _, kept in steps[-keep_last:] if (name := _frozen_base_step(kept, base))}
    removed = []
    for _, old in steps[:-keep_last]:
        if old.name == latest or old.name in needed:
            continue
        aside = base / f".{old.name}.removing-{os.getpid()}"
        os.replace(old, aside)
        shutil.rmtree(aside, ignore_errors=True)
        removed.append(old)
    return removed


def _frozen_base_step(step: Path, base: Path) -> str | None:
    """The name of the checkpoint folder under `base` that the trainable-only checkpoint `step` records as its
    frozen base (a PT run resumed from a full checkpoint of its own OUT), or None."""
    try:
        meta = json.loads((step / MODEL / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return None
    source = (meta.get(BASE_KEY) or {}).get("source", {}).get("llava_checkpoint")
    if not source:
        return None
    source, base = Path(source).resolve(), base.resolve()
    return source.relative_to(base).parts[0] if source.is_relative_to(base) and source != base else None


def load(path: str | Path) -> dict:
    """{"path", "step", "trainer" (trainer.json), "config" (dict), "optimizer" (full state dict, or None when
    sharded: `restore_optimizer` reads it), "model"}."""
    from safetensors.torch import load_file

    path = find(path)
    trainer = json.loads((path / TRAINER).read_text())
    config = json.loads((path / CONFIG).read_text())
    optimizer = (
        optimizer_state(load_file(str(path / OPTIMIZER)), trainer["param_groups"])
        if (path / OPTIMIZER).exists()
        else None
    )
    return {
        "path": path,
        "step": trainer["step"],
        "trainer": trainer,
        "config": config,
        "optimizer": optimizer,
        "model": path / MODEL,
    }


# -- every rank: the training state, sharded under FSDP2 ---------------------------------------------
def save_state(
    out: str | Path,
    step: int,
    model,
    wrapped,
    optimizer,
    d,
    *,
    save_frozen: bool,
    keep_last: int,
    loader_state: dict,
    config: dict,
    fingerprints: dict[str, str],
) -> str:
    """Checkpoint `step` of a process group in the layout the module docstring names (every rank calls
    it; `d`: parallel.Dist); its path on rank 0, '' elsewhere."""
    trainable_only = not save_frozen and trainable_only_default(model)
    sharded = not trainable_only and is_fsdp(model)
    phase = ["before"]  # the sharded layout: how far rank 0 got ("before", "shards", "after" its shards)
    loader_states = gather(loader_state, d)
    rng_states = gather(rng_state(), d)
    options = {}
    if sharded:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        model_state = without_aliases(model.state_dict(), model)  # DTensors: this rank's shards
        optim = get_optimizer_state_dict(wrapped, optimizer)  # sharded too
        optim_tensors = without_aliases(
            {
                f"{name}/{key}": value
                for name, entry in optim["state"].items()
                for key, value in entry.items()
            },
            model,
        )

        def write_shards(tmp):
            staging = broadcast(str(tmp) if tmp is not None else None)
            if staging is None:  # rank 0 failed before its staging folder existed (it raises the cause)
                raise CheckpointError(f"checkpoint {step_name(step)}: rank 0 failed before writing shards")
            phase[0] = "shards"  # from here every failure is raised on every rank (dcp.save, save_sharded)
            save_sharded(Path(staging) / MODEL / SHARDS, model_state)
            save_sharded(Path(staging) / OPTIMIZER_SHARDS, optim_tensors)
            phase[0] = "after"

        def save_model(path):
            save_student(model, path, sharded=True)

        options = {
            "optimizer_full": None,
            "param_groups": optim["param_groups"],
            "write_shards": write_shards,
        }
    else:
        optim = full_optimizer_state(wrapped, optimizer)
        tensors = full_tensors(model, overlay_names(model)) if trainable_only else None

        def save_model(path):
            save_student(model, path, trainable_only=trainable_only, tensors=tensors)

        options = {"optimizer_full": optim}
    # Rank 0 writes alone, but the other ranks wait for it in collectives (the sharded layout's staging
    # folder and shards, then the final status): a failure on rank 0 is broadcast so that they raise too
    # instead of waiting forever.
    path, failure = "", None
    if d.main:
        try:
            path = str(
                save(
                    out,
                    step,
                    save_model=save_model,
                    loader_states=loader_states,
                    rng_states=rng_states,
                    config=config,
                    fingerprints=fingerprints,
                    keep_last=keep_last,
                    **options,
                )
            )
        except Exception as exc:
            if sharded and phase[0] == "before":
                broadcast(None)  # the others wait for the staging folder's name: none comes
            if sharded and phase[0] != "after":
                raise  # before: the others raise on None; during the shards: every rank raised already
            failure = exc
    elif sharded:
        options["write_shards"](None)
    status = broadcast(f"{type(failure).__name__}: {failure}" if failure is not None else "")
    if failure is not None:
        raise failure
    if status:
        raise CheckpointError(f"checkpoint {step_name(step)}: rank 0 failed to write it ({status})")
    return path


def restore_optimizer(resumed: dict, wrapped, optimizer) -> None:
    """Put a loaded checkpoint's (`load`) AdamW state into `optimizer` of `wrapped` (plain, DDP or FSDP2, any
    number of processes, whatever layout it was saved in; a collective under FSDP2)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    if resumed["optimizer"] is not None:
        set_optimizer_state_dict(
            wrapped, optimizer, resumed["optimizer"], options=StateDictOptions(full_state_dict=True)
        )
        return
    # sharded: this rank's part of every state tensor, in the layout of the current sharding (initialised
    # by get_optimizer_state_dict), is read from the shard files whatever the saving world size was
    current = get_optimizer_state_dict(wrapped, optimizer)
    tensors = {
        f"{name}/{key}": value for name, entry in current["state"].items() for key, value in entry.items()
    }
    load_sharded(
        resumed["path"] / OPTIMIZER_SHARDS,
        without_aliases(tensors, wrapped),
        files=len(resumed["trainer"]["rng"]),
    )  # one RNG state per saving rank
    for alias, first in aliases(wrapped).items():  # a tied parameter's state, saved under its first name
        for key in [k for k in tensors if k.rsplit("/", 1)[0] == alias]:
            tensors[key] = tensors[f"{first}/{key.rsplit('/', 1)[1]}"]
    state = optimizer_state(tensors, resumed["trainer"]["param_groups"])
    set_optimizer_state_dict(wrapped, optimizer, state)
