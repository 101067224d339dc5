"""The on-disk key index (schemas/keyindex.py): the old per-worker dict's answers without its memory.

Every comparison is against `dict_rule`, the dict the index replaced (manifests concatenated in
shard order, later shards overwrite), on caches with several shards, a key present in two shards,
misses, forced hash collisions and forced multi-bucket builds.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from olavlm.schemas import keyindex
from olavlm.schemas.cache import TargetCache
from olavlm.schemas.keyindex import INDEX_DIR_ENV, KeyIndex, KeyIndexError, build_index, open_index
from tests.conftest import write_random_teacher

SHARDS = {
    "s0": [f"img-{i:04d}" for i in range(0, 40)],
    "s1": [f"img-{i:04d}" for i in range(40, 75)] + ["twice"],
    "s2": ["twice"] + [f"{i}" for i in range(30)] + ["ünïcode key", ""],
}
MISSES = ["img-9999", "nope", "twice ", "img-004", "ünïcode", "0" * 40]


@pytest.fixture(autouse=True)
def user_index_dir(tmp_path, monkeypatch):
    """Object-store and read-only caches build their index here: never the real home."""
    folder = tmp_path / "user-index"
    monkeypatch.setenv(INDEX_DIR_ENV, str(folder))
    return folder


def sha_of(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def make(root) -> TargetCache:
    cache = TargetCache(root)
    shas = {k: sha_of(k) for keys in SHARDS.values() for k in keys}
    write_random_teacher(cache, "gen", SHARDS, shape=(1, 4), sha256s=shas)
    return cache


def dict_rule(cache: TargetCache, teacher: str) -> dict[str, tuple[str, int, str]]:
    table = cache.manifest(teacher)
    cols = [table.column(c).to_pylist() for c in ("key", "shard", "row", "sha256")]
    return {k: (s, r, h) for k, s, r, h in zip(*cols)}


def assert_same_answers(index, reference: dict) -> None:
    assert {k: index.get(k) for k in reference} == reference
    assert [index.get(k) for k in MISSES] == [None] * len(MISSES)
    assert "twice" in index and "nope" not in index


@pytest.mark.parametrize(
    "budget", [keyindex.DEFAULT_MEMORY_BUDGET, 2 * 56 * 12], ids=["one-bucket", "buckets"]
)
def test_lookups_equal_the_dict_rule(tmp_path, budget):
    cache = make(tmp_path / "cache")
    reference = dict_rule(cache, "gen")
    assert reference["twice"][0] == "s2"  # the dict's rule: the shard that sorts last wins
    index = build_index(cache, "gen", memory_budget=budget)
    assert len(index) == sum(map(len, SHARDS.values()))  # both copies of "twice" are stored
    assert_same_answers(index, reference)
    assert not [n for n in os.listdir(os.path.dirname(index.folder)) if n.startswith(".tmp-")]


def test_hi_collisions_are_resolved_by_the_second_hash(tmp_path, monkeypatch):
    real = keyindex.key_digest

    def weak(key):  # only 4 values of hi: every lookup scans a long run of equal hi
        digest = real(key)
        return bytes(7) + bytes([digest[7] & 3]) + digest[8:]

    monkeypatch.setattr(keyindex, "key_digest", weak)
    cache = make(tmp_path / "cache")
    index = build_index(cache, "gen", memory_budget=2 * 56 * 12)
    assert len(np.unique(index._hi)) <= 4
    assert_same_answers(index, dict_rule(cache, "gen"))


def test_join_keyed_path_uses_the_index(tmp_path):
    from olavlm.trainer.data.join import TargetJoin

    cache = make(tmp_path / "cache")
    reference = dict_rule(cache, "gen")
    join = TargetJoin(str(tmp_path / "cache"), ["gen"])
    for key in [*reference, *MISSES]:
        assert join.locate("gen", "training-shard-x", key) == reference.get(key)  # not a cache shard: keyed
        if key in SHARDS["s0"]:
            assert join.locate("gen", "s0", key) == reference[key]  # aligned path unchanged
    assert isinstance(join._keyed["gen"], KeyIndex)
    values = join("training-shard-x", "twice", sha_of("twice"))["gen"]
    np.testing.assert_array_equal(values.numpy(), cache.open_shard("gen", "s2").read_stored(0)[0])


def test_stale_index_is_refused_or_rebuilt_never_used(tmp_path):
    cache = make(tmp_path / "cache")
    first = cache.index("gen")
    write_random_teacher(TargetCache(tmp_path / "cache"), "gen", {"s3": ["new-key"]}, shape=(1, 4))
    later = TargetCache(tmp_path / "cache")
    with pytest.raises(KeyIndexError, match=r"ola cache index .*cache"):
        later.index("gen", build=False)
    rebuilt = later.index("gen")
    assert rebuilt.token != first.token and rebuilt.get("new-key") == ("s3", 0, "0" * 64)
    assert first.get("new-key") is None  # the old state's index, still mapped by its reader
    assert os.listdir(os.path.dirname(rebuilt.folder)) == [rebuilt.token]  # the older state's folder is gone


def test_concurrent_builders_publish_one_index(tmp_path):
    make(tmp_path / "cache")
    with ThreadPoolExecutor(4) as pool:
        built = list(
            pool.map(
                lambda _: build_index(TargetCache(tmp_path / "cache"), "gen", memory_budget=2 * 56 * 12),
                range(4),
            )
        )
    assert len({b.folder for b in built}) == 1
    location = os.path.dirname(built[0].folder)
    assert os.listdir(location) == [built[0].token]  # no temporary folder left behind
    assert_same_answers(KeyIndex(built[0].folder), dict_rule(TargetCache(tmp_path / "cache"), "gen"))


def test_object_store_cache_indexes_into_the_local_folder(user_index_dir):
    cache = TargetCache("memory://keyindex-test/cache")
    write_random_teacher(cache, "gen", {"a": ["x", "y"], "b": ["z"]}, shape=(1, 4))
    index = cache.index("gen")
    assert index.folder.startswith(str(user_index_dir)) and index.get("z") == ("b", 0, "0" * 64)
    assert open_index(TargetCache("memory://keyindex-test/cache"), "gen", build=False).folder == index.folder


def test_only_safe_formats_and_checked_on_open(tmp_path):
    index = make(tmp_path / "cache").index("gen")
    names = sorted(os.listdir(index.folder))
    assert names == ["hash_hi.npy", "hash_lo.npy", "index.json", "row.npy", "sha256.npy", "shard.npy"]
    for name in names[:2] + names[3:]:
        np.load(os.path.join(index.folder, name), allow_pickle=False)
    assert len(pickle.dumps(index)) < 1000  # workers reopen the folder, the arrays are not copied
    meta_path = os.path.join(index.folder, "index.json")
    meta = json.load(open(meta_path))
    json.dump({**meta, "rows": meta["rows"] + 1}, open(meta_path, "w"))
    with pytest.raises(KeyIndexError, match="rebuild"):
        KeyIndex(index.folder)


def test_cache_index_command(tmp_path):
    from typer.testing import CliRunner

    from olavlm.cli.app import app

    make(tmp_path / "cache")
    result = CliRunner().invoke(app, ["cache", "index", str(tmp_path / "cache")])
    assert result.exit_code == 0, result.output
    assert f"gen: {sum(map(len, SHARDS.values()))} keys, 3 shards" in result.output
    assert open_index(TargetCache(tmp_path / "cache"), "gen", build=False).get("twice")[0] == "s2"
    missing = CliRunner().invoke(app, ["cache", "index", str(tmp_path / "nothing")])
    assert missing.exit_code == 2 and "not an olavlm cache" in missing.output


def test_bench_join_smoke(tmp_path):
    from typer.testing import CliRunner

    from olavlm.cli.app import app

    args = [
        "bench",
        "join",
        "--keys",
        "10000",
        "--shards",
        "10",
        "--lookups",
        "2000",
        "--memory-budget-mb",
        "1",
        "--json",
        "--tmp",
        str(tmp_path),
    ]
    run = CliRunner().invoke(app, args)
    assert run.exit_code == 0, run.output
    result = json.loads(run.output)
    assert result["keys"] == 10_000 and result["shards"] == 10
    assert set(result["methods"]) == {"dict", "keyindex", "parquet"}
    for figures in result["methods"].values():
        assert (
            figures["build_s"] > 0
            and figures["random_lookups_per_s"] > 0
            and figures["shard_order_lookups_per_s"] > 0
        )
        assert figures["hits"] == figures["lookups"]  # every benchmark key is found by every method
        assert figures["peak_rss_mb"] > 0
    assert 56 * 10_000 <= result["methods"]["keyindex"]["disk_bytes"] < 56 * 10_000 + 10_000


def test_precompute_builds_the_index_of_local_caches_only(tmp_path, user_index_dir):
    from olavlm.pipeline.precompute import build_key_indexes

    local = make(tmp_path / "cache")
    build_key_indexes(local, ["gen"])
    assert open_index(TargetCache(tmp_path / "cache"), "gen", build=False).folder.startswith(
        str(tmp_path / "cache")
    )
    remote = TargetCache("memory://keyindex-test/precompute")
    write_random_teacher(remote, "gen", {"a": ["x"]}, shape=(1, 4))
    build_key_indexes(remote, ["gen"])
    assert not user_index_dir.exists()  # the trainer's machine builds its own
