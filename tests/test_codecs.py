"""Per-dtype default codecs: new caches get them, old caches keep their recorded codec."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from olavlm.schemas import quant
from olavlm.schemas.cache import SpecMismatchError, TargetCache
from olavlm.schemas.spec import STORAGE_DTYPES, CodecSpec, TeacherSpec, default_codec
from olavlm.schemas.synthetic import feature_like

OLD_DEFAULT = {"cname": "zstd", "clevel": 3, "shuffle": "shuffle"}
"""A recorded codec other than the per-dtype default: a cache started with it keeps it."""


def spec(dtype="float16", **kw) -> TeacherSpec:
    return TeacherSpec(name="depth", kind="synthetic", model="m", shape=(16, 8), dtype=dtype, **kw)


def _write(cache: TargetCache, s: TeacherSpec, n: int = 5):
    x = feature_like(n, *s.shape)
    values, scale = quant.encode(x, s.dtype)
    cache.register(s)
    cache.write_shard("depth", "s0", [f"k{i}" for i in range(n)], ["0" * 64] * n, values, scale)
    return x, values


def _blosc_config(tmp_path) -> dict:
    meta = json.loads((tmp_path / "depth" / "s0" / "data.zarr" / "targets" / "zarr.json").read_text())
    inner = meta["codecs"][0]["configuration"]["codecs"]
    return next(c["configuration"] for c in inner if c["name"] == "blosc")


@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
def test_new_spec_gets_the_dtype_default_and_records_it(tmp_path, dtype):
    s = spec(dtype)
    assert s.codec is None and s.storage_codec == default_codec(dtype)
    assert s.to_dict()["codec"] == dataclasses.asdict(default_codec(dtype))
    # naming the default explicitly is the same spec
    assert spec(dtype, codec=default_codec(dtype)).fingerprint == s.fingerprint
    cache = TargetCache(tmp_path)
    _, values = _write(cache, s)
    recorded = json.loads((tmp_path / "cache.json").read_text())["teachers"]["depth"]["spec"]["codec"]
    assert recorded == dataclasses.asdict(default_codec(dtype))
    config = _blosc_config(tmp_path)
    assert (config["cname"], config["clevel"]) == (default_codec(dtype).cname, default_codec(dtype).clevel)
    stored, _ = TargetCache(tmp_path).open_shard("depth", "s0").read_stored(slice(0, 5))
    assert np.array_equal(stored, values)


def test_replacing_the_dtype_takes_the_new_dtypes_default():
    s = dataclasses.replace(spec("float16"), dtype="int8")  # what the pipeline does with --dtype
    assert s.storage_codec == default_codec("int8")
    pinned = dataclasses.replace(spec("float16", codec=CodecSpec(**OLD_DEFAULT)), dtype="int8")
    assert pinned.storage_codec == CodecSpec(**OLD_DEFAULT)  # an explicit codec stays


@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
def test_cache_written_with_the_old_default_zstd_still_reads(tmp_path, dtype):
    old = spec(dtype, codec=CodecSpec(**OLD_DEFAULT))
    x, values = _write(TargetCache(tmp_path), old)
    assert CodecSpec() == CodecSpec(**OLD_DEFAULT)  # a recorded spec without a codec still means zstd
    assert _blosc_config(tmp_path)["cname"] == "zstd"
    cache = TargetCache(tmp_path)  # a fresh reader: the codec comes from cache.json / zarr.json
    assert cache.spec("depth").storage_codec == CodecSpec(**OLD_DEFAULT)
    assert cache.spec("depth").fingerprint == old.fingerprint
    reader = cache.open_shard("depth", "s0")
    stored, _ = reader.read_stored(slice(0, 5))
    assert np.array_equal(stored, values)
    if dtype != "int8":
        np.testing.assert_array_equal(reader.read(slice(0, 5)), quant.decode(values, None, dtype))
    # the new default is a different spec: registering it on the old cache is refused, naming the codec
    with pytest.raises(SpecMismatchError, match="codec"):
        cache.register(spec(dtype))


def test_bench_codecs_measures_every_codec():
    from olavlm.bench.codecs import CODECS, bench_codecs

    result = bench_codecs(samples=1, repeats=1, dtypes=("int8",))
    table = result["dtypes"]["int8"]["codecs"]
    assert set(table) == {label for label, *_ in CODECS}
    assert sum(r["default"] for r in table.values()) == 1
    assert all(r["bytes_per_sample"] > 0 and r["decode_ms"] >= 0 for r in table.values())
    assert table["none"]["saved_vs_none_pct"] == 0.0


def test_bench_loader_runs_per_codec_and_dtype():
    from olavlm.bench.loader import bench_loader_matrix

    results = bench_loader_matrix(("default", "zstd"), ("int8",), samples=16, batch_size=8, workers=0)
    assert [r["target_dtype"] for r in results] == ["int8", "int8"]
    assert "lz4" in results[0]["codec"] and "zstd" in results[1]["codec"]
    assert all(r["samples_per_s_one_core"] > 0 and r["stage_sum_samples_per_s"] > 0 for r in results)


def test_precompute_resumes_a_cache_under_its_stored_codec():
    """A cache started under the old default (zstd) is resumed with zstd, not refused; any other
    difference is still left to `register` to refuse."""
    import dataclasses

    from olavlm.pipeline.precompute import keep_stored_codec
    from olavlm.schemas.spec import CodecSpec, TeacherSpec

    new = TeacherSpec(name="depth", kind="synthetic", model="m", shape=(4, 8), dtype="float16")
    old = dataclasses.replace(new, codec=CodecSpec())  # zstd 3 + shuffle, the former default
    assert new.fingerprint != old.fingerprint and new.storage_codec != old.storage_codec
    assert keep_stored_codec(new, old).fingerprint == old.fingerprint
    assert keep_stored_codec(new, None) is new and keep_stored_codec(new, new) is new
    other = dataclasses.replace(old, model="other weights")
    assert keep_stored_codec(new, other) is new  # not only the codec differs: register refuses it
