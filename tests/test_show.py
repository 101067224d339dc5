"""`ola cache show`: a PNG of the image beside PCA renderings of the targets."""

from __future__ import annotations

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from olavlm.cli.app import app
from olavlm.pipeline.show import pca_rgb
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
    result = CliRunner().invoke(app, ["cache", "show", str(cache.root.path), "demo-000009", "--out", str(out),
                                      "--corpus", demo_corpus])
    assert result.exit_code == 0, result.output
    assert "depth: pca-grid" in result.output and "gen: strip" in result.output
    image = Image.open(out)
    assert image.format == "PNG" and image.width > image.height > 100
    missing = CliRunner().invoke(app, ["cache", "show", str(cache.root.path), "nope", "--out", str(out)])
    assert missing.exit_code == 2 and "nope" in missing.output
