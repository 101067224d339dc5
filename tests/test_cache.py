"""The target cache contract: round trips, atomic commits, spec refusal, safe paths, outside readers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from olavlm.schemas import quant
from olavlm.schemas.cache import CacheError, SampleError, SpecMismatchError, TargetCache
from olavlm.schemas.errors import UnsafeNameError
from olavlm.schemas.spec import TeacherSpec
from olavlm.schemas.synthetic import feature_like

from .conftest import write_random_teacher


def spec(name="depth", dtype="float16", shape=(64, 32), **kw) -> TeacherSpec:
    return TeacherSpec(name=name, kind="synthetic", model="m", shape=shape, dtype=dtype, **kw)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_16bit_round_trip_is_bit_exact(tmp_path, dtype):
    cache = TargetCache(tmp_path)
    cache.register(spec(dtype=dtype))
    x = feature_like(70, 64, 32)  # 70 rows: two storage objects, the second partial
    values, scale = quant.encode(x, dtype)
    cache.write_shard("depth", "s0", [f"k{i}" for i in range(70)], ["0" * 64] * 70, values, scale)
    reader = cache.open_shard("depth", "s0")
    stored, _ = reader.read_stored(slice(0, 70))
    assert stored.dtype == values.dtype and np.array_equal(stored, values)
    reference = torch.from_numpy(x).to(getattr(torch, dtype)).float().numpy()
    np.testing.assert_array_equal(reader.read(slice(0, 70)), reference)  # our bf16 rounding == torch's
    np.testing.assert_array_equal(reader.read(69), reference[69])


def test_int8_fidelity_on_feature_like_data(tmp_path):
    cache = TargetCache(tmp_path)
    cache.register(spec(dtype="int8", shape=(576, 1024)))
    x = feature_like(8, 576, 1024, seed=3)
    values, scale = quant.encode(x, "int8")
    cache.write_shard("depth", "s0", [f"k{i}" for i in range(8)], ["0" * 64] * 8, values, scale)
    decoded = cache.open_shard("depth", "s0").read(slice(0, 8))
    assert quant.fidelity(x, decoded)["cosine_min"] >= 0.999
    fp16 = TargetCache(tmp_path / "fp16")
    fp16.register(spec(shape=(576, 1024)))
    fp16.write_shard("depth", "s0", [f"k{i}" for i in range(8)], ["0" * 64] * 8, *quant.encode(x, "float16"))
    assert cache.root.size("depth") <= 0.55 * fp16.root.size("depth")


def test_get_by_key_and_manifest(tmp_path):
    cache = TargetCache(tmp_path)
    _, data = write_random_teacher(
        cache, "seg", {"a": ["x0", "x1"], "b": ["y0", "y1", "y2"]}, dtype="float16"
    )
    np.testing.assert_allclose(cache.get("seg", "y2"), data["b"][2], rtol=1e-3, atol=1e-3)
    manifest = cache.manifest("seg")
    assert manifest.column("key").to_pylist() == ["x0", "x1", "y0", "y1", "y2"]
    assert set(manifest.column("fingerprint").to_pylist()) == {cache.spec("seg").fingerprint}
    with pytest.raises(KeyError, match="nope"):
        cache.get("seg", "nope")
    with pytest.raises(IndexError, match="out of range"):
        cache.open_shard("seg", "a").read(5)


def test_spec_mismatch_is_refused_and_overwrite_clears(tmp_path):
    cache = TargetCache(tmp_path)
    write_random_teacher(cache, "depth", {"s0": ["a", "b"]})
    changed = TeacherSpec(
        name="depth",
        kind="synthetic",
        model="synthetic",
        shape=(16, 8),
        dtype="float16",
        preprocess={"size": 336},
    )
    with pytest.raises(SpecMismatchError, match=r"differs in: preprocess\.size: None -> 336"):
        cache.register(changed)
    assert cache.committed_shards("depth") == ["s0"]  # nothing lost
    cache.register(changed, overwrite=True)
    assert cache.committed_shards("depth") == []
    assert cache.spec("depth").fingerprint == changed.fingerprint


def test_rewrite_of_committed_shard_is_idempotent(tmp_path):
    cache = TargetCache(tmp_path)
    write_random_teacher(cache, "gen", {"s0": ["a"]}, shape=(1, 8))
    before = cache.open_shard("gen", "s0").read(0)
    again = cache.write_shard("gen", "s0", ["a"], ["0" * 64], np.ones((1, 1, 8), np.float16))
    assert not again.written
    np.testing.assert_array_equal(cache.open_shard("gen", "s0").read(0), before)


def test_unsafe_names_never_leave_the_root(tmp_path):
    root = tmp_path / "cache"
    cache = TargetCache(root)
    cache.register(spec(shape=(1, 4)))
    with pytest.raises(UnsafeNameError, match="safe path"):  # an OlaError: `ola` prints one red line
        cache.write_shard("depth", "../escape", ["k"], ["0" * 64], np.zeros((1, 1, 4), np.float16))
    # keys are data, never paths: a key with ../ lands in the manifest only
    cache.write_shard("depth", "s0", ["../../evil", "/abs"], ["0" * 64] * 2, np.zeros((2, 1, 4), np.float16))
    assert sorted(os.listdir(tmp_path)) == ["cache"]
    assert cache.manifest("depth").column("key").to_pylist() == ["../../evil", "/abs"]
    with pytest.raises(UnsafeNameError):
        cache.root.join("..", "x")


def test_errors_table_and_commit_counts(tmp_path):
    cache = TargetCache(tmp_path)
    cache.register(spec(shape=(1, 4)))
    cache.write_shard(
        "depth",
        "s0",
        ["ok"],
        ["0" * 64],
        np.zeros((1, 1, 4), np.float16),
        errors=[SampleError("bad", "decode", "not a decodable image")],
    )
    errors = cache.errors()
    assert errors.to_pylist() == [
        {
            "key": "bad",
            "shard": "s0",
            "teacher": "depth",
            "stage": "decode",
            "reason": "not a decodable image",
        }
    ]
    assert cache.commit_info("depth", "s0")["errors"] == 1


def test_wrong_shapes_and_dtypes_are_refused(tmp_path):
    cache = TargetCache(tmp_path)
    cache.register(spec(shape=(2, 4)))
    with pytest.raises(CacheError, match="shape"):
        cache.write_shard("depth", "s0", ["a"], ["0" * 64], np.zeros((1, 2, 5), np.float16))
    with pytest.raises(CacheError, match="float32"):
        cache.write_shard("depth", "s0", ["a"], ["0" * 64], np.zeros((1, 2, 4), np.float32))
    with pytest.raises(CacheError, match="duplicate"):
        cache.write_shard("depth", "s0", ["a", "a"], ["0" * 64] * 2, np.zeros((2, 2, 4), np.float16))
    assert cache.committed_shards("depth") == []


KILL_WRITER = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    from olavlm.schemas import shardfile, quant
    from olavlm.schemas.cache import TargetCache
    from olavlm.schemas.spec import TeacherSpec
    real = shardfile.encode_object
    calls = []
    def dying(*a, **k):
        calls.append(1)
        if len(calls) == 2:  # first object written, second in progress: die like a SIGKILLed worker
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*a, **k)
    shardfile.encode_object = dying
    cache = TargetCache(sys.argv[1])
    cache.register(TeacherSpec(name="depth", kind="synthetic", model="m", shape=(4, 4)))
    cache.write_shard("depth", "s0", [str(i) for i in range(100)], ["0" * 64] * 100,
                      np.ones((100, 4, 4), np.float16))
""")


