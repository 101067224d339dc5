"""The training loop: `train(RunConfig) -> summary`, used by `ola train`, the demo and tests.

One optimizer step: `grad_accum` micro-batches, their label tokens and images counted over all
ranks (losses.py normalises by these, so the gradient is one big batch's), forward and backward
each (DDP syncs on the last), clipping, AdamW with warm-up + cosine, logging, the non-finite check
and every `save_every` steps a checkpoint. Stages come from freeze.py; the embedding losses run in
PT unless `distill=False` (the NTP-only baseline). Design choice: the learning rate is a pure
function of the step, so a resume needs only the step and the optimizer, RNG and loader states.
Cost: the loss terms reach the host once per step (a sync point, shared with the check).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from olavlm.schemas.config import RunConfig, TrainConfig, to_dict
from olavlm.schemas.errors import ConfigError, OlaError
from olavlm.trainer import checkpoint
from olavlm.trainer.data.collate import to_device
from olavlm.trainer.data.images import ImageTransform, resolve_aspect_ratio, with_aspect_ratio
from olavlm.trainer.data.loader import build_loader
from olavlm.trainer.data.loader_state import rank_state
from olavlm.trainer.freeze import apply_stage
from olavlm.trainer.metrics import METRICS, Metrics
from olavlm.trainer.parallel import Dist, init_distributed, sync_ignored, wrap
from olavlm.trainer.run import Run, resolve_run
from olavlm.trainer.student.build import build_student
from olavlm.trainer.student.losses import Normalisers
from olavlm.trainer.student.presets import TINY_MARKER

log = logging.getLogger(__name__)


class NonFiniteLossError(OlaError, FloatingPointError):
    """A loss term became NaN or inf; the message names the step and the term."""


def read_metrics(out: str | Path) -> list[dict]:
    """The records a run wrote to OUT/metrics.jsonl (one per logged step, in order)."""
    path = Path(out) / METRICS
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def lr_factor(step: int, total: int, warmup_ratio: float) -> float:
    """Linear warm-up over warmup_ratio * total steps, then cosine decay to 0 (step counts from 0)."""
    warmup = max(1, math.ceil(warmup_ratio * total)) if warmup_ratio > 0 else 0
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _param_groups(model, tcfg: TrainConfig, distill: bool) -> list[dict]:
    """The stage's trainable parameter groups; without distillation the heads and temperatures are
    frozen (they would get no gradient, which DDP treats as an error)."""
    groups = apply_stage(
        model, tcfg.stage, lr=tcfg.lr, weight_decay=tcfg.weight_decay, unfreeze_vision=tcfg.unfreeze_vision
    )
    if not distill:
        for group in [g for g in groups if g["name"] in ("heads", "logit_scales")]:
            for p in group["params"]:
                p.requires_grad_(False)
            groups.remove(group)
    for group in groups:
        group["base_lr"] = group["lr"]
    return groups


def ensure_tiny_student(folder: str) -> None:
    """Rank 0 builds the tiny preset student once; the other ranks wait for it."""
    from olavlm.trainer.student.presets import build_tiny_student

    if not (Path(folder) / TINY_MARKER).exists():
        if int(os.environ.get("RANK", "0")) == 0:
            build_tiny_student(folder, seed=0)
        if dist.is_initialized():
            dist.barrier()


def _model_and_optimizer(run: Run, d: Dist):
    """(model, wrapped model, AdamW) for the run's stage; weights from `run.start_from` when set."""

    tcfg = run.config.train
    torch.manual_seed(tcfg.seed)
    # OlaVlm takes {task: TeacherSpec | (T, D)} today; the specs are recorded in saved students.
    model = build_student(run.config.model, {**run.target_shapes, **run.teacher_specs})
    groups = _param_groups(model, tcfg, run.distill)
    model.to(d.device)
    wrapped = wrap(model, run.config, d)
    if tcfg.fsdp:  # fully_shard replaced the parameters (same names): take the groups again
        groups = _param_groups(model, tcfg, run.distill)
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8, fused=d.device.type == "cuda")
    return model, wrapped, optimizer


