"""`ola bench fidelity`: is the embedding losses' effect on the probe measurable beyond noise?

The experiment of docs/FIDELITY.md, one command, resumable:
1. a demo corpus of `images` photos and the tiny teachers' targets (Ray precompute);
2. for each training seed: PT with distillation ("ola") and without ("baseline": the same
   student, task tokens included, trained on NTP alone) from the same initial weights,
   data order and steps, so that the embedding losses are the only difference;
3. every layer of every run probed with `probe_seeds` probe initialisations on the
   same held-out split (the authors' probe input: image + fixed prompt, padded);
4. per teacher: the OLA minus baseline difference at the distilled layers and over
   all layers, paired by training seed (each seed's difference of the probe-seed means),
   with its mean, standard deviation and a t-like ratio mean / (std / sqrt(n)); and
   the probe noise floor (the std over probe seeds within one run).

Runs on CUDA when there is a GPU (training and probes), else on the CPU.

Design choice: training seed is the unit of replication (it changes the student's
initialisation and the data order); probe seeds only measure the probe's own noise
and are averaged within a run. Cost: 2 x `train_seeds` PT runs and their probes;
on 2 CPU cores the defaults take minutes.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True, kw_only=True)
class FidelityConfig:
    """The experiment's sizes; every figure in docs/FIDELITY.md names the values it ran with."""

    images: int = 512
    """Demo corpus size (real photos from scikit-image / scikit-learn, augmented)."""
    train_seeds: int = 3
    """PT runs per arm (OLA and baseline), seeds 0..train_seeds-1."""
    steps: int = 300
    """PT optimizer steps per run."""
    batch_size: int = 8
    """Samples per PT and probe step."""
    lr: float = 0.0
    """PT learning rate (0 = the stage default, 1e-3)."""
    probe_steps: int = 150
    """Probe training steps per run."""
    probe_seeds: int = 3
    """Probe initialisations per (teacher, layer)."""
    probe_width: int = 64
    """Probe head width."""
    heldout_percent: int = 25
    """Share of images held out for the probe score."""


def run_fidelity(out: Path, config: FidelityConfig, *, log=print) -> dict:
    from olavlm.pipeline.precompute import PrecomputeConfig, precompute
    from olavlm.schemas.corpus_build import build_demo_corpus
    from olavlm.trainer.eval.probe import ProbeConfig, run_probe

    out.mkdir(parents=True, exist_ok=True)
    corpus, cache = out / "corpus", out / "cache"
    if not (corpus / ".complete").exists():
        build_demo_corpus(corpus, samples=config.images, shard_size=64)
        (corpus / ".complete").write_text("done\n")
    precompute(PrecomputeConfig(corpus=str(corpus), cache=str(cache), preset="tiny", batch_size=16))
    probe = ProbeConfig(
        steps=config.probe_steps,
        batch_size=config.batch_size,
        width=config.probe_width,
        heldout_percent=config.heldout_percent,
        seeds=config.probe_seeds,
    )
    rows = []
    for seed in range(config.train_seeds):
        runs = {
            arm: _train(
                corpus, cache, out / f"seed{seed}" / arm, distill=arm == "ola", seed=seed, config=config
            )
            for arm in ("ola", "baseline")
        }
        log(f"seed {seed}: trained {list(runs)}; probing")
        probed = run_probe(
            [runs["ola"], runs["baseline"]],
            names=["ola", "baseline"],
            data=str(corpus),
            cache=str(cache),
            out=str(out / f"seed{seed}" / "probe"),
            config=probe,
        )
        rows.extend({**r, "train_seed": seed} for r in probed)
    result = {"config": asdict(config), "teachers": summarise(rows)}
    (out / "fidelity.json").write_text(json.dumps({**result, "rows": rows}, indent=2))
    return result


