"""`ola bench loader`: samples/s per CPU core through the whole data path, with full-size targets.

Builds a temporary corpus of JPEG image-text samples and a cache with the paper's target shapes
(feature-like values, schemas/synthetic.py), then times the loader end to end (tar read, decode +
resize, tokenization, sha256-checked join, collate): one process without DataLoader workers (the
per-core figure), the same with `workers` workers, and each stage per sample alone.
`codec` picks the cache's codec ("default", "none", "lz4", "zstd") and `dtype` its storage dtype;
`bench_loader_matrix` runs every pair. Cost: the cache takes up to a few MB per sample on disk.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import tempfile
import time

import numpy as np

SHAPES = {"depth": (576, 1024), "seg": (576, 1536), "gen": (1, 1024)}
TARGET = 200.0
"""The data path's goal, in samples/s per CPU core."""


def _photo(rng, size=(500, 375)) -> bytes:
    """A JPEG with photo-like statistics (smooth shapes + mild noise; pure noise decodes unusually slowly)."""
    from PIL import Image, ImageDraw, ImageFilter

    image = Image.new("RGB", size, tuple(int(c) for c in rng.integers(0, 255, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x0, y0 = rng.integers(0, size[0]), rng.integers(0, size[1])
        box = (x0, y0, x0 + rng.integers(20, 200), y0 + rng.integers(20, 200))
        draw.ellipse(box, fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    image = image.filter(ImageFilter.GaussianBlur(2))
    array = np.asarray(image).astype(np.int16) + rng.integers(-6, 7, (size[1], size[0], 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(array, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


CODECS = ("default", "none", "lz4", "zstd")
IMAGE_DECODER = (
    "PIL (libjpeg-turbo) full decode + torch antialiased uint8 bicubic resize (trainer/data/images.py)"
)


def codec_spec(codec: str, dtype: str):
    """The CodecSpec a `codec` name of this bench stands for."""
    from olavlm.schemas.spec import CodecSpec, default_codec

    named = {
        "default": default_codec(dtype),
        "none": CodecSpec(cname="lz4", clevel=0, shuffle="noshuffle"),
        "lz4": CodecSpec(cname="lz4", clevel=5, shuffle="shuffle"),
        "zstd": CodecSpec(cname="zstd", clevel=3, shuffle="shuffle"),
    }
    if codec not in named:
        raise ValueError(f"codec {codec!r} is not one of {', '.join(CODECS)}")
    return named[codec]


def build_bench_data(
    root: str,
    samples: int,
    shard_size: int = 64,
    seed: int = 0,
    codec: str = "default",
    dtype: str = "float16",
) -> dict[str, bytes]:
    """Corpus under root/corpus, cache under root/cache; returns {key: jpeg bytes}."""
    from olavlm.schemas import quant
    from olavlm.schemas.cache import TargetCache
    from olavlm.schemas.corpus import TarShardWriter, sha256_hex
    from olavlm.schemas.spec import TeacherSpec
    from olavlm.schemas.synthetic import feature_like

    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "corpus"))
    images: dict[str, bytes] = {}
    shards: dict[str, list[str]] = {}
    captions = [
        "A photo of a small dog sitting on a wooden table next to a red cup.",
        "Two people are walking along the beach at sunset, and the sky is orange and purple.",
    ]
    for start in range(0, samples, shard_size):
        name = f"bench-{start // shard_size:06d}"
        with TarShardWriter(os.path.join(root, "corpus", f"{name}.tar")) as writer:
            for i in range(start, min(samples, start + shard_size)):
                key = f"{i:08d}"
                images[key] = _photo(rng)
                conv = [
                    {"from": "human", "value": "<image>\nProvide a brief description of the given image."},
                    {"from": "gpt", "value": captions[i % 2]},
                ]
                writer.write(key, {"jpg": images[key], "json": json.dumps({"conversations": conv}).encode()})
                shards.setdefault(name, []).append(key)
    cache = TargetCache(os.path.join(root, "cache"))
    distinct = 8  # feature-like rows are slow to make; tile a few distinct ones
    for task, shape in SHAPES.items():
        cache.register(
            TeacherSpec(
                name=task,
                kind="synthetic",
                model="synthetic",
                shape=shape,
                dtype=dtype,
                codec=codec_spec(codec, dtype),
            )
        )
        base, base_scale = quant.encode(feature_like(distinct, *shape, seed=seed), dtype)
        for shard, keys in shards.items():
            values = np.stack([base[i % distinct] for i in range(len(keys))])
            scale = (
                None if base_scale is None else np.stack([base_scale[i % distinct] for i in range(len(keys))])
            )
            cache.write_shard(task, shard, keys, [sha256_hex(images[k]) for k in keys], values, scale)
    return images


def _rate(loader, batches: int) -> float:
    it = iter(loader)
    next(it)  # warm-up: worker start, first reads
    start, count = time.perf_counter(), 0
    for batch, _ in itertools.islice(it, batches):
        count += len(batch["keys"])
    return count / (time.perf_counter() - start)


def bench_loader(
    samples: int = 256,
    batch_size: int = 16,
    workers: int = 2,
    seed: int = 0,
    codec: str = "default",
    dtype: str = "float16",
) -> dict:
    """Run the benchmark; returns the figures as a dict (see the module docstring)."""
    import torch

    from olavlm.schemas.config import DataConfig
    from olavlm.schemas.corpus import iter_samples, sha256_hex
    from olavlm.trainer.data.collate import Example, collate
    from olavlm.trainer.data.images import ImageTransform
    from olavlm.trainer.data.loader import SampleStream, build_loader
    from olavlm.trainer.data.source import shards_of
    from olavlm.trainer.data.text import tokenize
    from olavlm.trainer.student.presets import build_tokenizer
    from olavlm.trainer.student.tokens import add_task_tokens

    torch.set_num_threads(1)
    tokenizer = build_tokenizer()
    layout = add_task_tokens(tokenizer, tuple(SHAPES), 8, 576)
    transform = ImageTransform()  # CLIP ViT-L/14-336 constants
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    with tempfile.TemporaryDirectory(prefix="ola-bench-loader-") as root:
        build_bench_data(root, samples, seed=seed, codec=codec, dtype=dtype)
        batches = max(1, samples // batch_size - 2)

        def make(num_workers):
            cfg = DataConfig(
                data=os.path.join(root, "corpus"),
                cache=os.path.join(root, "cache"),
                batch_size=batch_size,
                num_workers=num_workers,
                max_length=2048,
                seed=seed,
            )
            return build_loader(
                cfg, tokenizer=tokenizer, layout=layout, transform=transform, tasks=tuple(SHAPES)
            )

        single = _rate(make(0), batches)
        parallel = _rate(make(workers), batches) if workers else None

        # Stage by stage on the same samples, one process.
        stream: SampleStream = make(0).stream
        raw = []
        t0 = time.perf_counter()
        for shard in shards_of(os.path.join(root, "corpus")):
            raw.extend(s for s in iter_samples(shard.url))
        stages = {"tar_read": time.perf_counter() - t0}
        t0 = time.perf_counter()
        pixels = [transform(s.image_bytes) for s in raw]
        stages["jpeg_decode_resize"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        texts = [
            tokenize(
                json.loads(s.files["json"])["conversations"],
                tokenizer,
                layout,
                has_image=True,
                max_length=2048,
                render=stream.render,
            )
            for s in raw
        ]
        stages["tokenize"] = time.perf_counter() - t0
        shard_of = {
            s.key: n.name for n in shards_of(os.path.join(root, "corpus")) for s in iter_samples(n.url)
        }
        buffers = [stream.join.buffers(batch_size) for _ in range(0, len(raw), batch_size)]
        t0 = time.perf_counter()
        for i, s in enumerate(raw):  # as the loader does: decompress into the batch buffer
            stream.join.read_into(
                buffers[i // batch_size], i % batch_size, shard_of[s.key], s.key, sha256_hex(s.image_bytes)
            )
        stages["join_sha256_and_cache_read"] = time.perf_counter() - t0
        examples = [Example(s.key, t.input_ids, t.labels, p, {}) for s, t, p in zip(raw, texts, pixels)]
        t0 = time.perf_counter()
        for i in range(0, len(examples), batch_size):
            part = examples[i : i + batch_size]
            batch_pixels = collate(
                part,
                **stream._collate_args,
                targets={t: b[: len(part)] for t, b in buffers[i // batch_size].items()},
            )["pixel_values"]
        stages["collate"] = time.perf_counter() - t0
    per_sample_ms = {k: round(v / len(raw) * 1e3, 3) for k, v in stages.items()}
    chosen = codec_spec(codec, dtype)
    return {
        "samples": samples,
        "batch_size": batch_size,
        "cores": cores,
        "load_average": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "targets": {t: list(s) for t, s in SHAPES.items()},
        "target_dtype": dtype,
        "codec": f"{codec}: blosc-{chosen.cname} level {chosen.clevel} {chosen.shuffle}",
        "image": "JPEG 500x375 -> 336x336",
        "image_decoder": IMAGE_DECODER,
        "pixel_values": f"{batch_pixels.dtype} (normalised on the model's device)",
        "tokens_per_sample": len(texts[0].input_ids),
        "samples_per_s_one_core": round(single, 1),
        f"samples_per_s_{workers}_workers": round(parallel, 1) if parallel else None,
        "samples_per_s_per_core_with_workers": round(parallel / min(workers, cores), 1) if parallel else None,
        "stage_ms_per_sample": per_sample_ms,
        "stage_sum_samples_per_s": round(1e3 / sum(per_sample_ms.values()), 1),
        "target_samples_per_s_per_core": TARGET,
        "meets_target": single >= TARGET,
    }


def bench_loader_matrix(
    codecs: tuple[str, ...] = ("default",), dtypes: tuple[str, ...] = ("float16",), **kw
) -> list[dict]:
    """`bench_loader` for every (codec, dtype) pair, one after the other in this process."""
    return [bench_loader(codec=c, dtype=d, **kw) for d in dtypes for c in codecs]
