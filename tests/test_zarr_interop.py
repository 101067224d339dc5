"""Zarr both ways: the project's direct shard reader (schemas/shardfile.py) reads what zarr-python writes.

zarr-python leaves out of a shard every inner chunk equal to the fill value and the whole storage
object when all its chunks are; those rows must read as the fill value. The other direction (zarr-python
reads what the project writes) is tests/test_cache.py::test_cache_is_readable_without_olavlm.
"""

from __future__ import annotations

import os

import fsspec
import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec

from olavlm.schemas import quant, shardfile
from olavlm.schemas.cache import CacheError, TargetCache

from .conftest import write_random_teacher

ROWS, T, D, PER_OBJECT = 10, 4, 8, 4  # 3 storage objects, the last one partial


def _zarr_write(group, name, data, fill_value=0, **kwargs):
    array = group.create_array(
        name,
        shape=data.shape,
        chunks=(1, *data.shape[1:]),
        shards=(PER_OBJECT, *data.shape[1:]),
        dtype=data.dtype,
        compressors=[BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")],
        fill_value=fill_value,
        overwrite=True,
        **kwargs,
    )
    array[:] = data
    return array


def _objects(path):
    return sorted(
        os.path.relpath(os.path.join(r, f), path)
        for r, _, fs in os.walk(path)
        for f in fs
        if f != "zarr.json"
    )


def _with_fill_rows(data, fill):
    data = data.copy()
    data[1] = fill  # one inner chunk left out of object 0
    data[4:8] = fill  # all of object 1: zarr-python writes no object at all
    data[9] = fill  # the last row of the partial object 2
    return data


@pytest.mark.parametrize("fill", [0, 7])
def test_object_reader_reads_zarr_python_fill_value_chunks(tmp_path, fill):
    rng = np.random.default_rng(0)
    data = _with_fill_rows((rng.standard_normal((ROWS, T, D)) * 3).astype(np.float16), fill)
    group = zarr.open_group(str(tmp_path / "g.zarr"), mode="w", zarr_format=3)
    array = _zarr_write(group, "targets", data, fill_value=fill)
    objects = _objects(tmp_path / "g.zarr" / "targets")
    assert objects == ["c/0/0/0", "c/2/0/0"], objects  # the precondition: zarr-python left object 1 out
    shardfile.check_codecs(array.metadata.to_dict()["codecs"], "targets")
    layout = shardfile.ObjectLayout(
        str(tmp_path / "g.zarr" / "targets"), ROWS, PER_OBJECT, (T, D), np.dtype(np.float16), array.fill_value
    )
    reader = shardfile.ObjectReader(fsspec.filesystem("file"), layout)
    np.testing.assert_array_equal(reader.read_rows(0, ROWS), data)
    for row in range(ROWS):  # single rows, including every fill-value row
        np.testing.assert_array_equal(reader.read_rows(row, row + 1)[0], data[row])
    np.testing.assert_array_equal(reader.read_rows(3, 9), data[3:9])  # a run across a missing object
    np.testing.assert_array_equal(array[:], data)  # zarr-python agrees


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "int8"])
def test_target_cache_reads_a_shard_written_by_zarr_python(tmp_path, dtype):
    """A committed shard whose arrays zarr-python rewrote (fill rows, a missing object) reads the same through
    TargetCache: ShardReader.read, iter_blocks and get."""
    cache = TargetCache(tmp_path)
    keys = [f"k{i}" for i in range(ROWS)]
    spec, _ = write_random_teacher(cache, "t", {"s0": keys}, shape=(T, D), dtype=dtype)
    rng = np.random.default_rng(1)
    x = _with_fill_rows(rng.standard_normal((ROWS, T, D)).astype(np.float32), 0.0)
    values, scale = quant.encode(x, dtype)
    values = _with_fill_rows(values, 0)  # encoding zeros gives zeros; stated, not assumed
    group = zarr.open_group(str(tmp_path / "t" / "s0" / "data.zarr"), mode="r+", zarr_format=3)
    _zarr_write(group, "targets", np.ascontiguousarray(values))
    if scale is not None:
        scale = _with_fill_rows(scale, 0.0)
        _zarr_write(group, "scale", np.ascontiguousarray(scale.astype(np.float32)))
    assert "c/1/0/0" not in _objects(tmp_path / "t" / "s0" / "data.zarr" / "targets")
    expected = quant.decode(values, scale, dtype)
    reader = TargetCache(tmp_path).open_shard("t", "s0")
    np.testing.assert_array_equal(reader.read(slice(0, ROWS)), expected)
    np.testing.assert_array_equal(np.concatenate([b for _, b in reader.iter_blocks(3)]), expected)
    stored, _ = reader.read_stored(5)
    np.testing.assert_array_equal(stored, np.zeros((T, D), stored.dtype))
    for row in (1, 5, 9, 0):
        np.testing.assert_array_equal(TargetCache(tmp_path).get("t", keys[row]), expected[row])


def test_a_layout_the_direct_reader_does_not_implement_is_refused_by_name(tmp_path):
    cache = TargetCache(tmp_path)
    write_random_teacher(cache, "t", {"s0": [f"k{i}" for i in range(ROWS)]}, shape=(T, D))
    group = zarr.open_group(str(tmp_path / "t" / "s0" / "data.zarr"), mode="r+", zarr_format=3)
    from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec

    array = group.create_array(
        "targets",
        shape=(ROWS, T, D),
        chunks=(PER_OBJECT, T, D),
        dtype="float16",
        fill_value=0,
        overwrite=True,
        serializer=ShardingCodec(
            chunk_shape=(1, T, D),
            codecs=[BytesCodec(), BloscCodec()],
            index_codecs=[BytesCodec(), Crc32cCodec()],
            index_location="start",
        ),
        compressors=None,
    )
    array[:] = np.ones((ROWS, T, D), np.float16)
    with pytest.raises(CacheError, match="index_location"):
        TargetCache(tmp_path).open_shard("t", "s0")
