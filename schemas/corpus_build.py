"""Building WebDataset corpora: the bundled demo corpus and LLaVA JSON conversion (`ola corpus ...`).

Both builders write the corpus format that corpus.py reads (one tar per shard, a sample's files
grouped by key, written atomically by `TarShardWriter`), so they live beside it, in the torch-free
contract that pipeline/ and trainer/ both read. Cost: schemas/ carries the demo's image recipe, and
imports scikit-image and scikit-learn (lazily: the `demo` extra, extras.py) when a demo corpus is built.

**The demo corpus** (`build_demo_corpus`): real photographs from scikit-image and scikit-learn.
No download: `skimage.data` and `sklearn.datasets.load_sample_images` ship their
images inside the packages. Deterministic crops, flips and scales turn ~20 images
into any number of distinct samples, each a JPEG plus a LLaVA-style `json`
(a caption turn and a question/answer turn that the image actually answers).
Cost: the variety is small; it exercises the machinery, not the science.

**LLaVA training JSON -> shards** (`convert_llava`, `ola corpus from-llava`).
Input: `[{"id", "image" (relative to IMAGE_ROOT, optional), "conversations": [...]}, ...]`.
Output: `OUT/<prefix>-000000.tar`, ... with `shard_size` samples each; every sample
holds the image bytes as they are on disk (`jpg`, `png` or `webp`; never
re-encoded, so the sha256 the cache records is the file's) and a `json` member
with the entry. Entries without `image` become text-only samples.

Keys are stable: the entry's id with every character outside [A-Za-z0-9_-]
replaced by '_', and `-dupN` appended to the N-th repeat of an id. Samples keep
the JSON's order, so the same JSON and shard size give the same shards, keys and
bytes (mtime 0), and a cache precomputed over the result joins on every rerun.

Entries that cannot be converted are reported by index, id and reason in the returned report
and in `OUT/from_llava_report.json`; they never stop the conversion, and the counts reconcile
(entries = samples written + refused). The conversation is checked by the trainer's own
validator (schemas/conversation.py: roles, types, empty values, `<image>` placeholders against
the image), so an entry written here is not refused by `ola train`; besides that, a missing,
unreadable, empty or unsupported image, or one outside IMAGE_ROOT, is refused.
Cost: the JSON is loaded whole (LLaVA-665K: ~1 GB of Python objects).
"""

from __future__ import annotations

import io
import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from .conversation import ConversationError, validate_conversation
from .corpus import CorpusError, TarShardWriter
from .errors import ConfigError

# -- the demo corpus -----------------------------------------------------------------------------------
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
    from .extras import require

    skimage_data = require("skimage.data", "the demo corpus (its photos)")
    sklearn_datasets = require("sklearn.datasets", "the demo corpus (its photos)")
    images = []
    for name, caption in SKIMAGE_IMAGES:
        images.append((name, caption, np.asarray(getattr(skimage_data, name)())))
    for (name, caption), array in zip(SKLEARN_IMAGES, sklearn_datasets.load_sample_images().images):
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
    return np.asarray(image), {
        "crop": round(crop, 3),
        "flipped": flipped,
        "width": size[0],
        "height": size[1],
    }


def _conversations(caption: str, info: dict, gray: bool) -> list[dict]:
    wide = (
        "wider than it is tall"
        if info["width"] > info["height"]
        else "taller than it is wide"
        if info["height"] > info["width"]
        else "square"
    )
    return [
        {"from": "human", "value": "<image>\nDescribe the image briefly."},
        {"from": "gpt", "value": f"The image shows {caption}."},
        {"from": "human", "value": "Is the image in color, and what is its shape?"},
        {"from": "gpt", "value": f"It is {'black and white' if gray else 'in color'} and {wide}."},
    ]


def build_demo_corpus(
    out: str | os.PathLike[str], samples: int = 256, shard_size: int = 64, quality: int = 90
) -> DemoCorpus:
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
        meta = {
            "id": f"demo-{index:06d}",
            "source": name,
            **info,
            "conversations": _conversations(caption, info, gray=variant.ndim == 2),
        }
        writer.write(f"demo-{index:06d}", {"jpg": buffer.getvalue(), "json": json.dumps(meta).encode()})
    writer.close()
    return DemoCorpus(out=out, shards=shards, samples=samples)