@pytest.mark.timeout(120)
def test_killed_writer_leaves_nothing_committed(tmp_path):
    proc = subprocess.run([sys.executable, "-c", KILL_WRITER, str(tmp_path)], timeout=100)
    assert proc.returncode == -9
    cache = TargetCache(tmp_path)
    assert cache.committed_shards("depth") == []
    assert not cache.is_committed("depth", "s0")
    assert os.listdir(tmp_path / "depth" / ".staging")  # the partial write stayed out of sight
    cache.clean_staging("depth")
    cache.write_shard(
        "depth", "s0", [str(i) for i in range(100)], ["0" * 64] * 100, np.ones((100, 4, 4), np.float16)
    )
    assert len(cache.open_shard("depth", "s0")) == 100
    assert not (tmp_path / "depth" / ".staging").exists() or not os.listdir(tmp_path / "depth" / ".staging")


OUTSIDE_READER = textwrap.dedent("""
    import importlib.abc, json, sys
    class NoOlavlm(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] == "olavlm":
                raise ImportError("olavlm must not be needed to read a cache")
    sys.meta_path.insert(0, NoOlavlm())
    import numpy as np, pyarrow.parquet as pq, zarr
    root = sys.argv[1]
    meta = json.load(open(f"{root}/cache.json"))
    out = {}
    for teacher, entry in meta["teachers"].items():
        manifest = pq.read_table(f"{root}/{teacher}/s0/manifest.parquet").to_pylist()
        group = zarr.open_group(f"{root}/{teacher}/s0/data.zarr", mode="r")
        values = group["targets"][:]
        if entry["spec"]["dtype"] == "int8":
            x = values.astype(np.float32) * group["scale"][:][..., None]
        elif entry["spec"]["dtype"] == "bfloat16":
            x = (values.astype(np.uint32) << 16).view(np.float32)
        else:
            x = values.astype(np.float32)
        out[teacher] = {m["key"]: x[m["row"]].tolist() for m in manifest}
    json.dump(out, sys.stdout)
""")


