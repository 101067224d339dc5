"""`ola precompute` and `ola bench precompute`: thin wrappers, one function call each.

The options map onto `PrecomputeConfig` fields by name; torch, ray and
transformers are imported inside the commands so that `ola --help` stays instant.
"""

from __future__ import annotations

import json

import typer

from .errors import user_errors
from .groups import Groups


def _parse_overrides(items: list[str]) -> dict[str, str]:
    overrides = {}
    for item in items:
        name, sep, model = item.partition("=")
        if not sep or not name or not model:
            raise ValueError(f"--teacher {item!r}: expected NAME=PATH_OR_ID, e.g. depth=/models/depth-anything")
        overrides[name.strip()] = model.strip()
    return overrides


def _parse_json(option: str, text: str) -> dict:
    try:
        value = json.loads(text) if text else {}
    except json.JSONDecodeError as exc:
        raise ValueError(f"{option}: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{option}: expected a JSON object")
    return value


def precompute_command(
    corpus: str = typer.Argument(..., help="WebDataset tar shards: a folder, a brace pattern (shard-{000000..000099}.tar) or an fsspec URL."),
    cache: str = typer.Argument(..., help="Target cache root: a local folder or an fsspec URL (s3://bucket/prefix)."),
    teachers: str = typer.Option("depth,seg,gen", "--teachers", help="Comma-separated teachers to compute (and resume)."),
    preset: str = typer.Option("paper", "--preset", help="Teacher weights: paper (hub checkpoints of method.md), tiny or small (seeded random, offline)."),
    teacher: list[str] = typer.Option([], "--teacher", help="NAME=PATH_OR_ID: other weights for a preset teacher, same recipe; NAME=KIND:PATH_OR_ID adds a teacher (KIND: depth_anything, oneformer_swin, clip_image_embeds; list NAME in --teachers). Repeatable."),
    dtype: str = typer.Option("float16", "--dtype", help="Storage dtype: float16, bfloat16 or int8 (lossy; fidelity recorded per shard)."),
    compute_dtype: str = typer.Option("auto", "--compute-dtype", help="Teacher compute dtype: auto (float16 on GPU, float32 on CPU), float32, float16, bfloat16."),
    batch_size: int = typer.Option(16, "--batch-size", help="Images per teacher forward (batches never cross shards)."),
    address: str | None = typer.Option(None, "--address", help="Ray cluster to join (e.g. auto or ray://host:10001); default: start a local Ray."),
    actors: int | None = typer.Option(None, "--actors", help="Teacher actors (default: one per GPU, 1 without GPUs)."),
    num_gpus: int | None = typer.Option(None, "--num-gpus", help="GPUs to use (default: all that Ray sees; 0 = CPU only)."),
    shards_in_flight: int | None = typer.Option(None, "--shards-in-flight", help="Shards preprocessed at once (default 2 x actors + 1)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan (shards done / to do, samples, bytes) and exit. Loads the teachers on CPU for their specs."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a teacher whose stored spec differs (deletes its committed shards)."),
    storage_options: str = typer.Option("", "--storage-options", help='JSON fsspec options of the cache, e.g. \'{"endpoint_url": "http://127.0.0.1:9000"}\'.'),
    corpus_storage_options: str = typer.Option("", "--corpus-storage-options", help="JSON fsspec options of the corpus."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bar with images/s and ETA on stderr."),
) -> None:
    """Compute teacher targets for every image of CORPUS into CACHE (resumable; rerun to finish)."""
    with user_errors():
        from olavlm.pipeline.precompute import PrecomputeConfig, plan_precompute, precompute
        from olavlm.schemas.cache import SpecMismatchError

        config = PrecomputeConfig(
            corpus=corpus, cache=cache, teachers=tuple(t.strip() for t in teachers.split(",") if t.strip()),
            preset=preset, overrides=_parse_overrides(teacher), dtype=dtype, compute_dtype=compute_dtype,
            batch_size=batch_size, address=address, actors=actors, num_gpus=num_gpus,
            shards_in_flight=shards_in_flight, dry_run=dry_run, overwrite=overwrite,
            storage_options=_parse_json("--storage-options", storage_options),
            corpus_storage_options=_parse_json("--corpus-storage-options", corpus_storage_options),
            progress=progress,
        )
        if dry_run:
            typer.echo(plan_precompute(config).describe())
            return
        try:
            summary = precompute(config)
        except SpecMismatchError as exc:
            raise ValueError(f"{exc} (rerun with --overwrite to replace that teacher's targets)") from None
        typer.echo(summary.describe())


def bench_precompute_command(
    as_json: bool = typer.Option(False, "--json", help="Print the figures as one JSON object."),
    preset: str = typer.Option("small", "--preset", help="Teachers to time (small: teacher compute dominates on a CPU)."),
    images: int = typer.Option(96, "--images", help="Images in the benchmark corpus (built on the fly from skimage photos)."),
    shards: int = typer.Option(3, "--shards", help="Corpus shards."),
    batch_size: int = typer.Option(16, "--batch-size", help="Images per teacher forward, in both measurements."),
    teachers: str = typer.Option("depth,seg,gen", "--teachers", help="Comma-separated teachers."),
    teacher_threads: int = typer.Option(0, "--teacher-threads", help="torch threads of the teachers (0 = all cores). "
                                        "1 on a 2-core machine leaves a core to decoding, as a GPU node does."),
) -> None:
    """Teacher busy fraction: pipeline images/s over a bare batched forward loop on pre-decoded inputs."""
    with user_errors():
        from olavlm.pipeline.bench import BenchConfig, run_precompute_bench

        result = run_precompute_bench(BenchConfig(
            preset=preset, images=images, shards=shards, batch_size=batch_size, teacher_threads=teacher_threads,
            teachers=tuple(t.strip() for t in teachers.split(",") if t.strip()),
        ))
        typer.echo(json.dumps(result, indent=2) if as_json else "\n".join(f"{k}: {v}" for k, v in result.items()))


def register(groups: Groups) -> None:
    """Add `ola precompute` and `ola bench precompute`."""
    groups.root.command("precompute")(precompute_command)
    groups.bench.command("precompute")(bench_precompute_command)
