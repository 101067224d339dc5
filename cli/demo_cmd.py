"""`ola demo`: the whole chain, offline, on the bundled demo corpus with the tiny preset.

corpus -> precompute (Ray, three tiny teachers) -> cache stats + verify -> PT with
distillation and the NTP-only baseline (the same student, task tokens included, with the
embedding losses off; same init, data and steps) ->
probe both on the same held-out split -> plot + summary table.

It lives in cli/ because it is the one place allowed to import both pipeline/
and trainer/. Every stage resumes: a rerun finds the corpus, the committed
cache shards, the finished training runs and the scored probe layers, and does
only what is missing.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer

from .errors import user_errors
from .groups import Groups


def _stage(title: str) -> float:
    typer.secho(f"\n== {title}", bold=True)
    return time.perf_counter()


def _done(start: float, what: str) -> None:
    typer.echo(f"   {what} ({time.perf_counter() - start:.1f} s)")


def _train_once(corpus: str, cache: str, out: Path, *, distill: bool, steps: int, batch_size: int) -> dict:
    """Train (or resume, or skip if finished) one PT run; returns {checkpoint, losses}."""
    from olavlm.schemas.config import DataConfig, ModelConfig, RunConfig, TrainConfig
    from olavlm.trainer import checkpoint
    from olavlm.trainer.train import train

    resume, done = checkpoint.latest_and_done(out, steps)
    if done:
        return {"checkpoint": resume, "losses": _last_losses(out), "resumed": "done"}
    config = RunConfig(
        model=ModelConfig(preset="tiny"),
        # Both runs read the cache: the baseline is the same student (task tokens included) with the
        # embedding losses off, so they are the only difference the probe can see (docs/FIDELITY.md).
        data=DataConfig(data=corpus, cache=cache, batch_size=batch_size, num_workers=1),
        train=TrainConfig(
            stage="pt",
            distill=distill,
            steps=steps,
            out=str(out),
            save_every=max(1, steps // 2),
            log_every=5,
            resume=resume,
            seed=0,
        ),
    )
    summary = train(config)
    return {"checkpoint": summary["checkpoint"], "losses": _last_losses(out), "resumed": resume or "no"}


def _last_losses(out: Path) -> dict:
    lines = (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").exists() else []
    if not lines:
        return {}
    first, last = json.loads(lines[0]), json.loads(lines[-1])
    return {
        "first_loss": first["loss"],
        "last_loss": last["loss"],
        "first_ntp": first["ntp"],
        "last_ntp": last["ntp"],
        "step": last["step"],
    }


def run_demo(
    out: Path,
    *,
    samples: int = 256,
    steps: int = 60,
    batch_size: int = 8,
    probe_steps: int = 60,
    probe_seeds: int = 3,
    dtype: str = "float16",
) -> dict:
    """The whole chain; returns the summary (also written to OUT/summary.json)."""
    import transformers

    from olavlm.pipeline.precompute import PrecomputeConfig, precompute
    from olavlm.schemas.cache import TargetCache
    from olavlm.schemas.corpus import list_shards
    from olavlm.schemas.corpus_build import build_demo_corpus
    from olavlm.schemas.inspect import verify_cache
    from olavlm.trainer.eval.probe import ProbeConfig, plot_size, print_scores, run_probe

    from .cache_cmds import stats

    transformers.utils.logging.set_verbosity_error()  # weight-loading bars of the tiny models are noise here
    transformers.utils.logging.disable_progress_bar()
    out.mkdir(parents=True, exist_ok=True)
    corpus, cache = out / "corpus", out / "cache"
    started = time.perf_counter()

    t = _stage(f"1/6 demo corpus -> {corpus}")
    if (corpus / ".complete").exists():
        _done(t, f"{len(list_shards(str(corpus)))} shards already built")
    else:
        built = build_demo_corpus(corpus, samples=samples, shard_size=64)
        (corpus / ".complete").write_text(json.dumps({"samples": built.samples}))
        _done(t, f"{built.samples} samples in {built.shards} shards")

    t = _stage(f"2/6 precompute depth, seg, gen (tiny teachers, Ray) -> {cache}")
    summary = precompute(
        PrecomputeConfig(corpus=str(corpus), cache=str(cache), preset="tiny", dtype=dtype, batch_size=16)
    )
    typer.echo(summary.describe())
    _done(t, "cache complete")

    t = _stage("3/6 cache stats and verify")
    stats(str(cache), as_json=False, per_shard=False, sample_rows=8, storage_options=None)
    report = verify_cache(TargetCache(str(cache)), corpus=str(corpus))
    for problem in report.problems:
        typer.secho(f"problem: {problem}", fg=typer.colors.RED)
    if not report.ok:
        raise RuntimeError(f"the demo cache failed verification ({len(report.problems)} problems)")
    _done(
        t,
        f"verified: {report.checked_shards} shards, {report.checked_rows} rows, {report.corpus_samples} corpus samples",
    )

    runs = {}
    for name, distill in (("ola", True), ("baseline", False)):
        t = _stage(
            f"4/6 PT {'with distillation' if distill else 'NTP-only baseline'} ({steps} steps) -> {out / name}"
        )
        runs[name] = _train_once(
            str(corpus), str(cache), out / name, distill=distill, steps=steps, batch_size=batch_size
        )
        _done(t, f"checkpoint {runs[name]['checkpoint']}")

    t = _stage("5/6 probe every layer of both checkpoints (same split, same budget)")
    rows = run_probe(
        [runs["ola"]["checkpoint"], runs["baseline"]["checkpoint"]],
        names=["ola", "baseline"],
        data=str(corpus),
        cache=str(cache),
        out=str(out / "probe"),
        config=ProbeConfig(
            steps=probe_steps, batch_size=batch_size, width=64, heldout_percent=25, seeds=probe_seeds
        ),
        device="cpu",
    )
    _done(t, f"{len(rows)} probe scores")

    _stage("6/6 summary")
    typer.echo(f"{'run':<10} {'first loss':>11} {'last loss':>10} {'first ntp':>10} {'last ntp':>9}")
    for name, run in runs.items():
        losses = run["losses"]
        typer.echo(
            f"{name:<10} {losses.get('first_loss', float('nan')):>11.4f} {losses.get('last_loss', float('nan')):>10.4f} "
            f"{losses.get('first_ntp', float('nan')):>10.4f} {losses.get('last_ntp', float('nan')):>9.4f}"
        )
    typer.echo("")
    print_scores(rows, compare=("ola", "baseline"))
    teachers = sorted({r["teacher"] for r in rows})
    result = {
        "out": str(out),
        "corpus": str(corpus),
        "cache": str(cache),
        "precompute": {
            "committed": summary.committed,
            "skipped": summary.skipped,
            "samples": summary.samples,
            "errors": summary.errors,
        },
        "runs": runs,
        "probe": {
            "table": str(out / "probe" / "probe.csv"),
            "plot": str(out / "probe" / "probe.png"),
            "plot_size": list(plot_size(len(teachers))),
            "rows": rows,
        },
        "seconds": time.perf_counter() - started,
    }
    (out / "summary.json").write_text(json.dumps(result, indent=2))
    typer.echo(
        f"\nfiles: corpus {corpus}, cache {cache}, runs {out / 'ola'} and {out / 'baseline'}, "
        f"probe plot {out / 'probe' / 'probe.png'} ({result['probe']['plot_size'][0]}x{result['probe']['plot_size'][1]} px), summary {out / 'summary.json'}"
    )
    typer.echo(f"total {result['seconds']:.0f} s")
    return result


def demo(
    out: Path = typer.Option(Path("demo-out"), "--out", help="Folder for everything the demo writes."),
    samples: int = typer.Option(256, help="Demo corpus size."),
    steps: int = typer.Option(60, help="Training steps of each PT run."),
    batch_size: int = typer.Option(8, help="Samples per training / probe step."),
    probe_steps: int = typer.Option(60, help="Probe training steps per checkpoint."),
    dtype: str = typer.Option("float16", help="Cache storage dtype: float16, bfloat16 or int8."),
) -> None:
    """The whole chain, offline, on the bundled demo corpus (tiny preset).

    Build the corpus,
    precompute the three teachers with Ray, print cache stats, verify the cache, train PT with
    distillation and the NTP-only baseline for the same steps, probe both, plot, and summarise.
    Rerunning resumes instead of recomputing."""
    with user_errors():
        run_demo(
            out, samples=samples, steps=steps, batch_size=batch_size, probe_steps=probe_steps, dtype=dtype
        )


def register(groups: Groups) -> None:
    groups.root.command("demo")(demo)
