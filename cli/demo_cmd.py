"""`ola demo`: the whole chain, offline, on the bundled demo corpus with the tiny preset.

corpus -> precompute (Ray, three tiny teachers) -> cache stats + verify -> PT with
distillation and the NTP-only baseline (the same student, task tokens included, with the
embedding losses off; same init, data and steps) ->
probe both on the same held-out split -> plot + summary table.

Design choice: the demo is the first training seed of `ola bench fidelity`'s experiment at
demo size, built from bench/fidelity.py's steps (corpus, cache, train, probe), so the two
cannot drift apart; the demo adds the cache checks and the printed tables. Every stage
resumes: a rerun does only what is missing.
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
    probe_steps: int | None = None,
    probe_seeds: int = 3,
    dtype: str = "float16",
) -> dict:
    """The whole chain; returns the summary (also written to OUT/summary.json).

    `probe_steps` None: `ola probe`'s; every other probe setting is `ola probe`'s default."""
    import transformers

    from olavlm.bench.fidelity import (
        ARMS,
        FidelityConfig,
        build_cache,
        build_corpus,
        probe_arms,
        probe_dir,
        run_dir,
        train_arm,
    )
    from olavlm.schemas.cache import TargetCache
    from olavlm.schemas.corpus import list_shards
    from olavlm.schemas.inspect import verify_cache
    from olavlm.trainer.eval.probe import plot_size, print_scores

    from .cache_cmds import stats

    transformers.utils.logging.set_verbosity_error()  # weight-loading bars of the tiny models are noise here
    transformers.utils.logging.disable_progress_bar()
    out.mkdir(parents=True, exist_ok=True)
    config = FidelityConfig(  # one training seed of the fidelity experiment, at demo size
        images=samples,
        train_seeds=1,
        steps=steps,
        batch_size=batch_size,
        dtype=dtype,
        probe_widths=(0,),
        probe_seeds=probe_seeds,
        **({} if probe_steps is None else {"probe_steps": probe_steps}),
    )
    started = time.perf_counter()

    t = _stage(f"1/6 demo corpus -> {out / 'corpus'}")
    corpus, built = build_corpus(out, samples)
    shards = len(list_shards(str(corpus)))
    _done(t, f"{shards} shards already built" if built is None else f"{built} samples in {shards} shards")

    t = _stage(f"2/6 precompute depth, seg, gen (tiny teachers, Ray) -> {out / 'cache'}")
    cache, summary = build_cache(out, corpus, dtype)
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
    for arm in ARMS:
        what = "with distillation" if arm == "ola" else "NTP-only baseline"
        t = _stage(f"4/6 PT {what} ({steps} steps) -> {run_dir(out, 0, arm)}")
        runs[arm] = train_arm(out, corpus, cache, arm=arm, seed=0, config=config)
        runs[arm]["losses"] = _last_losses(run_dir(out, 0, arm))
        _done(t, f"checkpoint {runs[arm]['checkpoint']}")

    t = _stage("5/6 probe every layer of both checkpoints (same split, same budget)")
    rows = probe_arms(out, corpus, cache, runs, seed=0, width=0, config=config, device="cpu")
    probed = probe_dir(out, 0, 0)
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
            "table": str(probed / "probe.csv"),
            "plot": str(probed / "probe.png"),
            "plot_size": list(plot_size(len(teachers))),
            "rows": rows,
        },
        "seconds": time.perf_counter() - started,
    }
    (out / "summary.json").write_text(json.dumps(result, indent=2))
    typer.echo(
        f"\nfiles: corpus {corpus}, cache {cache}, runs {run_dir(out, 0, 'ola')} and {run_dir(out, 0, 'baseline')}, "
        f"probe plot {probed / 'probe.png'} ({result['probe']['plot_size'][0]}x{result['probe']['plot_size'][1]} px), summary {out / 'summary.json'}"
    )
    typer.echo(f"total {result['seconds']:.0f} s")
    return result


def demo(
    out: Path = typer.Option(Path("demo-out"), "--out", help="Folder for everything the demo writes."),
    samples: int = typer.Option(256, help="Demo corpus size."),
    steps: int = typer.Option(60, help="Training steps of each PT run."),
    batch_size: int = typer.Option(8, help="Samples per training / probe step."),
    probe_steps: int | None = typer.Option(
        None, help="Probe training steps per checkpoint (default: `ola probe`'s)."
    ),
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
