"""`ola cache stats|verify` on healthy and damaged caches, through the CLI."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from typer.testing import CliRunner

from olavlm.cli.app import app
from olavlm.schemas.cache import TargetCache
from olavlm.schemas.inspect import verify_cache

from .conftest import corpus_keys, write_random_teacher

runner = CliRunner()


def corpus_cache(tmp_path, demo_corpus, dtype="float16"):
    """A cache with one synthetic teacher whose keys and sha256s match the demo corpus."""
    shards, hashes = corpus_keys(demo_corpus)
    cache = TargetCache(tmp_path / "cache")
    write_random_teacher(cache, "depth", shards, dtype=dtype, sha256s=hashes)
    return cache


def test_verify_ok_with_corpus(tmp_path, demo_corpus):
    cache = corpus_cache(tmp_path, demo_corpus)
    result = runner.invoke(app, ["cache", "verify", str(cache.root.path), "--corpus", demo_corpus, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["ok"] and report["checked_rows"] == 24 and report["corpus_samples"] == 24


def test_verify_names_changed_image_and_missing_key(tmp_path, demo_corpus):
    cache = corpus_cache(tmp_path, demo_corpus)
    manifest_path = os.path.join(cache.root.path, "depth", "demo-000001", "manifest.parquet")
    import pyarrow.parquet as pq

    table = pq.read_table(manifest_path).to_pylist()
    table[3]["sha256"] = "f" * 64  # the image under this key "changed"
    dropped = table.pop()  # and one key lost its target without a recorded error
    for i, row in enumerate(table):
        row["row"] = i
    pq.write_table(
        __import__("pyarrow").Table.from_pylist(table, schema=pq.read_schema(manifest_path)), manifest_path
    )
    report = verify_cache(cache, corpus=demo_corpus)
    assert not report.ok
    text = "\n".join(report.problems)
    assert f"key {table[3]['key']!r}" in text and "image changed" in text
    assert f"key {dropped['key']!r} has no target" in text
    assert "stored rows" in text  # 8 stored rows vs 7 manifest rows
    result = runner.invoke(app, ["cache", "verify", str(cache.root.path), "--corpus", demo_corpus])
    assert result.exit_code == 1


def test_verify_detects_corrupt_object(tmp_path, demo_corpus):
    cache = corpus_cache(tmp_path, demo_corpus)
    obj = os.path.join(cache.root.path, "depth", "demo-000002", "data.zarr", "targets", "c", "0", "0", "0")
    with open(obj, "r+b") as f:
        f.seek(-10, os.SEEK_END)
        f.write(b"\xff" * 6)
    report = verify_cache(cache)
    assert not report.ok and any("demo-000002" in p and "checksum" in p for p in report.problems)


def test_stats_json_reports_bytes_and_fidelity(tmp_path, demo_corpus):
    cache = corpus_cache(tmp_path, demo_corpus, dtype="int8")
    result = runner.invoke(app, ["cache", "stats", str(cache.root.path), "--json"])
    assert result.exit_code == 0, result.output
    depth = json.loads(result.output)["teachers"]["depth"]
    assert depth["rows"] == 24 and depth["dtype"] == "int8" and len(depth["shards"]) == 3
    assert depth["bytes"] == cache.root.size("depth") - sum(
        os.path.getsize(os.path.join(cache.root.path, "depth", s, f))
        for s in cache.committed_shards("depth")
        for f in ("manifest.parquet", "errors.parquet", "commit.json")
    )
    assert depth["compression"] == pytest.approx(
        24 * (16 * 8 * 1 + 16 * 4) / depth["bytes"]
    )  # int8 + f32 scale
    assert np.isfinite(depth["shards"][0]["mean_l2"]) and depth["shards"][0]["mean_l2"] > 0
    table = runner.invoke(app, ["cache", "stats", str(cache.root.path)])
    assert table.exit_code == 0 and "depth" in table.output


def test_missing_cache_is_a_clear_error(tmp_path):
    result = runner.invoke(app, ["cache", "stats", str(tmp_path / "nope")])
    assert result.exit_code == 2
    assert "cache.json not found" in result.output
