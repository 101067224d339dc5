"""`ola cache stats|verify|show|index`, and the `--storage-options` option that every command reading a cache takes.

`--storage-options` is one JSON object of fsspec options (endpoint, credentials profile, ...)
for the cache URL and, where given, the corpus URL. Cost: one set of options for both; two
buckets with different endpoints need the environment (AWS_* variables, ~/.aws) instead.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from .errors import user_errors
from .groups import Groups

STORAGE_OPTIONS_HELP = (
    "fsspec options as a JSON object, for the cache and corpus URLs, e.g. "
    '\'{"endpoint_url": "http://127.0.0.1:9000"}\' (default: the environment\'s).'
)


def parse_storage_options(text: str | None) -> dict | None:
    """`--storage-options` JSON -> dict (None when not given); a ConfigError names what is wrong."""
    from olavlm.schemas.errors import ConfigError

    if not text:
        return None
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"--storage-options is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"--storage-options must be a JSON object, got {type(value).__name__}")
    return value


def _mb(n: float | None) -> str:
    return "-" if n is None else f"{n / 1e6:,.2f} MB"


def _num(x: float | None, fmt: str = "{:.3f}") -> str:
    return "-" if x is None else fmt.format(x)


def stats(
    cache: str = typer.Argument(..., help="Cache root: folder or fsspec URL (s3://bucket/cache)."),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON instead of tables."),
    per_shard: bool = typer.Option(False, "--shards", help="Also list every shard."),
    sample_rows: int = typer.Option(16, help="Rows per shard read for the value statistics."),
    storage_options: str | None = typer.Option(None, "--storage-options", help=STORAGE_OPTIONS_HELP),
) -> None:
    """Per-teacher statistics of a cache.

    Per teacher (and shard): samples, shape, dtype, bytes on disk, compression, value statistics,
    error counts, and for int8 the fidelity recorded against the teachers' float32 outputs."""
    from rich.console import Console
    from rich.table import Table

    from olavlm.schemas.cache import TargetCache
    from olavlm.schemas.inspect import cache_stats

    with user_errors():
        report = cache_stats(
            TargetCache(cache, parse_storage_options(storage_options)), sample_rows=sample_rows
        )
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    table = Table(title=f"target cache {report['root']}")
    for column in (
        "teacher",
        "shards",
        "samples",
        "errors",
        "shape",
        "dtype",
        "on disk",
        "per image",
        "compression",
        "mean",
        "std",
        "mean L2",
        "cosine (int8)",
        "fingerprint",
    ):
        table.add_column(
            column, justify="right" if column not in ("teacher", "dtype", "fingerprint") else "left"
        )
    for name, t in report["teachers"].items():
        shards = t["shards"]
        rows = max(t["rows"], 1)
        mean = sum((s["mean"] or 0) * s["rows"] for s in shards) / rows
        std = sum((s["std"] or 0) * s["rows"] for s in shards) / rows
        l2 = sum((s["mean_l2"] or 0) * s["rows"] for s in shards) / rows
        fid = t["fidelity"]
        table.add_row(
            name,
            str(len(shards)),
            str(t["rows"]),
            str(t["errors"]),
            "x".join(map(str, t["shape"])),
            t["dtype"],
            _mb(t["bytes"]),
            _mb(t["bytes_per_row"]),
            _num(t["compression"], "{:.2f}x"),
            _num(mean),
            _num(std),
            _num(l2, "{:.2f}"),
            "-" if not fid else f"{fid['cosine_mean']:.5f} (min {fid['cosine_min']:.5f})",
            t["fingerprint"],
        )
        if per_shard:
            for s in shards:
                table.add_row(
                    f"  {s['shard']}",
                    "",
                    str(s["rows"]),
                    str(s["errors"]),
                    "",
                    "",
                    _mb(s["bytes"]),
                    "",
                    _num(s["compression"], "{:.2f}x"),
                    _num(s["mean"]),
                    _num(s["std"]),
                    _num(s["mean_l2"], "{:.2f}"),
                    "",
                    "",
                )
    # off a terminal (pipes, CI logs) rich would squeeze the table into 80 columns
    Console(width=None if sys.stdout.isatty() else 220).print(table)