def test_cache_is_readable_without_olavlm(tmp_path):
    cache = TargetCache(tmp_path)
    expected = {}
    for dtype in ("float16", "bfloat16", "int8"):
        name = f"t_{dtype}"
        write_random_teacher(cache, name, {"s0": ["a", "b", "c"]}, shape=(4, 8), dtype=dtype)
        expected[name] = {k: cache.get(name, k) for k in ("a", "b", "c")}
    proc = subprocess.run(
        [sys.executable, "-c", OUTSIDE_READER, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    got = json.loads(proc.stdout)
    for name, rows in expected.items():
        for key, value in rows.items():
            np.testing.assert_allclose(np.array(got[name][key]), value, rtol=0, atol=0)


def test_duckdb_reads_manifests(tmp_path):
    import duckdb

    cache = TargetCache(tmp_path)
    write_random_teacher(cache, "depth", {"s0": ["a", "b"], "s1": ["c"]})
    write_random_teacher(cache, "gen", {"s0": ["a", "b"], "s1": ["c"]}, shape=(1, 8))
    rows = duckdb.sql(
        f"select teacher, count(*) n from read_parquet('{tmp_path}/*/*/manifest.parquet') "
        "group by teacher order by teacher"
    ).fetchall()
    assert rows == [("depth", 3), ("gen", 3)]


def test_row_slices_must_be_contiguous(tmp_path):
    cache = TargetCache(tmp_path)
    write_random_teacher(cache, "depth", {"s0": ["a", "b", "c"]})
    with pytest.raises(ValueError, match="step 2"):
        cache.open_shard("depth", "s0").read(slice(0, 3, 2))


def test_key_index_is_cached_and_sees_new_shards(tmp_path):
    cache = TargetCache(tmp_path)
    _, first = write_random_teacher(cache, "gen", {"s0": ["a"]}, shape=(1, 8))
    assert cache.index("gen") is cache.index("gen")  # built once, not per lookup
    np.testing.assert_allclose(cache.get("gen", "a"), first["s0"][0], atol=1e-2)
    values, _ = quant.encode(feature_like(1, 1, 8, seed=9), "float16")
    cache.write_shard("gen", "s1", ["b"], ["0" * 64], values)
    np.testing.assert_array_equal(cache.get("gen", "b"), values[0].astype(np.float32))