def _train(corpus: Path, cache: Path, out: Path, *, distill: bool, seed: int, config: FidelityConfig) -> str:
    from olavlm.schemas.config import DataConfig, ModelConfig, RunConfig, TrainConfig
    from olavlm.trainer import checkpoint
    from olavlm.trainer.train import train

    resume, done = checkpoint.latest_and_done(out, config.steps)
    if done:
        return resume
    run = RunConfig(
        model=ModelConfig(preset="tiny"),
        # Both arms read the cache, so both have the task tokens in the sequence and see identical batches:
        # the embedding losses are the only difference (a baseline without task tokens would also hand the
        # probe 24 fewer tokens to read, which moves its score by itself).
        data=DataConfig(
            data=str(corpus), cache=str(cache), batch_size=config.batch_size, num_workers=1, seed=seed
        ),
        train=TrainConfig(
            stage="pt",
            distill=distill,
            steps=config.steps,
            lr=config.lr,
            out=str(out),
            save_every=max(1, config.steps // 3),
            log_every=max(1, config.steps // 10),
            seed=seed,
            resume=resume,
        ),  # an interrupted run goes on from its latest checkpoint
    )
    return train(run)["checkpoint"]


def summarise(rows: list[dict]) -> dict:
    """Per teacher: OLA - baseline paired by training seed (at distilled layers and over all layers),
    and the probe noise floor."""
    out = {}
    for teacher in sorted({r["teacher"] for r in rows}):
        mine = [r for r in rows if r["teacher"] == teacher]
        distilled = {r["layer"] for r in mine if r["checkpoint"] == "ola" and r["distilled"]}
        entry = {"distilled_layers": sorted(distilled)}
        for scope, layers in (("at_distilled", distilled), ("all_layers", {r["layer"] for r in mine})):
            diffs = []
            for seed in sorted({r["train_seed"] for r in mine}):
                means = {
                    arm: statistics.fmean(
                        r["score"]
                        for r in mine
                        if r["train_seed"] == seed and r["checkpoint"] == arm and r["layer"] in layers
                    )
                    for arm in ("ola", "baseline")
                }
                diffs.append(means["ola"] - means["baseline"])
            entry[scope] = _stats(diffs)
        # probe noise: std over probe seeds of one (run, layer), averaged over runs and layers
        groups: dict[tuple, list[float]] = {}
        for r in mine:
            groups.setdefault((r["train_seed"], r["checkpoint"], r["layer"]), []).append(r["score"])
        spreads = [statistics.stdev(v) for v in groups.values() if len(v) > 1]
        entry["probe_noise_std"] = statistics.fmean(spreads) if spreads else math.nan
        entry["baseline_at_distilled"] = statistics.fmean(
            r["score"] for r in mine if r["checkpoint"] == "baseline" and r["layer"] in distilled
        )
        out[teacher] = entry
    return out


def _stats(values: list[float]) -> dict:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else math.nan
    ratio = mean / (std / math.sqrt(len(values))) if len(values) > 1 and std > 0 else math.nan
    return {"diffs": values, "mean": mean, "std": std, "t": ratio, "n": len(values)}


def describe(result: dict) -> str:
    c = result["config"]
    lines = [
        f"OLA - baseline probe cosine, paired by training seed ({c['train_seeds']} seeds, {c['steps']} PT steps, "
        f"{c['images']} images, {c['probe_seeds']} probe seeds x {c['probe_steps']} steps)",
        f"{'teacher':<8} {'baseline@dist':>13} {'diff@distilled (mean ± std, t)':>34} "
        f"{'diff all layers':>26} {'probe noise':>12}",
    ]
    for teacher, e in result["teachers"].items():
        a, b = e["at_distilled"], e["all_layers"]
        lines.append(
            f"{teacher:<8} {e['baseline_at_distilled']:>13.4f} "
            f"{a['mean']:>+12.4f} ± {a['std']:.4f} (t {a['t']:>5.1f}) "
            f"{b['mean']:>+12.4f} ± {b['std']:.4f} {e['probe_noise_std']:>12.4f}"
        )
    return "\n".join(lines)
