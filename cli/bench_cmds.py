"""`ola bench cache|precompute|loader|codecs|decode|train|heads|torture`: one call each into bench/, then
a table or JSON.

The benchmarks themselves live in bench/ (they may import pipeline/ and trainer/ both); this module
only turns options into a call and prints the figures. `ola bench gpu` and `ola bench fidelity` have
their own modules (bench_gpu_cmd.py, bench_fidelity_cmd.py). Cost: one more file in cli/.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from .errors import user_errors
from .groups import Groups


def _report(result: dict, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(result))
        return
    for key, value in result.items():
        typer.echo(f"{key:40s} {value}")


def bench_cache_command(
    images: int = typer.Option(64, help="Images per dtype (each: 576x1024 + 576x1536 + 1x1024 targets)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    tmp: Path | None = typer.Option(None, help="Folder for the temporary caches (default: system temp)."),
    backend: str = typer.Option(
        "direct",
        "--backend",
        help="Reader timed: direct (the cache's shard-index reader) "
        "or zarr (plain zarr-python indexing of the same arrays).",
    ),
) -> None:
    """Cache speed and size per storage dtype.

    Write/read MB/s, random single-sample read latency and bytes per image at the paper's target
    shapes, for float16, bfloat16 and int8 (with int8's cosine against float32). --backend zarr
    times the reads through zarr-python instead of the direct reader."""
    from olavlm.bench.cache import BACKENDS, bench_cache

    if backend not in BACKENDS:
        raise typer.BadParameter(f"{backend!r} is not one of {', '.join(BACKENDS)}", param_hint="--backend")
    result = bench_cache(images=images, root=str(tmp) if tmp else None, backend=backend)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    typer.echo(f"backend: {result['backend']}")
    typer.echo(
        f"{'dtype':<9} {'MB/image':>9} {'vs fp16':>8} {'write MB/s':>11} {'read MB/s':>10} "
        f"{'rand p50 ms':>12} {'cos min':>9}"
    )
    for dtype, r in result["dtypes"].items():
        typer.echo(
            f"{dtype:<9} {r['bytes_per_image'] / 1e6:>9.3f} {r['ratio_to_float16_stored']:>8.3f} "
            f"{r['write_MBps_16bit_equiv']:>11.1f} {r['read_MBps_16bit_equiv']:>10.1f} "
            f"{r['random_read_ms_p50']:>12.2f} {r['cosine_min']:>9.5f}"
        )


def bench_precompute_command(
    as_json: bool = typer.Option(False, "--json", help="Print the figures as one JSON object."),
    preset: str = typer.Option(
        "small", "--preset", help="Teachers to time (small: teacher compute dominates on a CPU)."
    ),
    images: int = typer.Option(
        96, "--images", help="Images in the benchmark corpus (built on the fly from skimage photos)."
    ),
    shards: int = typer.Option(3, "--shards", help="Corpus shards."),
    batch_size: int = typer.Option(
        16, "--batch-size", help="Images per teacher forward, in both measurements."
    ),
    teachers: str = typer.Option("depth,seg,gen", "--teachers", help="Comma-separated teachers."),
    teacher_threads: int = typer.Option(
        0,
        "--teacher-threads",
        help="torch threads of the teachers (0 = all cores). "
        "1 on a 2-core machine leaves a core to decoding, as a GPU node does.",
    ),
    device_resize: bool = typer.Option(
        False,
        "--device-resize",
        help="Run the timed job with ola precompute's "
        "--device-resize (host decodes only; the teachers' device resizes).",
    ),
) -> None:
    """Teacher busy fraction: pipeline images/s over a bare batched forward loop on pre-decoded inputs.

    Also the host's CPU ms per image of preprocessing with the resizes on the host and with
    --device-resize (decode only), at the preset's and at the paper's input sizes."""
    with user_errors():
        from olavlm.bench.precompute import BenchConfig, run_precompute_bench

        result = run_precompute_bench(
            BenchConfig(
                preset=preset,
                images=images,
                shards=shards,
                batch_size=batch_size,
                teacher_threads=teacher_threads,
                device_resize=device_resize,
                teachers=tuple(t.strip() for t in teachers.split(",") if t.strip()),
            )
        )
        typer.echo(
            json.dumps(result, indent=2) if as_json else "\n".join(f"{k}: {v}" for k, v in result.items())
        )


def bench_loader_command(
    as_json: bool = typer.Option(
        False, "--json", help="Print the figures as JSON (one object, a list for several runs)."
    ),
    samples: int = typer.Option(256, help="Samples in the temporary corpus and cache."),
    batch_size: int = typer.Option(16, help="Samples per batch."),
    workers: int = typer.Option(2, help="DataLoader workers for the parallel figure."),
    codec: str = typer.Option(
        "default",
        help="Comma-separated cache codecs, one run each: default (the dtype's "
        "default_codec), none, lz4, zstd (level 3); byte shuffle throughout.",
    ),
    dtype: str = typer.Option("float16", help="Comma-separated storage dtypes of the targets, one run each."),
) -> None:
    """Data loader throughput per CPU core.

    Samples/s per CPU core through the whole data path (tar read, JPEG decode, tokenize, cache join,
    collate) with full-size paper targets (576x1024 + 576x1536 + 1x1024), per stage and in total, for
    each codec and dtype given. Target: >= 200."""
    from olavlm.bench.loader import CODECS, bench_loader_matrix
    from olavlm.schemas.spec import STORAGE_DTYPES

    codecs = tuple(c.strip() for c in codec.split(",") if c.strip())
    dtypes = tuple(d.strip() for d in dtype.split(",") if d.strip())
    if not codecs or any(c not in CODECS for c in codecs):
        raise typer.BadParameter(f"{codec!r}: codecs are {', '.join(CODECS)}", param_hint="--codec")
    if not dtypes or any(d not in STORAGE_DTYPES for d in dtypes):
        raise typer.BadParameter(f"{dtype!r}: dtypes are {', '.join(STORAGE_DTYPES)}", param_hint="--dtype")
    with user_errors():
        results = bench_loader_matrix(codecs, dtypes, samples=samples, batch_size=batch_size, workers=workers)
    if len(results) == 1:
        _report(results[0], as_json)
        return
    if as_json:
        typer.echo(json.dumps(results))
        return
    stages = list(results[0]["stage_ms_per_sample"])
    typer.echo(
        f"{'dtype':<9} {'codec':<44} {'samples/s':>9} "
        + " ".join(f"{s[:14]:>14}" for s in stages)
        + f" {'stage sum/s':>11}"
    )
    for r in results:
        typer.echo(
            f"{r['target_dtype']:<9} {r['codec']:<44} {r['samples_per_s_one_core']:>9.1f} "
            + " ".join(f"{r['stage_ms_per_sample'][s]:>11.2f} ms" for s in stages)
            + f" {r['stage_sum_samples_per_s']:>11.1f}"
        )
    typer.echo(f"image decoder: {results[-1]['image_decoder']}; pixel_values {results[-1]['pixel_values']}")
    typer.echo(f"load average at the end: {results[-1]['load_average']}")


def bench_codecs_command(
    as_json: bool = typer.Option(False, "--json", help="Print the figures as one JSON object."),
    samples: int = typer.Option(
        8, min=1, help="Distinct samples per dtype (each: 576x1024 + 576x1536 + 1x1024)."
    ),
    repeats: int = typer.Option(7, min=1, help="Decode passes; the median per-sample time is reported."),
    dtypes: str = typer.Option("float16,bfloat16,int8", help="Comma-separated storage dtypes."),
) -> None:
    """Cache codecs: bytes per sample and decode ms per sample on one core, per storage dtype.

    Each Blosc codec worth trying (none, lz4, zstd levels 1 and 3, with and without byte shuffle) on
    feature-like paper-size targets, decoded as the loader does (into place, one thread). "default"
    marks the codec a new cache of that dtype gets (schemas/spec.py `default_codec`)."""
    from olavlm.bench.codecs import bench_codecs
    from olavlm.schemas.spec import STORAGE_DTYPES

    chosen = tuple(d.strip() for d in dtypes.split(",") if d.strip())
    unknown = [d for d in chosen if d not in STORAGE_DTYPES]
    if unknown or not chosen:
        raise typer.BadParameter(
            f"{unknown or dtypes!r}: dtypes are {', '.join(STORAGE_DTYPES)}", param_hint="--dtypes"
        )
    result = bench_codecs(samples=samples, repeats=repeats, dtypes=chosen)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    typer.echo(
        f"one thread; load average before {result['load_average_before']}, after {result['load_average_after']}"
    )
    typer.echo(
        f"{'dtype':<9} {'codec':<14} {'MB/sample':>9} {'ratio':>6} {'saved':>6} {'decode ms':>9} "
        f"{'encode ms':>9} {'break-even MB/s':>15}"
    )
    for dtype, d in result["dtypes"].items():
        for label, r in d["codecs"].items():
            even = "-" if r["break_even_MBps"] is None else f"{r['break_even_MBps']:.0f}"
            mark = "  (default)" if r["default"] else ""
            typer.echo(
                f"{dtype:<9} {label:<14} {r['bytes_per_sample'] / 1e6:>9.3f} {r['ratio']:>6.3f} "
                f"{r['saved_vs_none_pct']:>5.1f}% {r['decode_ms']:>9.2f} {r['encode_ms']:>9.2f} {even:>15}{mark}"
            )


def bench_train_command(
    as_json: bool = typer.Option(False, "--json", help="Print the figures as one JSON object."),
    steps: int = typer.Option(8, help="Timed steps per variant."),
    batch_size: int = typer.Option(4, help="Samples per step."),
    workers: int = typer.Option(4, help="DataLoader workers (capped at cores - 1)."),
    online_steps: int = typer.Option(1, help="Steps with online teachers (0 = skip; slow on CPU)."),
) -> None:
    """Training step: cached-target loader vs in-memory batches vs online teachers.

    Step time with the cached-target loader / on the same batches pre-collated in memory (target <= 1.05),
    and beside them the same student with paper-size teachers run online inside the step."""
    from olavlm.bench.train import bench_train

    with user_errors():
        result = bench_train(steps=steps, batch_size=batch_size, workers=workers, online_steps=online_steps)
    _report(result, as_json)


def bench_heads_command(
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON."),
    sizes: str = typer.Option(
        "tiny,mid", help="Comma-separated sizes for the time overhead (tiny, mid); '' = none."
    ),
    repeats: int = typer.Option(3, min=1, help="Timed steps per variant (the minimum is reported)."),
) -> None:
    """Size and cost of the distillation heads.

    Parameters of heads + task tokens for the paper's students (meta device), and the fwd+bwd time
    overhead of the heads relative to the bare student on this CPU."""
    from olavlm.bench.heads import SIZES, head_overhead, paper_param_counts

    chosen = [s for s in sizes.split(",") if s]
    unknown = [s for s in chosen if s not in SIZES]
    if unknown:
        raise typer.BadParameter(f"unknown sizes {unknown}; known: {sorted(SIZES)}")
    report = {"params": paper_param_counts(), "overhead": [head_overhead(s, repeats=repeats) for s in chosen]}
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    for name, c in report["params"].items():
        typer.echo(
            f"{name}: student {c['student'] / 1e9:.3f}B, heads {c['heads'] / 1e6:.1f}M "
            f"({len(c['per_head'])} heads), task tokens {c['task_tokens'] / 1e3:.1f}K, "
            f"added {100 * c['added_fraction']:.2f}%, PT-trainable {c['pt_trainable'] / 1e6:.1f}M; "
            f"per {c['seq_len']}-token sample heads {c['heads_gmac_per_sample']:.0f} GMAC vs student "
            f"{c['student_gmac_per_sample']:.0f} GMAC ({100 * c['heads_compute_fraction']:.1f}%)"
        )
    for o in report["overhead"]:
        typer.echo(
            f"{o['size']}: batch {o['batch']} x {o['seq_len']} tokens, LLM {o['llm_hidden']}x{o['llm_layers']}, "
            f"{o['heads']} heads of width {o['head_width']}: bare {o['bare_s'] * 1e3:.0f} ms, "
            f"with heads {o['with_heads_s'] * 1e3:.0f} ms (+{100 * o['overhead']:.0f}%)"
        )


def bench_decode_command(
    as_json: bool = typer.Option(False, "--json", help="Print the figures as one JSON object."),
    repeats: int = typer.Option(15, min=1, help="Calls per image and decoder; the fastest is reported."),
) -> None:
    """Image decoders: ms per image on one core, and the largest pixel difference from the image processor.

    Each way of turning JPEG bytes into 336x336 CLIP input (PIL full or draft decode, PIL or torch
    resize; simplejpeg and torchvision when importable), on a 500x375, a 451x300, a 2000x1500 and a
    1411x1411 photo, crop and pad modes. The data path keeps the fastest within the tests' 0.05."""
    from olavlm.bench.images import bench_decode

    with user_errors():
        result = bench_decode(repeats=repeats)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    typer.echo(f"{result['statistic']}, {result['repeats']} calls; load average {result['load_average']}")
    for name, why in result["unavailable"].items():
        typer.echo(f"{name}: {why}")
    typer.echo(f"{'mode':<5} {'image':<20} {'ms':>7} {'max diff':>9} {'grey lv':>8}  decoder")
    for r in result["rows"]:
        typer.echo(
            f"{r['mode']:<5} {r['image']:<20} {r['ms']:>7.2f} {r['max_diff']:>9.4f} "
            f"{r['max_diff_grey_levels']:>8.1f}  {r['decoder']}"
        )


def bench_torture_command(
    trials: int = typer.Option(10, min=1, help="Kills per part, each followed by a resume."),
    parts: str = typer.Option(
        "plain,sharded,precompute",
        help="Comma-separated: plain (ola train, one process), sharded (two under torchrun, FSDP2 on gloo), "
        "precompute (ola precompute into S3: a local moto server).",
    ),
    seed: int = typer.Option(0, help="Seed of the kill moments."),
    as_json: bool = typer.Option(False, "--json", help="Print the figures as one JSON object."),
) -> None:
    """Kill training and precompute with SIGKILL at random moments, resume each time, compare.

    A run saving every step (keep_last 2) is killed, whole process tree, half the time inside a save,
    and resumed until done: LATEST and the checkpoint a resume takes must equal the uninterrupted run's,
    and so must every logged step. Precompute into S3 likewise: the cache must equal an uninterrupted
    run's. Exit code 1 if any resume was not exact."""
    with user_errors():
        from olavlm.bench.torture import bench_torture

        result = bench_torture(
            trials=trials, parts=tuple(p.strip() for p in parts.split(",") if p.strip()), seed=seed
        )
    if as_json:
        typer.echo(json.dumps(result, indent=2))
    else:
        typer.echo(
            f"load average before {result['load_average_before']}, after {result['load_average_after']}"
        )
        typer.echo(
            f"{'part':<11} {'trials':>6} {'kills':>5} {'in save':>7} {'launches':>8} {'resumed steps':>13} "
            f"{'exact':>5} {'s':>6}"
        )
        for part in ("plain", "sharded", "precompute"):
            if part in result:
                r = result[part]
                typer.echo(
                    f"{part:<11} {r['trials']:>6} {r['kills']:>5} {r['kills_in_save']:>7} {r['launches']:>8} "
                    f"{r.get('resumed_records', '-'):>13} {str(r['exact']):>5} {r['seconds']:>6.0f}"
                )
                for problem in r["problems"]:
                    typer.echo(f"  {problem}")
    if not result["all_exact"]:
        raise typer.Exit(1)


def register(groups: Groups) -> None:
    """Add `ola bench cache|precompute|loader|codecs|decode|train|heads|torture`."""
    groups.bench.command("cache")(bench_cache_command)
    groups.bench.command("precompute")(bench_precompute_command)
    groups.bench.command("loader")(bench_loader_command)
    groups.bench.command("codecs")(bench_codecs_command)
    groups.bench.command("decode")(bench_decode_command)
    groups.bench.command("train")(bench_train_command)
    groups.bench.command("heads")(bench_heads_command)
    groups.bench.command("torture")(bench_torture_command)
