"""Feature-like synthetic targets for tests and benchmarks (numpy only).

Gaussian noise flatters some codecs and punishes others, so benchmarks and
fidelity tests use data shaped like real ViT features instead: a smooth spatial
field of a few latent components mixed into all channels, layer-normed per
token, with per-channel gains and a few large-magnitude outlier channels (the
"massive activations" of ViTs). Cost: still not real features; real-teacher
figures come from `ola cache stats` on a real cache.
"""

from __future__ import annotations

import numpy as np


def feature_like(n: int, tokens: int, width: int, seed: int = 0, components: int = 16) -> np.ndarray:
    """(n, tokens, width) float32 with ViT-feature-like statistics."""
    rng = np.random.default_rng(seed)
    side = int(round(np.sqrt(tokens)))
    grid = side * side == tokens and tokens > 1
    mix = rng.standard_normal((components, width)).astype(np.float32) / np.sqrt(components)
    gain = rng.gamma(4.0, 0.25, width).astype(np.float32)
    bias = (0.1 * rng.standard_normal(width)).astype(np.float32)
    outliers = rng.choice(width, size=max(1, width // 256), replace=False)
    out = np.empty((n, tokens, width), dtype=np.float32)
    for i in range(n):
        if grid:  # low-frequency field over the token grid
            freq = rng.standard_normal((components, 4, 4)).astype(np.float32)
            coords = np.linspace(0, np.pi, side, dtype=np.float32)
            basis = np.cos(np.outer(np.arange(4), coords))  # [4, side]
            field = np.einsum("kab,ay,bx->yxk", freq, basis, basis).reshape(tokens, components)
        else:
            field = rng.standard_normal((tokens, components)).astype(np.float32)
        x = field @ mix + 0.5 * rng.standard_normal((tokens, width)).astype(np.float32)
        x[:, outliers] += 8.0
        x = (x - x.mean(-1, keepdims=True)) / (x.std(-1, keepdims=True) + 1e-6)
        out[i] = x * gain + bias
    return out
