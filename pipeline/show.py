"""`ola cache show`: one sample's image beside every teacher's cached target.

Token grids (depth, seg) are mapped to RGB by their first three principal components, so regions
the teacher considers alike share a colour; a single-token target (gen) is a bar strip of its
values. Cost: PCA per image hides absolute scale; the panel title gives norm and dtype.
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow.compute as pc

from olavlm.schemas.cache import CacheError, TargetCache
from olavlm.schemas.corpus import CorpusError, decode_image, iter_samples, list_shards
from olavlm.schemas.manifest import NO_IMAGE


def pca_rgb(tokens: np.ndarray) -> np.ndarray:
    """(T, D) -> (side, side, 3) in [0, 1] from the first three principal components."""
    t = tokens.shape[0]
    side = int(round(np.sqrt(t)))
    if side * side != t:
        raise CacheError(f"{t} tokens do not form a square grid")
    centered = tokens - tokens.mean(0, keepdims=True)
    _, _, vt = np.linalg.svd(centered, full_matrices=False)
    components = centered @ vt[:3].T  # [T, 3]
    if components.shape[1] < 3:
        components = np.pad(components, ((0, 0), (0, 3 - components.shape[1])))
    low, high = np.percentile(components, 1, axis=0), np.percentile(components, 99, axis=0)
    rgb = np.clip((components - low) / np.maximum(high - low, 1e-8), 0, 1)
    return rgb.reshape(side, side, 3)


def find_image(corpus: str, key: str, shard: str | None = None, storage_options: dict | None = None) -> bytes:
    """The image bytes of `key` (in `shard` if given); CorpusError if no sample of the corpus has them."""
    for candidate in list_shards(corpus, storage_options):
        if shard is not None and candidate.name != shard:
            continue
        for sample in iter_samples(candidate.url, storage_options):
            if sample.key == key and getattr(sample, "image_bytes", None) is not None:
                return sample.image_bytes
    raise CorpusError(f"key {key!r} not found in corpus {corpus}" + (f" shard {shard}" if shard else ""))


def missing_target(cache: TargetCache, teacher: str, key: str) -> str:
    """Why `key` has no `teacher` target, from the cache's error tables: a text-only sample (no image,
    so no target for any teacher), an image the precompute refused, or a key it never saw."""
    table = cache.errors(teacher)
    errors = table.filter(pc.equal(table.column("key"), key))
    where = f"{cache.root.url}: key {key!r} has no {teacher!r} target"
    if not errors.num_rows:
        return f"{where}: not in any committed shard (run `ola precompute` on its corpus shard?)"
    error = errors.slice(0, 1).to_pylist()[0]
    if error["reason"].startswith(NO_IMAGE):
        return f"{where}: it is a text-only sample (no image, so no teacher target; shard {error['shard']})"
    return f"{where}: the precompute refused it (shard {error['shard']}, {error['stage']}: {error['reason']})"


def render_sample(
    cache_root: str,
    key: str,
    out: str,
    corpus: str | None = None,
    dpi: int = 100,
    storage_options: dict | None = None,
) -> dict:
    """Write a PNG of `key`'s image (if `corpus` is given) and targets; returns what was drawn.
    `storage_options` (fsspec) open both the cache and the corpus; `out` is a local file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cache = TargetCache(cache_root, storage_options)
    specs = cache.specs()
    if not specs:
        raise CacheError(f"{cache_root}: the cache has no teachers")
    targets, shard = {}, None
    for name in specs:
        found = cache.index(name).get(key)
        if found is None:
            raise CacheError(missing_target(cache, name, key))
        shard = found[0]
        targets[name] = cache.open_shard(name, found[0]).read(found[1])
    panels = (1 if corpus else 0) + len(targets)
    fig, axes = plt.subplots(1, panels, figsize=(3.2 * panels, 3.4), dpi=dpi, squeeze=False)
    axes = list(axes[0])
    if corpus:
        image = decode_image(find_image(corpus, key, shard, storage_options))
        axes[0].imshow(np.asarray(image))
        axes[0].set_title(f"{key}\n{image.width}x{image.height}", fontsize=8)
        axes.pop(0)
    drawn = {}
    for ax, (name, target) in zip(axes, targets.items()):
        spec = specs[name]
        fidelity = cache.commit_info(name, shard).get("fidelity")
        note = f"{name} {spec.shape[0]}x{spec.shape[1]} {spec.dtype}"
        if fidelity:
            note += f"\ncos {fidelity['cosine_mean']:.4f} vs fp32"
        if target.shape[0] > 1:
            ax.imshow(pca_rgb(target), interpolation="nearest")
            drawn[name] = "pca-grid"
        else:
            values = target[0]
            strip = (
                values.reshape(-1, 1)
                if values.size < 16
                else values[: (values.size // 16) * 16].reshape(16, -1)
            )
            ax.imshow(strip, aspect="auto", cmap="coolwarm")
            drawn[name] = "strip"
        ax.set_title(f"{note}\n|x|={np.linalg.norm(target):.1f}", fontsize=8)
    for ax in fig.axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return {"out": out, "shard": shard, "panels": drawn}
