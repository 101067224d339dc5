"""`ola corpus demo`: the bundled demo corpus."""

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
    from olavlm.pipeline.demo_corpus import build_demo_corpus

    with user_errors():
        built = build_demo_corpus(out, samples=samples, shard_size=shard_size)
    typer.echo(f"wrote {built.samples} samples in {built.shards} shards to {built.out}")


def register(groups: Groups) -> None:
    groups.corpus.command("demo")(demo)
