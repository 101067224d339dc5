"""`ola corpus demo` and `ola corpus from-llava`: one call each into schemas/corpus_build.py."""

from __future__ import annotations

from pathlib import Path

import typer

from .errors import user_errors
from .groups import Groups


def demo(
    out: Path = typer.Argument(..., help="Folder for the WebDataset shards (demo-000000.tar, ...)."),
    samples: int = typer.Option(256, help="Number of samples."),
    shard_size: int = typer.Option(64, help="Samples per shard."),
) -> None:
    """Build the offline demo corpus.

    Real photographs shipped inside scikit-image and scikit-learn,
    with deterministic crops, flips and scales; each sample a JPEG and a LLaVA-style `json`
    (`conversations`: a caption turn and a question/answer turn)."""
    from olavlm.schemas.corpus_build import build_demo_corpus

    with user_errors():
        built = build_demo_corpus(out, samples=samples, shard_size=shard_size)
    typer.echo(f"wrote {built.samples} samples in {built.shards} shards to {built.out}")


def from_llava(
    json_path: Path = typer.Argument(..., metavar="JSON", help="LLaVA training JSON (a list of entries)."),
    image_root: Path = typer.Argument(..., help="Folder the entries' `image` paths are relative to."),
    out: Path = typer.Argument(..., help="Folder for the WebDataset shards (llava-000000.tar, ...)."),
    shard_size: int = typer.Option(1000, help="Samples per shard."),
    prefix: str = typer.Option("llava", help="Shard file name prefix."),
) -> None:
    """Convert LLaVA's JSON format into WebDataset shards (image bytes as on disk + `json`).

    Entries with a missing image or malformed fields are reported with their ids
    (also in OUT/from_llava_report.json) and skipped; keys are stable across reruns. A rerun
    into OUT replaces the earlier shards: the new set is written first, then the rest removed."""
    from olavlm.schemas.corpus_build import LLAVA_REPORT, convert_llava

    with user_errors():
        report = convert_llava(
            str(json_path), str(image_root), str(out), shard_size=shard_size, prefix=prefix
        )
    for problem in report.problems[:20]:
        typer.secho(
            f"skipped entry {problem['index']} (id {problem['id']!r}): {problem['reason']}",
            fg=typer.colors.YELLOW,
            err=True,
        )
    if len(report.problems) > 20:
        typer.secho(
            f"... {len(report.problems) - 20} more in {out / LLAVA_REPORT}", fg=typer.colors.YELLOW, err=True
        )
    typer.echo(
        f"wrote {report.samples} samples ({report.text_only} text-only) in {len(report.shards)} shards "
        f"to {out}; {len(report.problems)} entries skipped (see {out / LLAVA_REPORT})"
    )
    if report.renamed:
        examples = ", ".join(f"{r['id']!r} -> {r['key']!r}" for r in report.renamed_examples[:3])
        typer.echo(
            f"{report.renamed} samples keyed other than their id (characters outside [A-Za-z0-9_-], a "
            f"repeated or missing id), e.g. {examples}; more examples in {out / LLAVA_REPORT}"
        )
    if report.removed:
        typer.echo(
            f"removed {len(report.removed)} shards of an earlier conversion into {out} "
            f"({', '.join(report.removed[:3])}{', ...' if len(report.removed) > 3 else ''})"
        )


def register(groups: Groups) -> None:
    groups.corpus.command("demo")(demo)
    groups.corpus.command("from-llava")(from_llava)
