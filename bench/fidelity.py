"""`ola bench fidelity`: is the embedding losses' effect on the probe measurable beyond noise?

The experiment of docs/FIDELITY.md, one command, resumable; `ola demo` is its first
training seed at demo size, through the same functions:
1. a demo corpus of `images` photos and the tiny teachers' targets (Ray precompute);
2. per training seed: PT with distillation ("ola") and without ("baseline": NTP alone) from the
   same initial weights, data order and steps, so the embedding losses are the only difference;
3. each pair probed at every layer, once per probe width, on the same held-out split;
4. per width and teacher: OLA - baseline paired by training seed (mean, std, t), beside the
   probe noise floor (the std over probe seeds within one run).

Design choice: training seed is the unit of replication (student init and data order);
probe seeds only measure the probe's own noise and are averaged within a run. Each
student trains once and is probed at every width. Runs on CUDA when there is one.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

from olavlm.schemas.errors import ConfigError
from olavlm.trainer.eval.probe import ProbeConfig

ARMS = ("ola", "baseline")
_PROBE = ProbeConfig()


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
    dtype: str = "float16"
    """Cache storage dtype: float16, bfloat16 or int8."""
    probe_widths: tuple[int, ...] = (_PROBE.width,)
    """Probe widths, e.g. 32,64,128,256, each probing the same trained runs; 0 = each teacher's target
    width (`ola probe`'s default)."""
    probe_steps: int = _PROBE.steps
    """Probe training steps per run (default: `ola probe`'s)."""
    probe_seeds: int = 3
    """Probe initialisations per (teacher, layer)."""
    heldout_percent: int = _PROBE.heldout_percent
    """Share of images held out for the probe score (default: `ola probe`'s)."""

    def __post_init__(self) -> None:
        if self.train_seeds < 1 or not self.probe_widths or min(self.probe_widths) < 0:
            raise ConfigError(
                f"train_seeds must be >= 1 and probe_widths a non-empty list of widths >= 0 "
                f"(0 = the target's), got {self.train_seeds} and {self.probe_widths}"
            )

    def probe(self, width: int) -> ProbeConfig:
        """`ola probe`'s configuration at this width, budget and held-out share."""
        return ProbeConfig(
            steps=self.probe_steps,
            batch_size=self.batch_size,
            width=width,
            heldout_percent=self.heldout_percent,
            seeds=self.probe_seeds,
        )


def width_name(width: int) -> str:
    return "target" if width == 0 else str(width)


def build_corpus(out: Path, images: int) -> tuple[Path, int | None]:
    """The demo corpus under OUT/corpus -> (folder, samples built now; None when it was complete)."""
    from olavlm.schemas.corpus_build import build_demo_corpus

    corpus = out / "corpus"
    if (corpus / ".complete").exists():
        return corpus, None
    built = build_demo_corpus(corpus, samples=images, shard_size=64)
    (corpus / ".complete").write_text(json.dumps({"samples": built.samples}))
    return corpus, built.samples


def build_cache(out: Path, corpus: Path, dtype: str):
    """The tiny teachers' targets under OUT/cache (resumes) -> (folder, precompute summary)."""
    from olavlm.pipeline.precompute import PrecomputeConfig, precompute

    cache = out / "cache"
    config = PrecomputeConfig(corpus=str(corpus), cache=str(cache), preset="tiny", dtype=dtype, batch_size=16)
    return cache, precompute(config)


def run_fidelity(out: Path, config: FidelityConfig, *, log=print, device: str | None = None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    corpus, _ = build_corpus(out, config.images)
    cache, _ = build_cache(out, corpus, config.dtype)
    seeds = range(config.train_seeds)
    runs = {}
    for seed in seeds:
        runs[seed] = {arm: train_arm(out, corpus, cache, arm=arm, seed=seed, config=config) for arm in ARMS}
        log(f"seed {seed}: trained {list(runs[seed])}")
    rows = []
    for width in config.probe_widths:  # width by width: an interrupted run has whole widths summarised
        for seed in seeds:
            log(f"seed {seed}: probing at width {width_name(width)}")
            rows.extend(
                probe_arms(
                    out, corpus, cache, runs[seed], seed=seed, width=width, config=config, device=device
                )
            )
        result = {"config": asdict(config), "widths": summarise_widths(rows)}
        (out / "fidelity.json").write_text(json.dumps({**result, "rows": rows}, indent=2))
    return result


def run_dir(out: Path, seed: int, arm: str) -> Path:
    return out / f"seed{seed}" / arm


def probe_dir(out: Path, seed: int, width: int) -> Path:
    return out / f"seed{seed}" / ("probe" if width == 0 else f"probe-w{width}")


def train_arm(out: Path, corpus: Path, cache: Path, *, arm: str, seed: int, config: FidelityConfig) -> dict:
    """Train, resume or skip one PT run -> {checkpoint, resumed: "done" | the checkpoint resumed | "no"}."""
    from olavlm.schemas.config import DataConfig, ModelConfig, RunConfig, TrainConfig
    from olavlm.trainer import checkpoint
    from olavlm.trainer.train import train

    folder = run_dir(out, seed, arm)
    resume, done = checkpoint.latest_and_done(folder, config.steps)
    if done:
        return {"checkpoint": resume, "resumed": "done"}
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
            distill=arm == "ola",
            steps=config.steps,
            lr=config.lr,
            out=str(folder),
            save_every=max(1, config.steps // 3),
            log_every=max(1, config.steps // 10),
            seed=seed,
            resume=resume,
        ),  # an interrupted run goes on from its latest checkpoint
    )
    return {"checkpoint": train(run)["checkpoint"], "resumed": resume or "no"}


def probe_arms(
    out: Path,
    corpus: Path,
    cache: Path,
    runs: dict[str, dict],
    *,
    seed: int,
    width: int,
    config: FidelityConfig,
    device: str | None = None,
) -> list[dict]:
    """Probe both arms of one training seed at one width on the same split; rows tagged with both."""
    from olavlm.trainer.eval.probe import run_probe

    rows = run_probe(
        [runs[arm]["checkpoint"] for arm in ARMS],
        names=list(ARMS),
        data=str(corpus),
        cache=str(cache),
        out=str(probe_dir(out, seed, width)),
        config=config.probe(width),
        device=device,
    )
    return [{**r, "train_seed": seed, "probe_width": width} for r in rows]


def summarise_widths(rows: list[dict]) -> dict[str, dict]:
    """{width name: summarise(that width's rows)}, in the order the widths were probed."""
    widths = sorted({r["probe_width"] for r in rows}, key=[r["probe_width"] for r in rows].index)
    return {width_name(w): summarise([r for r in rows if r["probe_width"] == w]) for w in widths}


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
        f"{c['images']} images; probe {c['probe_seeds']} seeds x {c['probe_steps']} steps, "
        f"{c['heldout_percent']} % held out)",
        f"{'width':<7} {'teacher':<8} {'baseline@dist':>13} {'diff@distilled (mean ± std, t)':>32} "
        f"{'diff all layers (mean ± std, t)':>32} {'probe noise':>12}",
    ]
    for width, teachers in result["widths"].items():
        for teacher, e in teachers.items():
            a, b = e["at_distilled"], e["all_layers"]
            lines.append(
                f"{width:<7} {teacher:<8} {e['baseline_at_distilled']:>13.4f} "
                f"{a['mean']:>+11.4f} ± {a['std']:.4f} (t {a['t']:>5.1f}) "
                f"{b['mean']:>+11.4f} ± {b['std']:.4f} (t {b['t']:>5.1f}) {e['probe_noise_std']:>12.4f}"
            )
    return "\n".join(lines)
