"""Crash order of a shard commit: a writer that dies between any two writes leaves nothing half-visible.

For every k, the k-th write of `write_shard` raises (an object PUT on the local S3 server;
a file write or the commit rename on a local root). Afterwards a fresh reader lists the
shard as committed only if it is complete (`ola cache verify` agrees), a local root shows
nothing but committed shards and the staging folder, and a rerun commits the whole shard.
On local roots the data files and their folders are fsynced before the rename, and the
parent folder after it.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from olavlm.schemas import quant
from olavlm.schemas.cache import COMMIT_JSON, STAGING, TargetCache
from olavlm.schemas.inspect import verify_cache
from olavlm.schemas.spec import TeacherSpec
from olavlm.schemas.synthetic import feature_like

ROWS = 70  # two storage objects of 64 rows
SPEC = TeacherSpec(name="depth", kind="synthetic", model="m", shape=(4, 8), dtype="float16")
KEYS = [f"k{i}" for i in range(ROWS)]
VALUES, SCALE = quant.encode(feature_like(ROWS, 4, 8, seed=3), "float16")


class Crash(RuntimeError):
    """The injected failure of the k-th write."""


class Writes:
    """Counts writes while armed; raises Crash on write number `fail_at` (1-based)."""

    def __init__(self) -> None:
        self.armed, self.fail_at, self.count, self.names = False, 0, 0, []

    def arm(self, fail_at: int = 0) -> None:
        self.armed, self.fail_at, self.count, self.names = True, fail_at, 0, []

    def hit(self, name: str) -> None:
        if not self.armed:
            return
        self.count += 1
        self.names.append(name)
        if self.count == self.fail_at:
            self.armed = False
            raise Crash(f"write {self.count} ({name})")


def crash(cache: TargetCache) -> None:
    """`write` dies of the injected Crash (possibly wrapped by zarr, fsspec or asyncio)."""
    with pytest.raises(Exception) as err:  # noqa: B017 (the chain is checked below)
        write(cache)
    chain, exc = [], err.value
    while exc is not None and len(chain) < 10:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    assert any(isinstance(e, Crash) or "Crash" in repr(e) for e in chain), chain


def write(cache: TargetCache):
    return cache.write_shard("depth", "s0", KEYS, ["0" * 64] * ROWS, VALUES, SCALE)


def assert_nothing_half_visible(cache: TargetCache) -> None:
    """A fresh reader sees no shard, or the complete one; verify finds no problem."""
    fresh = TargetCache(cache.root.url, storage_options=cache.root.storage_options)
    committed = fresh.committed_shards("depth")
    assert committed in ([], ["s0"])
    if committed:
        assert_complete(fresh)
    report = verify_cache(fresh)
    assert report.ok, report.problems
    assert report.checked_rows == ROWS * len(committed)


def assert_complete(cache: TargetCache) -> None:
    stored, _ = cache.open_shard("depth", "s0").read_stored(slice(0, ROWS))
    np.testing.assert_array_equal(stored, VALUES)
    assert cache.shard_manifest("depth", "s0").column("key").to_pylist() == KEYS


def assert_rerun_completes(cache: TargetCache) -> None:
    fresh = TargetCache(cache.root.url, storage_options=cache.root.storage_options)
    assert write(fresh).written
    assert fresh.committed_shards("depth") == ["s0"]
    assert_complete(fresh)


# -- object store -----------------------------------------------------------------------------------
@pytest.fixture
def s3_writes(monkeypatch):
    """Every object PUT of s3fs (small objects, multipart completions) goes through `_call_s3`
    (zarr's async writes) or its sync wrapper `call_s3` (S3File.close)."""
    import s3fs.core
    from fsspec.asyn import sync_wrapper

    writes = Writes()
    real = s3fs.core.S3FileSystem._call_s3

    async def call_s3(self, method, *args, **kwargs):
        if method in ("put_object", "complete_multipart_upload", "copy_object"):
            writes.hit(f"{method} {kwargs.get('Key', '')}")
        return await real(self, method, *args, **kwargs)

    monkeypatch.setattr(s3fs.core.S3FileSystem, "_call_s3", call_s3)
    monkeypatch.setattr(s3fs.core.S3FileSystem, "call_s3", sync_wrapper(call_s3))
    return writes


@pytest.mark.timeout(300)
def test_s3_crash_between_any_two_writes_leaves_no_half_committed_shard(s3_options, s3_writes):
    clean = TargetCache("s3://olavlm/order-clean", storage_options=s3_options)
    clean.register(SPEC)
    s3_writes.arm()
    write(clean)
    s3_writes.armed = False
    total, names = s3_writes.count, s3_writes.names
    assert total >= 6 and names[-1].endswith(COMMIT_JSON), names  # commit.json is the last object written
    for k in range(1, total + 1):
        cache = TargetCache(f"s3://olavlm/order-{k}", storage_options=s3_options)
        cache.register(SPEC)
        s3_writes.arm(fail_at=k)
        crash(cache)
        s3_writes.armed = False
        assert_nothing_half_visible(cache)
        cold = {**s3_options, "skip_instance_cache": True}  # a new s3fs: no listing cached by the writer
        assert not TargetCache(cache.root.url, storage_options=cold).is_committed("depth", "s0"), names[k - 1]
        if k in (
            1,
            total // 2,
            total,
        ):  # a rerun over the debris: first write, mid-data, commit.json (~1 s each)
            assert_rerun_completes(cache)


# -- local file system ------------------------------------------------------------------------------
@pytest.fixture
def local_writes(monkeypatch):
    """Zarr metadata, storage objects and Parquet files, commit.json, and the commit rename."""
    import fsspec.implementations.local as fs_local
    import zarr.storage

    import olavlm.schemas.storage as storage_module

    writes = Writes()
    real_set, real_open, real_rename = zarr.storage.LocalStore.set, fs_local.LocalFileSystem._open, os.rename

    async def store_set(self, key, value):
        writes.hit(f"zarr {key}")
        return await real_set(self, key, value)

    def fs_open(self, path, mode="rb", *args, **kwargs):
        if "w" in mode:
            writes.hit(f"file {path}")
        return real_open(self, path, mode, *args, **kwargs)

    def json_open(path, mode="r", *args, **kwargs):
        if "w" in mode:
            writes.hit(f"json {path}")
        return open(path, mode, *args, **kwargs)

    def rename(src, dst, *args, **kwargs):
        writes.hit(f"rename {src} -> {dst}")
        return real_rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(zarr.storage.LocalStore, "set", store_set)
    monkeypatch.setattr(fs_local.LocalFileSystem, "_open", fs_open)
    monkeypatch.setattr(storage_module, "open", json_open, raising=False)
    monkeypatch.setattr(os, "rename", rename)
    return writes


def assert_only_committed_or_staging(cache: TargetCache) -> None:
    """On a local root a shard folder appears by one rename, whole: nothing else is ever at its place."""
    teacher = cache.root.join("depth")
    for name in os.listdir(teacher):
        if name != STAGING:
            assert os.path.exists(os.path.join(teacher, name, COMMIT_JSON)), (
                f"partial folder {name}: {os.listdir(os.path.join(teacher, name))}"
            )


@pytest.mark.timeout(300)
def test_local_crash_between_any_two_writes_or_at_the_rename_shows_old_or_new(tmp_path, local_writes):
    clean = TargetCache(tmp_path / "clean")
    clean.register(SPEC)
    local_writes.arm()
    write(clean)
    local_writes.armed = False
    total, names = local_writes.count, local_writes.names
    assert total >= 6 and names[-1].startswith("rename"), names
    for k in range(1, total + 1):
        cache = TargetCache(tmp_path / f"order-{k}")
        cache.register(SPEC)
        local_writes.arm(fail_at=k)
        crash(cache)
        local_writes.armed = False
        assert_only_committed_or_staging(cache)
        assert_nothing_half_visible(cache)
        assert_rerun_completes(cache)
        assert_only_committed_or_staging(cache)


def test_local_commit_fsyncs_data_and_folders_before_the_rename_and_the_parent_after(tmp_path, monkeypatch):
    events = []  # ("fsync", path) and ("rename", src, dst), in order
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def rename(src, dst, *args, **kwargs):
        events.append(("rename", os.fspath(src), os.fspath(dst)))
        return real_rename(src, dst, *args, **kwargs)

    cache = TargetCache(tmp_path / "cache")
    cache.register(SPEC)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    write(cache)
    monkeypatch.undo()

    (commit,) = [
        i for i, e in enumerate(events) if e[0] == "rename" and e[2] == cache.root.join("depth", "s0")
    ]
    src, dst = events[commit][1:]
    before = {e[1] for e in events[:commit] if e[0] == "fsync"}
    after = {e[1] for e in events[commit + 1 :] if e[0] == "fsync"}
    files, folders = set(), {src}
    for folder, _, names in os.walk(dst):  # what the rename made visible, at its old place
        rel = os.path.relpath(folder, dst)
        folders.add(os.path.normpath(os.path.join(src, rel)))
        files.update(os.path.normpath(os.path.join(src, rel, n)) for n in names)
    assert len(files) >= 6 and os.path.join(src, COMMIT_JSON) in files
    assert not files - before, f"not fsynced before the commit rename: {sorted(files - before)}"
    assert not folders - before, f"folders not fsynced before the commit rename: {sorted(folders - before)}"
    assert cache.root.join("depth") in after, "the rename itself is not made durable (parent folder fsync)"