def verify(
    cache: str = typer.Argument(..., help="Cache root: folder or fsspec URL."),
    corpus: str | None = typer.Option(
        None,
        help="Also check against this corpus: every key present or recorded "
        "as an error, every image sha256 unchanged.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    storage_options: str | None = typer.Option(None, "--storage-options", help=STORAGE_OPTIONS_HELP),
) -> None:
    """Check a cache (and a corpus against it); exit 1 on any problem.

    Every shard readable, row counts match the manifest, no duplicate keys, metadata
    consistent; with --corpus, the corpus against the cache. Exits 1 if any problem is found, naming each."""
    from olavlm.schemas.cache import TargetCache
    from olavlm.schemas.inspect import verify_cache

    with user_errors():
        options = parse_storage_options(storage_options)
        report = verify_cache(TargetCache(cache, options), corpus=corpus, storage_options=options)
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        for problem in report.problems:
            typer.secho(f"problem: {problem}", fg=typer.colors.RED, err=True)
        status = "OK" if report.ok else f"{len(report.problems)} problem(s)"
        typer.echo(
            f"{status}: {report.checked_shards} shards, {report.checked_rows} rows read"
            + (f", {report.corpus_samples} corpus samples checked" if corpus else "")
        )
    if not report.ok:
        raise typer.Exit(1)


def show(
    cache: str = typer.Argument(..., help="Cache root."),
    key: str = typer.Argument(..., help="Sample key."),
    out: Path = typer.Option(..., "--out", help="PNG file to write."),
    corpus: str | None = typer.Option(
        None, help="Corpus the cache was computed from, to draw the image too."
    ),
    storage_options: str | None = typer.Option(None, "--storage-options", help=STORAGE_OPTIONS_HELP),
) -> None:
    """Render one sample's targets to a PNG.

    Its image beside each teacher's target (token grids as RGB from their first
    three principal components, the gen embedding as a bar strip), with dtype and fidelity noted."""
    from olavlm.pipeline.show import render_sample

    with user_errors():
        result = render_sample(
            cache, key, str(out), corpus=corpus, storage_options=parse_storage_options(storage_options)
        )
    typer.echo(f"wrote {result['out']} ({', '.join(f'{k}: {v}' for k, v in result['panels'].items())})")


def index(
    cache: str = typer.Argument(..., help="Cache root: folder or fsspec URL."),
    teacher: list[str] = typer.Option(
        None, "--teacher", help="Only this teacher (repeatable; default: all)."
    ),
    memory_budget_mb: int = typer.Option(
        256,
        "--memory-budget-mb",
        min=1,
        help="Records sorted at once while building (bounds the build's memory).",
    ),
    storage_options: str | None = typer.Option(None, "--storage-options", help=STORAGE_OPTIONS_HELP),
) -> None:
    """Build the key index of each teacher (what the trainer's keyed join reads).

    Sorted key hashes -> (shard, row, sha256), memory-mapped by readers (schemas/keyindex.py). Kept
    in the cache for local caches, in $OLAVLM_INDEX_DIR (default ~/.cache/olavlm/keyindex) for
    object-store ones. An index that is current is left as it is; one of an older state is replaced."""
    import time

    from olavlm.schemas.cache import CacheError, TargetCache
    from olavlm.schemas.keyindex import open_index

    with user_errors():
        root = TargetCache(cache, parse_storage_options(storage_options))
        teachers = list(root.metadata()["teachers"])
        unknown = sorted(set(teacher or ()) - set(teachers))
        if unknown:
            raise CacheError(f"{root.root.url}: no teacher(s) {unknown} (cache has {sorted(teachers)})")
        for name in teacher or teachers:
            start = time.perf_counter()
            shards = root.committed_shards(name)
            built = open_index(root, name, shards, memory_budget=memory_budget_mb * 2**20)
            typer.echo(
                f"{name}: {len(built):,} keys, {len(shards)} shards -> {built.folder} "
                f"({time.perf_counter() - start:.1f} s)"
            )


def register(groups: Groups) -> None:
    groups.cache.command("stats")(stats)
    groups.cache.command("verify")(verify)
    groups.cache.command("show")(show)
    groups.cache.command("index")(index)
