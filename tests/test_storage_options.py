"""`--storage-options` (fsspec options as JSON) on every command that reads a corpus or a cache, against the
local S3 server (moto, 127.0.0.1): `ola train` (DataConfig.storage_options), `ola cache stats|verify|show`,
`ola probe` (issue 12). `ola eval` reads neither (a benchmark parquet and a checkpoint)."""

from __future__ import annotations

import json

import fsspec
import pytest
from typer.testing import CliRunner

from tests._trainer_data import make_cache, make_corpus

SHAPES = {"gen": (1, 24), "depth": (64, 32), "seg": (64, 48)}
"""The tiny student's target shapes (64 image tokens)."""


def ola(*args: str):
    from olavlm.cli.app import app

    return CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})


@pytest.fixture(scope="module")
def on_s3(s3_options, tmp_path_factory):
    """A corpus and its cache, written locally and copied to s3://olavlm/so/; the options as JSON."""
    local = tmp_path_factory.mktemp("so")
    samples = make_corpus(local / "corpus", shards=2, per_shard=4)
    make_cache(local / "cache", samples, shapes=SHAPES)
    fs = fsspec.filesystem("s3", **s3_options)
    fs.put(str(local / "corpus"), "olavlm/so/corpus", recursive=True)
    fs.put(str(local / "cache"), "olavlm/so/cache", recursive=True)
    return "s3://olavlm/so/corpus", "s3://olavlm/so/cache", json.dumps(s3_options), samples, local


@pytest.mark.timeout(300)
def test_cache_commands(on_s3, tmp_path):
    corpus, cache, options, samples, _ = on_s3
    stats = ola("cache", "stats", cache, "--json", "--storage-options", options)
    assert stats.exit_code == 0, stats.output
    assert {n: t["rows"] for n, t in json.loads(stats.output)["teachers"].items()} == {t: 8 for t in SHAPES}
    verify = ola("cache", "verify", cache, "--corpus", corpus, "--storage-options", options)
    assert verify.exit_code == 0 and "OK" in verify.output and "8 corpus samples" in verify.output, (
        verify.output
    )
    key = sorted(samples)[0]
    show = ola(
        "cache",
        "show",
        cache,
        key,
        "--corpus",
        corpus,
        "--out",
        str(tmp_path / "k.png"),
        "--storage-options",
        options,
    )
    assert show.exit_code == 0, show.output
    assert (tmp_path / "k.png").stat().st_size > 0
    assert "s3" not in fsspec.config.conf  # the options did not leak into this process's defaults
    bad = ola("cache", "stats", cache, "--storage-options", "[1]")
    assert bad.exit_code != 0 and "JSON object" in bad.output


@pytest.mark.timeout(300)
def test_train_and_probe(on_s3, tmp_path):
    corpus, cache, options, _, _ = on_s3
    run = ola(
        "train",
        "--preset",
        "tiny",
        "--data",
        corpus,
        "--cache",
        cache,
        "--storage-options",
        options,
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--num-workers",
        "0",
        "--max-length",
        "256",
        "--out",
        str(tmp_path / "run"),
        "--save-every",
        "2",
    )
    assert run.exit_code == 0, run.output
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["data"]["storage_options"] == json.loads(options)
    probe = ola(
        "probe",
        str(tmp_path / "run"),
        "--data",
        corpus,
        "--cache",
        cache,
        "--storage-options",
        options,
        "--out",
        str(tmp_path / "probe"),
        "--teachers",
        "gen",
        "--layers",
        "1",
        "--steps",
        "1",
        "--batch-size",
        "4",
        "--heldout-percent",
        "50",
        "--device",
        "cpu",
    )
    assert probe.exit_code == 0, probe.output
    rows = json.loads((tmp_path / "probe" / "probe.json").read_text())["rows"]
    assert [(r["teacher"], r["layer"]) for r in rows] == [("gen", 1)]