# -- LLaVA JSON -> shards -------------------------------------------------------------------------------
EXTENSIONS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}
LLAVA_REPORT = "from_llava_report.json"


@dataclass(frozen=True, kw_only=True)
class ConversionReport:
    entries: int
    """Entries in the JSON: always samples + len(problems)."""
    samples: int
    """Samples written."""
    text_only: int
    """Of which without an image."""
    shards: list[str]
    """Tar files written, in order."""
    problems: list[dict] = field(default_factory=list)
    """One {"index", "id", "reason"} per entry not converted."""

    def to_dict(self) -> dict:
        return {
            "entries": self.entries,
            "refused": len(self.problems),
            "samples": self.samples,
            "text_only": self.text_only,
            "shards": self.shards,
            "problems": self.problems,
        }


def stable_key(raw_id, index: int, seen: Counter) -> str:
    base = re.sub(r"[^A-Za-z0-9_-]", "_", str(raw_id)) if raw_id not in (None, "") else f"entry_{index}"
    seen[base] += 1
    return base if seen[base] == 1 else f"{base}-dup{seen[base] - 1}"


def convert_llava(
    json_path: str, image_root: str, out: str, *, shard_size: int = 1000, prefix: str = "llava"
) -> ConversionReport:
    """Convert a LLaVA JSON file; see the module docstring."""
    if shard_size < 1:
        raise ConfigError(f"shard_size must be >= 1, not {shard_size}")
    with open(json_path, encoding="utf-8") as f:
        entries = json.load(f)
    if not isinstance(entries, list):
        raise CorpusError(f"{json_path}: expected a JSON list of entries, got {type(entries).__name__}")
    os.makedirs(out, exist_ok=True)
    root = os.path.realpath(image_root)
    seen: Counter = Counter()
    problems: list[dict] = []
    shards: list[str] = []
    writer: TarShardWriter | None = None
    written = text_only = 0

    def problem(index, raw_id, reason):
        problems.append({"index": index, "id": raw_id, "reason": reason})

    try:
        for index, entry in enumerate(entries):
            raw_id = entry.get("id") if isinstance(entry, dict) else None
            if not isinstance(entry, dict):
                problem(index, None, f"entry is a {type(entry).__name__}, not an object")
                continue
            image = entry.get("image")
            try:  # the trainer's own check (schemas/conversation.py): what is written here, training accepts
                validate_conversation(entry.get("conversations"), has_image=image is not None)
            except ConversationError as exc:
                problem(index, raw_id, f"conversations: {exc}")
                continue
            files = {}
            if image is not None:
                if not isinstance(image, str) or not image:
                    problem(index, raw_id, f"'image' must be a relative path, got {image!r}")
                    continue
                ext = EXTENSIONS.get(os.path.splitext(image)[1].lower())
                path = os.path.realpath(os.path.join(root, image))
                if ext is None:
                    problem(index, raw_id, f"image {image!r}: unsupported type (jpg, png, webp)")
                    continue
                if not path.startswith(root + os.sep):
                    problem(index, raw_id, f"image {image!r} lies outside IMAGE_ROOT")
                    continue
                try:
                    with open(path, "rb") as f:
                        files[ext] = f.read()
                except OSError as exc:
                    problem(index, raw_id, f"image {image!r}: {exc.strerror or exc}")
                    continue
                if not files[ext]:
                    problem(index, raw_id, f"image {image!r} is an empty file")
                    continue
            key = stable_key(raw_id, index, seen)
            files["json"] = json.dumps(entry, ensure_ascii=False).encode("utf-8")
            if writer is None or writer.count >= shard_size:
                if writer is not None:
                    writer.close()
                name = f"{prefix}-{len(shards):06d}.tar"
                writer = TarShardWriter(os.path.join(out, name))
                shards.append(name)
            writer.write(key, files)
            written += 1
            text_only += image is None
        if writer is not None:
            writer.close()
            writer = None
    finally:
        if writer is not None:
            writer.abort()
    if written + len(problems) != len(entries):  # every entry is written or reported, never lost
        raise RuntimeError(f"conversion lost entries: {len(entries)} != {written} + {len(problems)}")
    report = ConversionReport(
        entries=len(entries), samples=written, text_only=text_only, shards=shards, problems=problems
    )
    with open(os.path.join(out, LLAVA_REPORT), "w") as f:
        json.dump(report.to_dict(), f, indent=2)
    return report
