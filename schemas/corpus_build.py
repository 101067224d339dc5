"""Building WebDataset corpora: the bundled demo corpus and LLaVA JSON conversion (`ola corpus ...`).

Both builders write the corpus format that corpus.py reads (one tar per shard, written atomically by
`TarShardWriter`), so they live beside it, in the torch-free contract that pipeline/ and trainer/
read. Cost: schemas/ carries the demo's image recipe and imports scikit-image and scikit-learn
(lazily: the `demo` extra) when a demo corpus is built.

Design choice: both are deterministic (stable keys, the input's order, tar mtime 0), so the same
input gives the same shards, keys and bytes, and a cache precomputed over them joins on every rerun.
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
    """Write `samples` JPEG + json samples as `demo-000000.tar`, ...; byte-identical on every run.

    Deterministic crops, flips and scales of the ~20 photographs that scikit-image and scikit-learn
    ship (no download), each with a caption turn and a question the image answers. Cost: the
    variety is small; it exercises the machinery, not the science."""
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
    renamed: int = 0
    """Samples whose key is not their id (characters outside [A-Za-z0-9_-], a repeated or missing id)."""
    renamed_examples: list[dict] = field(default_factory=list)
    """The first RENAMED_EXAMPLES of them: {"index", "id", "key"}."""
    removed: list[str] = field(default_factory=list)
    """Shards of an earlier conversion into OUT that are not part of this one, deleted after it."""

    def to_dict(self) -> dict:
        return {
            "entries": self.entries,
            "refused": len(self.problems),
            "samples": self.samples,
            "text_only": self.text_only,
            "shards": self.shards,
            "problems": self.problems,
            "renamed": self.renamed,
            "renamed_examples": self.renamed_examples,
            "removed": self.removed,
        }


RENAMED_EXAMPLES = 20


def _stale_shards(out: str, prefix: str, keep: list[str], earlier: list[str]) -> list[str]:
    """Tars of an earlier conversion into `out` (its report's shards, or named `<prefix>-NNNNNN.tar`)
    that the new set does not hold."""
    ours = re.compile(rf"^{re.escape(prefix)}-\d{{6}}\.tar$")
    present = set(os.listdir(out))
    stale = {n for n in present if ours.match(n)} | (set(earlier) & present)
    return sorted(stale - set(keep))


def _earlier_shards(out: str) -> list[str]:
    """The shards an earlier conversion's report lists, written or to remove ([] without a readable report)."""
    try:
        with open(os.path.join(out, LLAVA_REPORT)) as f:
            report = json.load(f)
        shards = list(report.get("shards", [])) + list(report.get("removed", []))
    except (OSError, ValueError, AttributeError, TypeError):
        return []
    return [s for s in shards if isinstance(s, str) and os.path.basename(s) == s and s.endswith(".tar")]


def stable_key(raw_id, index: int, seen: Counter) -> str:
    base = re.sub(r"[^A-Za-z0-9_-]", "_", str(raw_id)) if raw_id not in (None, "") else f"entry_{index}"
    seen[base] += 1
    return base if seen[base] == 1 else f"{base}-dup{seen[base] - 1}"


def convert_llava(
    json_path: str, image_root: str, out: str, *, shard_size: int = 1000, prefix: str = "llava"
) -> ConversionReport:
    """LLaVA JSON `[{"id", "image" (under IMAGE_ROOT, optional), "conversations"}, ...]` -> `OUT/<prefix>-000000.tar`...

    Images are copied as they are on disk (never re-encoded: the cache's sha256 is the file's);
    entries without an image become text-only samples. Keys: the id with characters outside
    [A-Za-z0-9_-] replaced by '_', `-dupN` on the N-th repeat. An entry whose conversation fails the
    trainer's own validator, or whose image is missing, unreadable or outside IMAGE_ROOT, is refused
    and reported (also in `OUT/from_llava_report.json`): entries = samples + refused. A rerun into
    OUT replaces an earlier conversion: the new set is written whole, then the earlier set's other
    shards are deleted (a crash in between leaves both; rerun). Cost: the JSON is loaded whole."""
    if shard_size < 1:
        raise ConfigError(f"shard_size must be >= 1, not {shard_size}")
    with open(json_path, encoding="utf-8") as f:
        entries = json.load(f)
    if not isinstance(entries, list):
        raise CorpusError(f"{json_path}: expected a JSON list of entries, got {type(entries).__name__}")
    os.makedirs(out, exist_ok=True)
    earlier = _earlier_shards(out)
    root = os.path.realpath(image_root)
    seen: Counter = Counter()
    problems: list[dict] = []
    renamed: list[dict] = []
    renamed_count = 0
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
            if key != str(raw_id):
                renamed_count += 1
                if len(renamed) < RENAMED_EXAMPLES:
                    renamed.append({"index": index, "id": raw_id, "key": key})
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
    # the new set is complete: an earlier conversion's other shards go (else both sets count as the corpus)
    removed = _stale_shards(out, prefix, shards, earlier)
    report = ConversionReport(
        entries=len(entries),
        samples=written,
        text_only=text_only,
        shards=shards,
        problems=problems,
        renamed=renamed_count,
        renamed_examples=renamed,
        removed=removed,
    )
    with open(os.path.join(out, LLAVA_REPORT), "w") as f:
        json.dump(report.to_dict(), f, indent=2)
    for name in removed:  # after the report: a crash here leaves names a rerun finds and removes
        os.remove(os.path.join(out, name))
    return report
