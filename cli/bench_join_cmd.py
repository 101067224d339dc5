"""`ola bench join`: the keyed join's key map, a per-worker dict against the on-disk key index.

One call into bench/join.py, then a table (or JSON). Its own module so that cli/bench_cmds.py
stays with the other benchmarks' owner; cost: one more file in cli/.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from .errors import user_errors
from .groups import Groups


def bench_join_command(
    keys: int = typer.Option(1_000_000, "--keys", min=1, help="Synthetic keys in the temporary cache."),
    shards: int = typer.Option(100, "--shards", min=1, help="Cache shards the keys are spread over."),
    lookups: int = typer.Option(
        100_000, "--lookups", min=1, help="Lookups timed per kind (random, shard order)."
    ),
    memory_budget_mb: int = typer.Option(
        256, "--memory-budget-mb", min=1, help="The key index build's sort budget (ola cache index's option)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the figures as JSON."),
    tmp: Path | None = typer.Option(None, help="Folder for the temporary cache (default: system temp)."),
) -> None:
    """Key map build time, memory and lookups/s: a dict vs the on-disk key index.

    Each method runs in a fresh subprocess (as a DataLoader worker would meet it); memory is that
    process's peak RSS and the private memory the map added (docs/BENCHMARKS.md "Keyed-join key index")."""
    from olavlm.bench.join import bench_join
    from olavlm.schemas.errors import ConfigError

    with user_errors():
        if shards > keys:
            raise ConfigError(f"--shards {shards} is more than --keys {keys}")
        result = bench_join(
            keys=keys,
            shards=shards,
            lookups=lookups,
            root=str(tmp) if tmp else None,
            memory_budget_mb=memory_budget_mb,
        )
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    typer.echo(
        f"{result['keys']:,} keys in {result['shards']} shards, {result['lookups_per_kind']:,} lookups per kind, "
        f"index sort budget {result['memory_budget_mb']} MB; interpreter + imports: "
        f"{result['interpreter_anon_mb']:.0f} MB private"
    )
    typer.echo(
        f"{'method':<9} {'build s':>8} {'open s':>8} {'build peak MB':>14} {'peak RSS MB':>12} "
        f"{'private +MB':>12} {'random/s':>10} {'in order/s':>11} {'disk MB':>8}"
    )
    for name, r in result["methods"].items():
        typer.echo(
            f"{name:<9} {r['build_s']:>8.2f} {r['open_s']:>8.3f} {r['build_peak_rss_mb']:>14.0f} "
            f"{r['peak_rss_mb']:>12.0f} {r['anon_added_mb']:>12.1f} {r['random_lookups_per_s']:>10,.0f} "
            f"{r['shard_order_lookups_per_s']:>11,.0f} {r['disk_bytes'] / 1e6:>8.1f}"
        )


def register(groups: Groups) -> None:
    groups.bench.command("join")(bench_join_command)
