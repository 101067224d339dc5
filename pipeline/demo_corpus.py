"""The bundled demo corpus: real photographs from scikit-image and scikit-learn.

No download: `skimage.data` and `sklearn.datasets.load_sample_images` ship their
images inside the packages. Deterministic crops, flips and scales turn ~20 images
into any number of distinct samples, each a JPEG plus a LLaVA-style `json`
(a caption turn and a question/answer turn that the image actually answers).
Cost: the variety is small; it exercises the machinery, not the science.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass

import numpy as np

from olavlm.schemas.corpus import TarShardWriter
from olavlm.schemas.errors import ConfigError

# (loader name, caption noun); grayscale images are kept grayscale on purpose:
# the pipeline must convert them.
SKIMAGE_IMAGES = (
    ("astronaut", "an astronaut in a spacesuit posing beside a flag"),
    ("coffee", "a cup of coffee on a saucer"),
    ("chelsea", "a tabby cat looking to the side"),
    ("rocket", "a rocket standing on a launch pad"),
    ("hubble_deep_field", "a deep field of distant galaxies"),
    ("immunohistochemistry", "a stained tissue sample under a microscope"),
    ("colorwheel", "a color wheel"),
    ("retina", "a photograph of a human retina"),
    ("camera", "a man operating a camera on a tripod"),
    ("coins", "old coins on a dark background"),
    ("moon", "the surface of the moon"),
    ("brick", "a brick wall"),
    ("grass", "a patch of grass"),
    ("gravel", "gravel on the ground"),
    ("clock", "a clock on a wall"),
    ("page", "a page of printed text"),
    ("text", "text written on a sign"),
    ("cell", "a living cell under a microscope"),
)
SKLEARN_IMAGES = (("china", "a Chinese temple among trees"), ("flower", "a pink flower in close-up"))


@dataclass(frozen=True)
class DemoCorpus:
    out: str
    shards: int
    samples: int


def source_images() -> list[tuple[str, str, np.ndarray]]:
    """(name, caption, uint8 array HxW or HxWx3) for every bundled image."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    images = []
    for name, caption in SKIMAGE_IMAGES:
        images.append((name, caption, np.asarray(getattr(skimage.data, name)())))
    for (name, caption), array in zip(SKLEARN_IMAGES, load_sample_images().images):
        images.append((name, caption, np.asarray(array)))
    return images


def _variant(array: np.ndarray, index: int) -> tuple[np.ndarray, dict]:
    """A deterministic crop / flip / scale of `array`, and what was done."""
    from PIL import Image

    rng = np.random.default_rng(index)
    h, w = array.shape[:2]
    crop = float(rng.uniform(0.55, 1.0)) if index >= 20 else 1.0
    ch, cw = max(16, int(h * crop)), max(16, int(w * crop))
    top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    flipped = bool(rng.integers(0, 2)) if index >= 20 else False
    part = array[top : top + ch, left : left + cw]
    if flipped:
        part = part[:, ::-1]
    image = Image.fromarray(np.ascontiguousarray(part))
    scale = float(rng.uniform(0.4, 1.0))
    size = (max(32, int(cw * scale)), max(32, int(ch * scale)))
    image = image.resize(size, Image.BICUBIC)
    return np.asarray(image), {"crop": round(crop, 3), "flipped": flipped, "width": size[0], "height": size[1]}


def _conversations(caption: str, info: dict, gray: bool) -> list[dict]:
    wide = "wider than it is tall" if info["width"] > info["height"] else "taller than it is wide" \
        if info["height"] > info["width"] else "square"
    return [
        {"from": "human", "value": "<image>\nDescribe the image briefly."},
        {"from": "gpt", "value": f"The image shows {caption}."},
        {"from": "human", "value": "Is the image in color, and what is its shape?"},
        {"from": "gpt", "value": f"It is {'black and white' if gray else 'in color'} and {wide}."},
    ]


def build_demo_corpus(out: str | os.PathLike[str], samples: int = 256, shard_size: int = 64,
                      quality: int = 90) -> DemoCorpus:
    """Write `samples` JPEG + json samples as `demo-000000.tar`, ...; byte-identical on every run."""
    from PIL import Image

    if samples < 1 or shard_size < 1:
        raise ConfigError(f"samples ({samples}) and shard size ({shard_size}) must be >= 1")
    out = os.fspath(out)
    os.makedirs(out, exist_ok=True)
    images = source_images()
    writer: TarShardWriter | None = None
    shards = 0
    for index in range(samples):
        if index % shard_size == 0:
            if writer is not None:
                writer.close()
            writer = TarShardWriter(os.path.join(out, f"demo-{shards:06d}.tar"))
            shards += 1
        name, caption, array = images[index % len(images)]
        variant, info = _variant(array, index)
        buffer = io.BytesIO()
        Image.fromarray(variant).save(buffer, format="JPEG", quality=quality)
        meta = {"id": f"demo-{index:06d}", "source": name, **info,
                "conversations": _conversations(caption, info, gray=variant.ndim == 2)}
        writer.write(f"demo-{index:06d}", {"jpg": buffer.getvalue(), "json": json.dumps(meta).encode()})
    writer.close()
    return DemoCorpus(out=out, shards=shards, samples=samples)
