"""Shared helpers of the teacher / precompute tests: corpora built on the fly, a CLI app, cache reads."""

from __future__ import annotations

import io
import os
import sys

import numpy as np
from PIL import Image

from olavlm.schemas.cache import TargetCache
from olavlm.schemas.corpus import TarShardWriter

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "camera")


def photo(index: int) -> Image.Image:
    """A real photo from scikit-image, cropped differently per index so every sample differs."""
    import skimage.data

    array = getattr(skimage.data, PHOTOS[index % len(PHOTOS)])()
    if array.ndim == 2:
        array = np.stack([array] * 3, -1)
    offset = (index // len(PHOTOS)) * 7
    return Image.fromarray(np.ascontiguousarray(array[offset:, offset:, :3]))


def jpeg(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90, **kwargs)
    return buffer.getvalue()


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def build_corpus(folder, shards: int = 2, per_shard: int = 5, extra: dict | None = None) -> list[str]:
    """`shards` tars of `per_shard` JPEG photos (keys s{shard}-{row}); `extra` = {shard index: [(key, files)]}."""
    os.makedirs(folder, exist_ok=True)
    keys = []
    for s in range(shards):
        with TarShardWriter(os.path.join(folder, f"shard-{s:06d}.tar")) as writer:
            for r in range(per_shard):
                key = f"s{s}-{r:03d}"
                writer.write(key, {"jpg": jpeg(photo(s * per_shard + r)), "txt": f"caption {key}".encode()})
                keys.append(key)
            for key, files in (extra or {}).get(s, []):
                writer.write(key, files)
    return keys


def local_ray():
    """One local Ray for a test module (the job reuses it); 2 CPUs like the CI machine."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(
            address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR"
        )  # never a registered cluster
    yield ray
    if started:
        ray.shutdown()


def cli_command(*args: str) -> list[str]:
    """argv that runs `ola` in a fresh interpreter (for kill tests)."""
    return [sys.executable, "-m", "olavlm.cli.app", *args]


def read_cache(root, teacher: str, **options) -> dict[str, np.ndarray]:
    """key -> stored values (not decoded: bit-exact comparisons), for every committed shard."""
    cache = TargetCache(root, options or None)
    out = {}
    for shard in cache.committed_shards(teacher):
        reader = cache.open_shard(teacher, shard)
        values, scale = reader.read_stored(slice(None))
        for row, key in enumerate(reader.keys):
            out[key] = (
                values[row]
                if scale is None
                else np.concatenate([values[row].view(np.uint8), scale[row, :, None].view(np.uint8)], 1)
            )
    return out
