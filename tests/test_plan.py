"""`ola precompute --dry-run` counts the samples of every kind of shard, `pipe:` commands included
(pipeline/plan.py reads a piped tar through once; before, a pipe: shard counted 0)."""

from __future__ import annotations

from typer.testing import CliRunner

from olavlm.pipeline.plan import count_samples
from olavlm.schemas.corpus import list_shards
from tests._precompute_data import build_corpus


def test_dry_run_counts_pipe_shards(tmp_path):
    from olavlm.cli.app import app

    build_corpus(tmp_path / "corpus", shards=2, per_shard=3)
    corpus = f"pipe:cat {tmp_path}/corpus/shard-{{000000..000001}}.tar"
    result = CliRunner().invoke(
        app,
        [
            "precompute",
            corpus,
            str(tmp_path / "cache"),
            "--preset",
            "tiny",
            "--teachers",
            "depth,gen",
            "--dry-run",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "corpus: 2 shards, 6 samples" in result.output
    assert "0 shards done, 2 to do (6 samples)" in result.output
    assert not (tmp_path / "cache").exists()


def test_a_failing_pipe_counts_what_it_delivered(tmp_path):
    build_corpus(tmp_path, shards=1, per_shard=4)
    tar = tmp_path / "shard-000000.tar"
    (whole,) = list_shards(f"pipe:cat {tar}")
    assert count_samples(whole) == 4
    # the first 3 KB: the first sample's headers and part of its data, then the command fails
    (cut,) = list_shards(f"pipe:head -c 3072 {tar}; exit 3 # shard-000000.tar")
    assert 0 < count_samples(cut) < 4
    (missing,) = list_shards(f"pipe:cat {tmp_path}/absent.tar")
    assert count_samples(missing) == 0
