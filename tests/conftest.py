"""Shared fixtures: tiny corpora and caches built on the fly, nothing downloaded."""

from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Key indexes of object-store caches go to a local folder (schemas/keyindex.py): keep the tests' out of ~/.cache.
os.environ.setdefault("OLAVLM_INDEX_DIR", tempfile.mkdtemp(prefix="olavlm-keyindex-"))


@pytest.fixture(scope="session")
def demo_corpus(tmp_path_factory):
    """24 real-image samples in 3 shards of 8 (demo-000000.tar ...)."""
    from olavlm.schemas.corpus_build import build_demo_corpus

    out = tmp_path_factory.mktemp("demo-corpus")
    build_demo_corpus(out, samples=24, shard_size=8)
    return str(out)


def write_random_teacher(
    cache,
    name: str,
    shards: dict[str, list[str]],
    shape=(16, 8),
    dtype="float16",
    sha256s: dict[str, str] | None = None,
    seed: int = 0,
):
    """Register a synthetic teacher and write one committed shard per entry of `shards`."""
    from olavlm.schemas import quant
    from olavlm.schemas.spec import TeacherSpec
    from olavlm.schemas.synthetic import feature_like

    spec = TeacherSpec(name=name, kind="synthetic", model="synthetic", shape=shape, dtype=dtype)
    cache.register(spec)
    data = {}
    for i, (shard, keys) in enumerate(shards.items()):
        x = feature_like(len(keys), *shape, seed=seed + i)
        values, scale = quant.encode(x, dtype)
        hashes = [(sha256s or {}).get(k, "0" * 64) for k in keys]
        cache.write_shard(name, shard, keys, hashes, values, scale)
        data[shard] = x
    return spec, data


def corpus_keys(corpus: str) -> tuple[dict[str, list[str]], dict[str, str]]:
    """{shard: keys in order}, {key: image sha256} of a corpus: what a cache built from it must hold."""
    from olavlm.schemas.corpus import iter_samples, list_shards, sha256_hex

    shards, hashes = {}, {}
    for shard in list_shards(corpus):
        samples = list(iter_samples(shard.url))
        shards[shard.name] = [s.key for s in samples]
        hashes.update({s.key: sha256_hex(s.image_bytes) for s in samples})
    return shards, hashes


@pytest.fixture(scope="session")
def s3_options():
    """fsspec options for a local S3-compatible server (moto, 127.0.0.1 only) with a bucket "olavlm"."""
    from olavlm.bench.torture import object_store

    options, stop = object_store()
    yield options
    stop()


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def one_thread():
    """Tiny matrices: threads only contend (a 40-step probe run takes 1 s on one thread, 30 s oversubscribed)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
