"""The training loop: `train(RunConfig) -> summary`, one function, used by `ola train` and tests.

What one optimizer step does: `grad_accum` micro-batches from the loader (each
forward returns a dict of named loss terms and their sum `loss`), backward with
DDP gradient sync on the last micro-batch only, global-norm clipping, AdamW with
a linear warm-up + cosine learning rate computed from the step number, then
logging, the non-finite check and, every `save_every` steps, a checkpoint.

Design choices and their cost:
- Stages (PT / VPT / IFT) come from stages.py: freeze policy, parameter groups,
  default learning rates; the embedding losses run in PT only, and never with
  `distill=False` (the NTP-only baseline: same model, same data, same task
  tokens, no targets read at all).
- The learning rate is a pure function of the step, so a resumed run needs only
  the step number, the optimizer state, the RNG state and the loader state; on
  CPU the losses after a resume equal those of an uninterrupted run.
- The loss terms are read to the host once per step (`.item()` is a CPU-GPU
  sync point): the non-finite check needs them, and so does logging. Under DDP
  the check is all-reduced so that every rank stops (or skips) together.
- DDP runs with find_unused_parameters=True: a micro-batch without images leaves
  the projector without gradient. Cost: one graph traversal per backward.
- FSDP2 (`fully_shard` on every decoder block and on the root, which holds the
  vision tower: a separately sharded CLIP loses transformers' hidden-state capture)
  is for full fine-tuning of large LLMs; its checkpoints gather full weights to
  rank 0 (see checkpoint.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from olavlm.schemas.cache import TargetCache
from olavlm.schemas.config import RunConfig, TrainConfig, from_dict, to_dict

from . import checkpoint
from .collate import to_device
from .images import ImageTransform
from .loader import build_loader
from .stages import STAGE_LR, apply_stage, uses_embedding_losses

log = logging.getLogger(__name__)

TINY_HEADS = {"head_width": 32, "head_num_heads": 4, "head_ffn_mult": 2}
"""Head sizes of the tiny preset (the tests' student)."""


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or inf; the message names the step and the term."""


# -- setup --------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK: gloo on CPU, nccl on GPU. Plain python: one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local_rank}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return Dist(rank, world, local_rank, device)


def apply_preset(config: RunConfig) -> RunConfig:
    """Resolve `model.preset`: 'tiny' builds (once) a seeded tiny student under OUT/tiny-student."""
    preset = config.model.preset
    if not preset:
        return config
    if preset != "tiny":
        raise ValueError(f"unknown preset {preset!r} (known: 'tiny')")
    from .presets import build_tiny_student

    folder = Path(config.train.out) / "tiny-student"
    marker = folder / "tiny_student.json"
    if not marker.exists():
        if int(os.environ.get("RANK", "0")) == 0:
            build_tiny_student(folder, seed=0)
        if dist.is_initialized():
            dist.barrier()
    model = dataclasses.replace(config.model, preset="", vision_model=str(folder / "vision"), llm=str(folder / "llm"),
                                **TINY_HEADS)
    return dataclasses.replace(config, model=model)


def lr_factor(step: int, total: int, warmup_ratio: float) -> float:
    """Linear warm-up over warmup_ratio * total steps, then cosine decay to 0 (step counts from 0)."""
    warmup = max(1, math.ceil(warmup_ratio * total)) if warmup_ratio > 0 else 0
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _wrap(model, cfg: RunConfig, d: Dist):
    if cfg.train.fsdp:
        from torch.distributed.fsdp import fully_shard

        if not dist.is_initialized():  # FSDP2 needs a process group, even of one process
            import tempfile

            store = tempfile.mktemp(prefix="ola-fsdp-")
            dist.init_process_group("nccl" if d.device.type == "cuda" else "gloo", init_method=f"file://{store}",
                                    rank=0, world_size=1)
        # Scalars (the InfoNCE logit scales) cannot be sharded: kept whole on every rank, their
        # gradients are all-reduced by hand (`_sync_ignored`).
        ignored = {p for p in model.parameters() if p.ndim == 0}
        for block in model.llava.model.language_model.layers:
            fully_shard(block)
        fully_shard(model, ignored_params=ignored)
        return model
    if d.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[d.device.index] if d.device.type == "cuda" else None,
                                       find_unused_parameters=True)
    return model


def _param_groups(model, tcfg: TrainConfig, distill: bool) -> list[dict]:
    """The stage's trainable parameter groups; without distillation the heads and temperatures are
    frozen (they would get no gradient, which DDP treats as an error)."""
    groups = apply_stage(model, tcfg.stage, lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    if not distill:
        for group in [g for g in groups if g["name"] in ("heads", "logit_scales")]:
            for p in group["params"]:
                p.requires_grad_(False)
            groups.remove(group)
    for group in groups:
        group["base_lr"] = group["lr"]
    return groups


def _sync_ignored(model) -> None:
    """FSDP2 leaves scalar parameters out of its gradient reduction: average their gradients here."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    for p in model.parameters():
        if p.ndim == 0 and p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= dist.get_world_size()


def _full_states(model, optimizer) -> tuple[dict | None, dict]:
    """(full model state dict or None when the model is plain/DDP, full optimizer state dict keyed by names)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    optim = get_optimizer_state_dict(model, optimizer, options=options)
    full_model = get_model_state_dict(model, options=options) if _is_fsdp(model) else None
    return full_model, optim


def _is_fsdp(model) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


# -- the loop -----------------------------------------------------------------------------------
def train(config: RunConfig) -> dict:
    """Run (or resume) training as `config` says; returns a summary with the per-step history.

    Summary: {"step", "checkpoint", "history": [{"step", "keys", <loss terms>, "lr"}], "fingerprints"}.
    """
    d = init_distributed()
    resumed = None
    if config.train.resume:
        resumed = checkpoint.load(config.train.resume)
        saved = from_dict(RunConfig, resumed["config"])
        # The saved run defines everything but how far to go and where to write (when given).
        default = TrainConfig()
        given = {name: getattr(config.train, name) for name in ("steps", "out", "save_every", "log_every")
                 if getattr(config.train, name) != getattr(default, name)}
        config = dataclasses.replace(saved, train=dataclasses.replace(saved.train, resume=config.train.resume,
                                                                      **given))
    config = apply_preset(config)
    tcfg, dcfg = config.train, config.data
    if tcfg.stage not in STAGE_LR:
        raise ValueError(f"unknown stage {tcfg.stage!r} (one of {tuple(STAGE_LR)})")
    if tcfg.on_nonfinite not in ("stop", "skip"):
        raise ValueError(f"on_nonfinite must be 'stop' or 'skip', not {tcfg.on_nonfinite!r}")
    distill = tcfg.distill and uses_embedding_losses(tcfg.stage)

    # Teacher specs: target shapes for the heads, fingerprints for the join.
    specs = {}
    if dcfg.cache:
        cache = TargetCache(dcfg.cache)
        cache.check_specs(dcfg.expect_fingerprints)
        specs = {t: s for t, s in cache.specs().items() if t in config.model.tasks}
    elif distill:
        raise ValueError("stage pt with distillation needs --cache (or --no-distill for the NTP-only baseline)")

    # The model: a checkpoint to resume, a checkpoint to start from (IFT after PT), or a new student.
    from .model import OlaVlm

    torch.manual_seed(tcfg.seed)
    model_cfg = config.model
    start_from = str(resumed["model"]) if resumed else (
        str(checkpoint.find(tcfg.init_from) / checkpoint.MODEL) if tcfg.init_from else "")
    if start_from:  # the checkpoint's tasks and target shapes define its heads
        from .model import CONFIG_FILE

        meta = json.loads((Path(start_from) / CONFIG_FILE).read_text())
        model_cfg = dataclasses.replace(model_cfg, llava_checkpoint=start_from,
                                        tasks=tuple(meta["model_config"]["tasks"]))
        shapes = {t: tuple(s) for t, s in meta["target_shapes"].items()}
        specs = {t: specs.get(t, shape) for t, shape in shapes.items()}
    elif not specs:  # no cache and no checkpoint: a student without task tokens (the plain LLaVA baseline)
        model_cfg = dataclasses.replace(model_cfg, tasks=())
    model = OlaVlm.from_config(model_cfg, specs)
    if start_from:  # the checkpoint defines the model; keep its config
        model_cfg = dataclasses.replace(model.config, llava_checkpoint=model_cfg.llava_checkpoint)
    if distill and set(model.layout.tasks) - set(specs):
        raise ValueError(f"tasks {sorted(set(model.layout.tasks) - set(specs))} have no targets in {dcfg.cache}")
    groups = _param_groups(model, tcfg, distill)
    model.to(d.device)
    wrapped = _wrap(model, config, d)
    if tcfg.fsdp:  # fully_shard replaced the parameters (same names): take the groups again
        groups = _param_groups(model, tcfg, distill)
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8,
                                  fused=d.device.type == "cuda")

    # The data.
    transform = ImageTransform.from_processor(model.image_processor)
    tasks = tuple(model.layout.tasks) if distill else ()
    if set(tasks) - set(k for k, v in specs.items() if hasattr(v, "fingerprint")):
        raise ValueError(f"distilling {list(tasks)} needs their targets in --cache")
    fingerprints = {t: specs[t].fingerprint for t in tasks}
    dcfg = dataclasses.replace(dcfg, expect_fingerprints={**fingerprints, **dcfg.expect_fingerprints})
    step, loader_state = 0, None
    if resumed:
        step = resumed["step"]
        states = resumed["trainer"]["loader"]
        if len(states) != d.world:
            raise ValueError(f"{resumed['path']} was written by {len(states)} ranks, this run has {d.world}: "
                             "an exact resume needs the same world size")
        loader_state = states[d.rank]
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(wrapped, optimizer, resumed["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
        checkpoint.set_rng_state(resumed["trainer"]["rng"][d.rank])
    loader = build_loader(dcfg, tokenizer=model.tokenizer, layout=model.layout, transform=transform, tasks=tasks,
                          rank=d.rank, world=d.world, state=loader_state, pin_memory=d.device.type == "cuda")
    effective = dataclasses.replace(config, model=model_cfg, data=dcfg,
                                    train=dataclasses.replace(tcfg, resume="", init_from=tcfg.init_from))

    out = Path(tcfg.out)
    metrics_file = tensorboard = bar = None
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(to_dict(effective), indent=2, sort_keys=True))
        metrics_file = open(out / "metrics.jsonl", "a")
        if tcfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise ValueError("--tensorboard needs the `tensorboard` package (pip install tensorboard)") from exc
            tensorboard = SummaryWriter(str(out / "tensorboard"))
        from tqdm import tqdm

        bar = tqdm(total=tcfg.steps, initial=step, desc=f"train {tcfg.stage}", unit="step", dynamic_ncols=True)

    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if tcfg.bf16 and d.device.type == "cuda"
                else contextlib.nullcontext())
    history: list[dict] = []
    last_checkpoint = str(resumed["path"]) if resumed else ""
    batches = iter(loader)
    state = loader_state or {"epoch": 0, "batch": 0, "skipped": {}}
    started, start_step = time.perf_counter(), step
    wrapped.train()

    def save(at: int) -> str:
        full_model, optim = _full_states(wrapped, optimizer)
        loader_states = _gather(state, d)
        rng_states = _gather(checkpoint.rng_state(), d)
        path = ""
        if d.main:
            def save_model(path):
                if full_model is None:
                    model.save_pretrained(path)
                else:  # FSDP2: a CPU copy with the gathered full weights
                    copy = OlaVlm.from_config(dataclasses.replace(model_cfg), specs)
                    copy.load_state_dict(full_model)
                    copy.save_pretrained(path)
            path = str(checkpoint.save(out, at, save_model=save_model, optimizer_full=optim,
                                       loader_states=loader_states, rng_states=rng_states,
                                       config=to_dict(effective), fingerprints=fingerprints))
        if dist.is_initialized():
            dist.barrier()
        return path

    try:
        while step < tcfg.steps:
            t0 = time.perf_counter()
            sums: dict[str, torch.Tensor] = {}
            keys, samples, tokens = [], 0, 0
            factor = lr_factor(step, tcfg.steps, tcfg.warmup_ratio)
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * factor
            for micro in range(tcfg.grad_accum):
                batch, state = next(batches)
                keys.extend(batch["keys"])
                samples += len(batch["keys"])
                tokens += int(batch["attention_mask"].sum())  # CPU tensor: no device sync
                batch = to_device(batch, d.device)
                sync = micro == tcfg.grad_accum - 1 or not hasattr(wrapped, "no_sync")
                with (contextlib.nullcontext() if sync else wrapped.no_sync()), autocast:
                    losses = wrapped(batch, distill=distill)
                    (losses["loss"] / tcfg.grad_accum).backward()
                for name, value in losses.items():
                    sums[name] = sums.get(name, 0.0) + value.detach().float() / tcfg.grad_accum
            names = list(sums)
            values = torch.stack([sums[n] for n in names])
            bad = (~torch.isfinite(values)).any().float()
            if dist.is_initialized():
                dist.all_reduce(bad)  # every rank stops or skips together
            host = values.tolist()  # .tolist() is a CPU-GPU sync point, once per step
            if bad.item() > 0:
                term = next((n for n, v in zip(names, host) if not math.isfinite(v)), "on another rank")
                message = (f"step {step + 1}: loss term {term!r} is not finite "
                           f"({dict(zip(names, host))}); last good checkpoint: {last_checkpoint or 'none'}")
                if tcfg.on_nonfinite == "stop":
                    raise NonFiniteLossError(message)
                log.warning("%s; step skipped", message)
                optimizer.zero_grad(set_to_none=True)
                step += 1
                continue
            if tcfg.fsdp:
                _sync_ignored(wrapped)
            grad_norm = None
            trainable = [p for g in optimizer.param_groups for p in g["params"]]
            if tcfg.grad_clip > 0:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, tcfg.grad_clip))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            elapsed = time.perf_counter() - t0
            record = {"step": step, **dict(zip(names, host)), "lr": optimizer.param_groups[0]["lr"],
                      "grad_norm": grad_norm, "samples_per_s": samples * d.world / elapsed,
                      "tokens_per_s": tokens * d.world / elapsed, "epoch": state["epoch"],
                      "skipped": state["skipped"]}
            done = step - start_step
            record["eta_s"] = (time.perf_counter() - started) / done * (tcfg.steps - step)
            history.append({**record, "keys": keys})
            if d.main:
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", sps=f"{record['samples_per_s']:.1f}")
                if step % tcfg.log_every == 0 or step == tcfg.steps:
                    metrics_file.write(json.dumps(record) + "\n")
                    metrics_file.flush()
                    if tensorboard is not None:
                        for name in names + ["lr", "samples_per_s", "tokens_per_s"]:
                            tensorboard.add_scalar(f"train/{name}", record[name], step)
            if step % tcfg.save_every == 0 or step == tcfg.steps:
                last_checkpoint = save(step) or last_checkpoint
    finally:
        if bar is not None:
            bar.close()
        if metrics_file is not None:
            metrics_file.close()
        if tensorboard is not None:
            tensorboard.close()
    return {"step": step, "checkpoint": last_checkpoint, "history": history, "fingerprints": fingerprints,
            "out": str(out)}


def _gather(obj, d: Dist) -> list:
    if not dist.is_initialized() or d.world == 1:
        return [obj]
    out = [None] * d.world
    dist.all_gather_object(out, obj)
    return out
