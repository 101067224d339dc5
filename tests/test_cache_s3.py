"""The cache on s3:// against a local S3-compatible server (moto, 127.0.0.1 only)."""

from __future__ import annotations

import numpy as np
import pytest

from olavlm.schemas import quant
from olavlm.schemas.cache import TargetCache
from olavlm.schemas.inspect import verify_cache
from olavlm.schemas.spec import TeacherSpec
from olavlm.schemas.synthetic import feature_like


@pytest.mark.timeout(180)
@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_s3_round_trip_and_verify(s3_options, dtype):
    cache = TargetCache(f"s3://olavlm/cache-{dtype}", storage_options=s3_options)
    spec = TeacherSpec(name="depth", kind="synthetic", model="m", shape=(16, 8), dtype=dtype)
    cache.register(spec)
    x = feature_like(70, 16, 8)
    values, scale = quant.encode(x, dtype)
    assert cache.write_shard(
        "depth", "s0", [f"k{i}" for i in range(70)], ["0" * 64] * 70, values, scale
    ).written
    cold = {**s3_options, "skip_instance_cache": True}  # a new s3fs: no listing cached by the writer
    again = TargetCache(f"s3://olavlm/cache-{dtype}", storage_options=cold)
    assert again.committed_shards("depth") == ["s0"]
    stored, stored_scale = again.open_shard("depth", "s0").read_stored(slice(0, 70))
    np.testing.assert_array_equal(stored, values)
    if scale is not None:
        np.testing.assert_array_equal(stored_scale, scale)
    report = verify_cache(again)
    assert report.ok, report.problems
    assert report.checked_rows == 70


@pytest.mark.timeout(180)
def test_s3_uncommitted_prefix_is_invisible_and_cleaned(s3_options):
    cache = TargetCache("s3://olavlm/partial", storage_options=s3_options)
    cache.register(TeacherSpec(name="gen", kind="synthetic", model="m", shape=(1, 4)))
    # a crashed writer's files without commit.json
    with cache.root.fs.open(cache.root.join("gen", "s9", "manifest.parquet"), "wb") as f:
        f.write(b"partial")
    assert cache.committed_shards("gen") == []
    cache.clean_staging("gen")
    assert not cache.root.exists("gen", "s9")
