"""`ola cache show`: a PNG of the image beside PCA renderings of the targets."""

from __future__ import annotations

import fsspec
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from olavlm.cli.app import app
from olavlm.pipeline.show import pca_rgb, render_sample
from olavlm.schemas.cache import TargetCache
from olavlm.schemas.corpus import iter_samples, list_shards

from .conftest import write_random_teacher


def test_pca_rgb_separates_two_regions():
    tokens = np.zeros((64, 16), np.float32)
    tokens[:32, 0] = 5.0  # top half differs from bottom half along one direction
    rgb = pca_rgb(tokens + 0.01 * np.random.default_rng(0).standard_normal((64, 16)))
    assert rgb.shape == (8, 8, 3) and rgb.min() >= 0 and rgb.max() <= 1
    assert abs(rgb[:4, :, 0].mean() - rgb[4:, :, 0].mean()) > 0.5


def test_show_writes_png(tmp_path, demo_corpus):
    shards = {s.name: [x.key for x in iter_samples(s.url)] for s in list_shards(demo_corpus)}
    cache = TargetCache(tmp_path / "cache")
    write_random_teacher(cache, "depth", shards, shape=(64, 16))
    write_random_teacher(cache, "gen", shards, shape=(1, 32))
    out = tmp_path / "show.png"
    result = CliRunner().invoke(
        app,
        ["cache", "show", str(cache.root.path), "demo-000009", "--out", str(out), "--corpus", demo_corpus],
    )
    assert result.exit_code == 0, result.output
    assert "depth: pca-grid" in result.output and "gen: strip" in result.output
    image = Image.open(out)
    assert image.format == "PNG" and image.width > image.height > 100
    missing = CliRunner().invoke(app, ["cache", "show", str(cache.root.path), "nope", "--out", str(out)])
    assert missing.exit_code == 2 and "nope" in missing.output


@pytest.mark.timeout(120)
def test_render_sample_reads_cache_and_corpus_with_storage_options(tmp_path, demo_corpus, s3_options):
    """On the local S3 server, whose endpoint and keys exist only in the options (not in fsspec's defaults)."""
    shards = {s.name: [x.key for x in iter_samples(s.url)] for s in list_shards(demo_corpus)}
    cache = TargetCache(tmp_path / "cache")
    write_random_teacher(cache, "depth", shards, shape=(64, 16))
    fs = fsspec.filesystem("s3", **s3_options)
    fs.put(str(tmp_path / "cache"), "olavlm/show/cache", recursive=True)
    fs.put(demo_corpus, "olavlm/show/corpus", recursive=True)
    out = tmp_path / "s3.png"
    result = render_sample(
        "s3://olavlm/show/cache",
        "demo-000009",
        str(out),
        corpus="s3://olavlm/show/corpus",
        storage_options=s3_options,
    )
    assert result["panels"] == {"depth": "pca-grid"} and result["shard"] in shards
    image = Image.open(out)
    assert image.format == "PNG" and image.width > image.height  # image + target side by side
    assert "s3" not in fsspec.config.conf


def test_show_says_why_a_key_has_no_target(tmp_path):
    """A text-only sample (an error row 'no image file'), a refused image and an unknown key: each named."""
    from olavlm.schemas import quant
    from olavlm.schemas.cache import SampleError
    from olavlm.schemas.spec import TeacherSpec

    cache = TargetCache(tmp_path / "cache")
    cache.register(TeacherSpec(name="gen", kind="synthetic", model="m", shape=(1, 4)))
    values, _ = quant.encode(np.ones((1, 1, 4), np.float32), "float16")
    errors = [
        SampleError("chat-1", "decode", "no image file in sample (has: json)"),
        SampleError("broken", "decode", "cannot identify image file"),
    ]
    cache.write_shard("gen", "s0", ["k0"], ["0" * 64], values, errors=errors)

    def show(key):
        result = CliRunner().invoke(
            app, ["cache", "show", str(tmp_path / "cache"), key, "--out", str(tmp_path / "x.png")]
        )
        assert result.exit_code == 2 and key in result.output
        return " ".join(result.output.split())

    assert "it is a text-only sample (no image, so no teacher target; shard s0)" in show("chat-1")
    assert "the precompute refused it (shard s0, decode: cannot identify image file)" in show("broken")
    assert "not in any committed shard" in show("nope")
