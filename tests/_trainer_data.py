"""Helpers of the trainer tests: tiny WebDataset corpora and matching caches, built on the fly.

Sample keys are `s{shard}-{i}`, so a test can count exactly what came out.
"""

from __future__ import annotations

import io
import json
import os

import numpy as np

TASK_SHAPES = {"gen": (1, 16), "depth": (16, 16), "seg": (16, 24)}


def jpeg(seed: int, size=(40, 32)) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    array = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def conversation(i: int) -> list[dict]:
    return [
        {"from": "human", "value": "<image>\nWhat is in the image?"},
        {"from": "gpt", "value": f"A photo of a small dog number {i} sitting on a table."},
    ]


def make_corpus(folder, shards: int = 2, per_shard: int = 6, text_only_every: int = 0) -> dict[str, dict]:
    """Write shards `train-000.tar`...; returns {key: {"shard", "image" (bytes or None)}}."""
    from olavlm.schemas.corpus import TarShardWriter

    os.makedirs(folder, exist_ok=True)
    samples = {}
    n = 0
    for s in range(shards):
        name = f"train-{s:03d}"
        with TarShardWriter(os.path.join(folder, f"{name}.tar")) as writer:
            for i in range(per_shard):
                key = f"s{s}-{i}"
                text_only = text_only_every and n % text_only_every == text_only_every - 1
                files = {"json": json.dumps({"id": key, "conversations": conversation(n)}).encode()}
                image = None
                if not text_only:
                    image = jpeg(n)
                    files["jpg"] = image
                else:
                    files["json"] = json.dumps(
                        {
                            "id": key,
                            "conversations": [
                                {"from": "human", "value": "Say something."},
                                {"from": "gpt", "value": f"Text {n}."},
                            ],
                        }
                    ).encode()
                writer.write(key, files)
                samples[key] = {"shard": name, "image": image}
                n += 1
    return samples


def make_cache(
    root,
    samples: dict[str, dict],
    tasks=("gen", "depth", "seg"),
    dtype="float16",
    seed: int = 0,
    shapes=TASK_SHAPES,
    shard_names: dict[str, str] | None = None,
    nan_shard: str = "",
):
    """A committed cache over `samples` (image samples only) with random targets and the true sha256s.

    `shard_names` renames the cache shards (to test the keyed path); the depth targets of
    `nan_shard` are NaN (to test the non-finite loss check). Returns {task: {key: float32 target}}.
    """
    from olavlm.schemas import quant
    from olavlm.schemas.cache import TargetCache
    from olavlm.schemas.corpus import sha256_hex
    from olavlm.schemas.spec import TeacherSpec

    cache = TargetCache(root)
    rng = np.random.default_rng(seed)
    truth: dict[str, dict[str, np.ndarray]] = {}
    by_shard: dict[str, list[str]] = {}
    for key, info in samples.items():
        if info["image"] is not None:
            by_shard.setdefault(info["shard"], []).append(key)
    for task in tasks:
        spec = TeacherSpec(name=task, kind="synthetic", model="synthetic", shape=shapes[task], dtype=dtype)
        cache.register(spec)
        truth[task] = {}
        for shard, keys in by_shard.items():
            x = rng.standard_normal((len(keys), *shapes[task])).astype(np.float32)
            if shard == nan_shard and task == "depth":
                x[:] = np.nan
            values, scale = quant.encode(x, dtype)
            decoded = quant.decode(values, scale, dtype)
            cache.write_shard(
                task,
                (shard_names or {}).get(shard, shard),
                keys,
                [sha256_hex(samples[k]["image"]) for k in keys],
                values,
                scale,
            )
            truth[task].update({k: decoded[i] for i, k in enumerate(keys)})
    return cache, truth


def tiny_text_setup(
    tasks=("gen", "depth", "seg"), tokens_per_task: int = 2, num_image_tokens: int = 4, image_size: int = 8
):
    """(tokenizer, layout, transform) of a tiny student without building its model."""
    from olavlm.trainer.data.images import ImageTransform
    from olavlm.trainer.student.presets import build_tokenizer
    from olavlm.trainer.student.tokens import add_task_tokens

    tokenizer = build_tokenizer()
    layout = add_task_tokens(tokenizer, tasks, tokens_per_task, num_image_tokens)
    transform = ImageTransform(shortest_edge=image_size, crop=(image_size, image_size))
    return tokenizer, layout, transform