def _restore(run: Run, wrapped, optimizer, d: Dist) -> tuple[int, dict | None]:
    """(step, this rank's loader state) of the resumed checkpoint, with optimizer and RNG restored."""
    if not run.resume:
        return 0, None
    resumed = checkpoint.load(run.resume)
    saved_world = len(resumed["trainer"]["rng"])
    try:  # another world size: the loader re-deals what the saved ranks had left (loader.py)
        loader_state = rank_state(resumed["trainer"]["loader"], d.rank, d.world, other_world=True)
    except ConfigError as exc:
        raise ConfigError(f"{resumed['path']}: {exc}") from None
    checkpoint.restore_optimizer(resumed, wrapped, optimizer)
    if saved_world == d.world:
        checkpoint.set_rng_state(resumed["trainer"]["rng"][d.rank])
    else:  # no exact continuation exists: distinct, reproducible streams per rank
        torch.manual_seed(run.config.train.seed + 1_000_003 * resumed["step"] + d.rank)
        if d.main:
            log.warning(
                "%s: saved by %d processes, resumed by %d: weights and optimizer state are restored "
                "exactly; sample order and RNG streams differ from an uninterrupted run",
                resumed["path"],
                saved_world,
                d.world,
            )
    return resumed["step"], loader_state


def _loader_local_rank_0_first(run: Run, model, loader_state: dict | None, d: Dist):
    """The rank's loader; local rank 0 builds its own first, so that a missing key index (trainer/data/join.py)
    is built once per node and then opened by the node's other ranks, not built by each of them."""

    def build():
        return build_loader(
            run.config.data,
            tokenizer=model.tokenizer,
            layout=model.layout,
            transform=ImageTransform.from_processor(model.image_processor),
            tasks=tuple(run.targets),
            rank=d.rank,
            world=d.world,
            state=loader_state,
            pin_memory=d.device.type == "cuda",
        )

    loader, error = None, None
    if d.local_rank == 0:
        try:
            loader = build()
        except Exception as exc:  # noqa: BLE001 - raised after the barrier: the other ranks must not wait for it
            error = exc
    if dist.is_initialized() and d.world > 1:
        dist.barrier()
    if error is not None:
        raise error
    return loader if loader is not None else build()  # the others meet the same error, if any, themselves


def _normalisers(model, micro_batches: list[dict], d: Dist) -> Normalisers:
    """The step's global label-token and image counts (all micro-batches, all ranks): one all-reduce."""
    counts = [model.count_items(batch) for batch in micro_batches]  # CPU batches: no device sync
    total = torch.tensor(
        [sum(c[0] for c in counts), sum(c[1] for c in counts)], dtype=torch.float32, device=d.device
    )
    if dist.is_initialized() and d.world > 1:
        dist.all_reduce(total)
    total = total.clamp(min=1)  # a step without labels (or images) gives 0, not NaN
    return Normalisers(tokens=total[0], images=total[1], world_size=d.world)


def _accumulate(model, wrapped, batches, tcfg: TrainConfig, distill: bool, d: Dist, autocast):
    """`grad_accum` micro-batches forward + backward -> (loss terms, sample keys, samples, tokens, loader state).

    All are read first, so that their label tokens and images are counted over every rank before the
    first forward (module docstring). Cost: `grad_accum` batches held in host memory at once."""
    micro_batches, state = [], None
    for _ in range(tcfg.grad_accum):
        batch, state = next(batches)
        micro_batches.append(batch)
    norm = _normalisers(model, micro_batches, d)
    sums: dict[str, torch.Tensor] = {}
    keys, samples, tokens = [], 0, 0
    for micro, batch in enumerate(micro_batches):
        keys.extend(batch["keys"])
        samples += len(batch["keys"])
        tokens += int(batch["attention_mask"].sum())  # CPU tensor: no device sync
        batch = to_device(batch, d.device)
        sync = micro == tcfg.grad_accum - 1 or not hasattr(wrapped, "no_sync")
        with contextlib.nullcontext() if sync else wrapped.no_sync(), autocast:
            losses = wrapped(batch, distill=distill, norm=norm)
            losses["loss"].backward()  # already a share of the step: gradients sum over micro-batches
        for name, value in losses.items():
            sums[name] = sums.get(name, 0.0) + value.detach().float()
    return sums, keys, samples, tokens, state


def _finite(sums: dict[str, torch.Tensor]) -> tuple[dict[str, float], bool]:
    """Loss terms on the host, averaged over ranks (= the big batch's terms), and whether they are all
    finite (a non-finite term on any rank makes the average non-finite: all ranks stop or skip together)."""
    names = list(sums)
    values = torch.stack([sums[n] for n in names])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(values)
        values = values / dist.get_world_size()
    host = values.tolist()  # .tolist() is a CPU-GPU sync point, once per step
    return dict(zip(names, host)), all(math.isfinite(v) for v in host)


