"""LLaVA training JSON -> WebDataset shards (`ola corpus from-llava`).

Input: `[{"id", "image" (relative to IMAGE_ROOT, optional), "conversations": [...]}, ...]`.
Output: `OUT/<prefix>-000000.tar`, ... with `shard_size` samples each; every sample
holds the image bytes as they are on disk (`jpg`, `png` or `webp`; never
re-encoded, so the sha256 the cache records is the file's) and a `json` member
with the entry. Entries without `image` become text-only samples.

Keys are stable: the entry's id with every character outside [A-Za-z0-9_-]
replaced by '_', and `-dupN` appended to the N-th repeat of an id. Samples keep
the JSON's order, so the same JSON and shard size give the same shards, keys and
bytes (mtime 0), and a cache precomputed over the result joins on every rerun.

Entries that cannot be converted (no conversations, missing or unreadable image,
unsupported image type) are reported by id in the returned report and in
`OUT/from_llava_report.json`; they never stop the conversion.
Cost: the JSON is loaded whole (LLaVA-665K: ~1 GB of Python objects).
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field

from olavlm.schemas.corpus import CorpusError, TarShardWriter
from olavlm.schemas.errors import ConfigError

EXTENSIONS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}
REPORT = "from_llava_report.json"


@dataclass(frozen=True, kw_only=True)
class ConversionReport:
    samples: int
    """Samples written."""
    text_only: int
    """Of which without an image."""
    shards: list[str]
    """Tar files written, in order."""
    problems: list[dict] = field(default_factory=list)
    """One {"index", "id", "reason"} per entry not converted."""

    def to_dict(self) -> dict:
        return {"samples": self.samples, "text_only": self.text_only, "shards": self.shards, "problems": self.problems}


def stable_key(raw_id, index: int, seen: Counter) -> str:
    base = re.sub(r"[^A-Za-z0-9_-]", "_", str(raw_id)) if raw_id not in (None, "") else f"entry_{index}"
    seen[base] += 1
    return base if seen[base] == 1 else f"{base}-dup{seen[base] - 1}"


def convert_llava(json_path: str, image_root: str, out: str, *, shard_size: int = 1000,
                  prefix: str = "llava") -> ConversionReport:
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
            conversations = entry.get("conversations")
            if not isinstance(conversations, list) or not conversations or not all(
                    isinstance(t, dict) and isinstance(t.get("value"), str) and "from" in t for t in conversations):
                problem(index, raw_id, "missing or malformed 'conversations'")
                continue
            files = {}
            image = entry.get("image")
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
    report = ConversionReport(samples=written, text_only=text_only, shards=shards, problems=problems)
    with open(os.path.join(out, REPORT), "w") as f:
        json.dump(report.to_dict(), f, indent=2)
    return report
