"""Checkpoints: one folder per saved step, safe formats only, written atomically.

    OUT/checkpoints/step-00000100/
        model/                    OlaVlm folder (build.py): LLaVA safetensors + extras + JSON + tokenizer,
                                  or, trainable-only, the trained tensors + a hashed frozen-base reference
        optimizer.safetensors     AdamW state tensors, keyed "<parameter name>/<state name>"
        trainer.json              step, optimizer param groups, loader state per rank, RNG per rank,
                                  teacher fingerprints, time
        config.json               the effective RunConfig (what `--config` would need to reproduce it)
    OUT/checkpoints/LATEST        name of the newest complete checkpoint

Trainable-only saves: when most parameters are frozen (PT) and `train.save_frozen`
is off, the model folder holds only the trainable tensors (and any frozen one that
left the base), the extras, config, tokenizer and image processor, plus a reference
to the frozen base (the ModelConfig it is built from and a sampled hash, build.py);
everything that loads a checkpoint (`--resume`, `--init-from`, probe, eval,
generate, `ola export`) goes through `build.load_student`, which rebuilds the base,
checks the hash and overlays the tensors. Under FSDP2 only those tensors are
gathered. Measured on the tiny test student (PT, 1 step): checkpoint 2,257,213 B
full -> 1,023,089 B (model weights 1,559,420 -> 319,868 B); for CLIP-L + Llama-3-8B
(meta-device counts, bench/heads.py): 8.47 B parameters, 131.6 M trainable in PT:
33.9 GB of fp32 weights -> 0.53 GB, plus 1.05 GB of AdamW state either way.

`train.keep_last` N > 0: once LATEST names a new checkpoint, the complete `step-*`
folders older than the newest N are removed (never the one LATEST names, nor a
staging or newer folder, nor anything outside OUT/checkpoints).

The folder is written under a temporary name and renamed into place, and LATEST
is replaced after it, so a crash at any moment leaves the previous checkpoint
intact and findable. Optimizer state is taken as a full (unsharded, CPU) state
dict keyed by parameter names (torch.distributed.checkpoint.state_dict), so the
same files serve a plain, DDP or FSDP2 model. Cost: with FSDP2 rank 0 holds one
full copy of the weights and optimizer state in CPU memory while saving.
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

from .atomic import atomic_dir

CHECKPOINTS = "checkpoints"
LATEST = "LATEST"
MODEL = "model"
OPTIMIZER = "optimizer.safetensors"
TRAINER = "trainer.json"
CONFIG = "config.json"
STEP_NAME = re.compile(r"step-(\d{8,})")


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
def save(out: str | Path, step: int, *, save_model, optimizer_full: dict, loader_states: list[dict],
         rng_states: list[dict], config: dict, fingerprints: dict[str, str], keep_last: int = 0) -> Path:
    """Write checkpoint `step` under OUT/checkpoints atomically (call on rank 0 only).

    `save_model(path)` writes the model folder (OlaVlm.save_pretrained or an equivalent).
    `keep_last` > 0: once LATEST names the new checkpoint, `prune` the older ones.
    """
    from safetensors.torch import save_file

    base = Path(out) / CHECKPOINTS
    final = base / step_name(step)
    # atomic_dir: a rerun of the same step replaces the old folder by renames, never rmtree-then-write
    with atomic_dir(final) as tmp:
        save_model(tmp / MODEL)
        tensors, groups = optimizer_tensors(optimizer_full)
        save_file(tensors, str(tmp / OPTIMIZER))
        trainer = {"step": step, "param_groups": groups, "loader": loader_states, "rng": rng_states,
                   "fingerprints": fingerprints, "time": time.time()}
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


def prune(out: str | Path, keep_last: int) -> list[Path]:
    """Remove the `step-*` folders of OUT/checkpoints older than its newest `keep_last`; returns those removed.

    Only complete checkpoints named exactly `step-<8 digits>` directly under OUT/checkpoints are
    candidates, and only those older than the one LATEST names, which is never removed: staging
    folders (`.step-*.tmp-*`), a folder being written and anything newer than LATEST stay. A folder
    is renamed aside first and then deleted, so a crash mid-delete leaves no half checkpoint that
    `find` could pick.
    """
    from olavlm.schemas.errors import ConfigError

    if keep_last < 0:
        raise ConfigError(f"train.keep_last: {keep_last} (must be >= 0; 0 keeps every checkpoint)")
    base = Path(out) / CHECKPOINTS
    if keep_last == 0 or not (base / LATEST).exists():
        return []
    latest = (base / LATEST).read_text().strip()
    if not STEP_NAME.fullmatch(latest):
        return []
    latest_step = int(STEP_NAME.fullmatch(latest).group(1))
    steps = sorted((int(m.group(1)), p) for p in base.iterdir() if (m := STEP_NAME.fullmatch(p.name))
                   and p.is_dir() and not p.is_symlink() and (p / TRAINER).exists() and int(m.group(1)) <= latest_step)
    removed = []
    for _, old in steps[:-keep_last]:
        if old.name == latest:
            continue
        aside = base / f".{old.name}.removing-{os.getpid()}"
        os.replace(old, aside)
        shutil.rmtree(aside, ignore_errors=True)
        removed.append(old)
    return removed


def load(path: str | Path) -> dict:
    """{"path", "step", "trainer" (trainer.json), "config" (dict), "optimizer" (full state dict)}."""
    from safetensors.torch import load_file

    path = find(path)
    trainer = json.loads((path / TRAINER).read_text())
    config = json.loads((path / CONFIG).read_text())
    optimizer = optimizer_state(load_file(str(path / OPTIMIZER)), trainer["param_groups"])
    return {"path": path, "step": trainer["step"], "trainer": trainer, "config": config, "optimizer": optimizer,
            "model": path / MODEL}