def train(config: RunConfig, *, given=None) -> dict:
    """Run (or resume) training as `config` says (`given`: the options the user typed, see run.py).

    Returns {"step", "checkpoint", "fingerprints", "out", "last": the last step's metrics record}."""
    d = init_distributed()
    if not sys.stderr.isatty() or not d.main:  # in a file a bar repeats every update; ranks repeat rank 0
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        if not d.main:
            hf_logging.set_verbosity_error()  # transformers' warnings once, from rank 0
    run = resolve_run(config, given=given)
    if run.tiny_student:
        ensure_tiny_student(run.tiny_student)
    tcfg = run.config.train
    model, wrapped, optimizer = _model_and_optimizer(run, d)
    step, loader_state = _restore(run, wrapped, optimizer, d)
    if d.main:  # a killed run's partial saves would stay on disk for good
        checkpoint.remove_leftovers(tcfg.out)
    # The stage's crop | pad travels with the model as its image processor (saved, exported, generated with).
    model.image_processor = with_aspect_ratio(
        model.image_processor, resolve_aspect_ratio(run.config.data.image_aspect_ratio, tcfg.stage)
    )
    loader = _loader_local_rank_0_first(run, model, loader_state, d)
    metrics = Metrics(run.config, main=d.main, step=step)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if tcfg.bf16 and d.device.type == "cuda"
        else contextlib.nullcontext()
    )
    last_checkpoint, record = run.resume, {}
    batches = iter(loader)
    state = loader_state or {"epoch": 0, "batch": 0, "skipped": {}}
    started, start_step = time.perf_counter(), step
    wrapped.train()
    try:
        while step < tcfg.steps:
            t0 = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * lr_factor(step, tcfg.steps, tcfg.warmup_ratio)
            sums, keys, samples, tokens, state = _accumulate(
                model, wrapped, batches, tcfg, run.distill, d, autocast
            )
            terms, finite = _finite(sums)
            step += 1
            if not finite:
                term = next((n for n, v in terms.items() if not math.isfinite(v)), "on another rank")
                message = (
                    f"step {step}: loss term {term!r} is not finite ({terms}); "
                    f"last good checkpoint: {last_checkpoint or 'none'}"
                )
                if tcfg.on_nonfinite == "stop":
                    raise NonFiniteLossError(message)
                log.warning("%s; step skipped", message)
                optimizer.zero_grad(set_to_none=True)
                continue
            if tcfg.fsdp:
                sync_ignored(wrapped)
            grad_norm = None
            if tcfg.grad_clip > 0:
                trainable = [p for g in optimizer.param_groups for p in g["params"]]
                grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, tcfg.grad_clip))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            elapsed = time.perf_counter() - t0
            record = {
                "step": step,
                **terms,
                "lr": optimizer.param_groups[0]["lr"],
                "grad_norm": grad_norm,
                "samples_per_s": samples * d.world / elapsed,
                "tokens_per_s": tokens * d.world / elapsed,
                "epoch": state["epoch"],
                "skipped": state["skipped"],
                "eta_s": (time.perf_counter() - started) / (step - start_step) * (tcfg.steps - step),
                "keys_sha256": hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16],
            }
            metrics.log(record, list(terms))
            if step % tcfg.save_every == 0 or step == tcfg.steps:
                last_checkpoint = _save(run, model, wrapped, optimizer, state, step, d) or last_checkpoint
    finally:
        metrics.close()
    return {
        "step": step,
        "checkpoint": last_checkpoint,
        "fingerprints": run.fingerprints,
        "out": tcfg.out,
        "last": record,
    }


def _save(run: Run, model, wrapped, optimizer, loader_state: dict, step: int, d: Dist) -> str:
    """A checkpoint of every rank's state (checkpoint.save_state picks the layout); its path on rank 0."""
    tcfg = run.config.train
    return checkpoint.save_state(
        tcfg.out,
        step,
        model,
        wrapped,
        optimizer,
        d,
        save_frozen=tcfg.save_frozen,
        keep_last=tcfg.keep_last,
        loader_state=loader_state,
        config=to_dict(run.config),
        fingerprints=run.fingerprints,
    )
