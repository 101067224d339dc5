"""`--storage-options` (fsspec options as JSON) on every command that reads a corpus or a cache, against the
local S3 server (moto, 127.0.0.1): `ola train` (DataConfig.storage_options), `ola cache stats|verify|show`,
`ola probe`. `ola eval` reads neither (a benchmark parquet and a checkpoint)."""

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


@pytest.mark.timeout(300)
@pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")
def test_loader_workers_read_s3_after_fork(on_s3):
    """Forked DataLoader workers read an S3 corpus and cache: each makes its own file system (an async
    one made in the parent refuses to run in a child). The options keep fsspec's instance cache on,
    as a user's would."""
    import itertools

    from olavlm.schemas.cache import TargetCache
    from olavlm.schemas.config import DataConfig
    from olavlm.trainer.data.loader import build_loader
    from tests._trainer_data import tiny_text_setup

    corpus, cache, options, samples, local = on_s3
    options = json.loads(options)
    tokenizer, layout, transform = tiny_text_setup()
    config = DataConfig(
        data=corpus, cache=cache, storage_options=options, batch_size=2, num_workers=2, shuffle_block=2
    )
    loader = build_loader(
        config, tokenizer=tokenizer, layout=layout, transform=transform, tasks=("gen", "depth", "seg")
    )
    truth = TargetCache(local / "cache")
    seen = set()
    for batch, _ in itertools.islice(iter(loader), 4):  # 8 samples, batch 2: one epoch
        for i, key in enumerate(batch["keys"]):
            seen.add(key)
            for task in SHAPES:
                got = batch["targets"][task][i].float().numpy()
                assert (got == truth.get(task, key)).all(), (task, key)
    assert seen == set(samples)


@pytest.mark.timeout(300)
def test_precompute_applies_storage_options_to_the_corpus(on_s3):
    """One --storage-options reaches both the S3 corpus and the S3 cache of `ola precompute`."""
    corpus, _, options, _, _ = on_s3
    plan = ola(
        "precompute",
        corpus,
        "s3://olavlm/so/precompute-cache",
        "--preset",
        "tiny",
        "--teachers",
        "gen",
        "--storage-options",
        options,
        "--dry-run",
    )
    assert plan.exit_code == 0, plan.output
    assert "corpus: 2 shards, 8 samples" in plan.output, plan.output
