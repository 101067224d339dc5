"""`ola corpus from-llava`, `ola train`, `ola bench loader`, `ola bench train`.

Each command turns its options into one function call into trainer/ (or, for
`bench train`, cli/bench_train.py, which may construct teacher-like models).
"""

from __future__ import annotations

from pathlib import Path

import typer

from .errors import user_errors
from .groups import Groups


def from_llava(
    json_path: Path = typer.Argument(..., metavar="JSON", help="LLaVA training JSON (a list of entries)."),
    image_root: Path = typer.Argument(..., help="Folder the entries' `image` paths are relative to."),
    out: Path = typer.Argument(..., help="Folder for the WebDataset shards (llava-000000.tar, ...)."),
    shard_size: int = typer.Option(1000, help="Samples per shard."),
    prefix: str = typer.Option("llava", help="Shard file name prefix."),
) -> None:
    """Convert LLaVA's JSON format into WebDataset shards (image bytes as on disk + `json`).

    Entries with a missing image or malformed fields are reported with their ids
    (also in OUT/from_llava_report.json) and skipped; keys are stable across reruns."""
    from olavlm.trainer.from_llava import REPORT, convert_llava

    with user_errors():
        report = convert_llava(str(json_path), str(image_root), str(out), shard_size=shard_size, prefix=prefix)
    for problem in report.problems[:20]:
        typer.secho(f"skipped entry {problem['index']} (id {problem['id']!r}): {problem['reason']}",
                    fg=typer.colors.YELLOW, err=True)
    if len(report.problems) > 20:
        typer.secho(f"... {len(report.problems) - 20} more in {out / REPORT}", fg=typer.colors.YELLOW, err=True)
    typer.echo(f"wrote {report.samples} samples ({report.text_only} text-only) in {len(report.shards)} shards "
               f"to {out}; {len(report.problems)} entries skipped (see {out / REPORT})")


def register(groups: Groups) -> None:
    groups.corpus.command("from-llava")(from_llava)
