"""Storage encodings of float targets, in numpy only (no torch).

- float16: a plain cast.
- bfloat16: stored as the raw uint16 bit pattern, since Zarr v3 has no portable
  bfloat16 dtype. Encoding rounds to nearest even; decoding is exact.
- int8: symmetric per-token quantisation, q = round(x / s), s = max|x| / 127 per
  token. Cost: lossy (fidelity in docs/BENCHMARKS.md, "Target cache"); a token with
  one huge outlier channel loses precision elsewhere.
"""

from __future__ import annotations

import numpy as np


def bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit pattern (uint16), round to nearest even; NaN kept NaN."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
    out = ((bits + rounding) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        out[nan] = 0x7FC0
    return out


def bfloat16_to_float32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def quantize_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(..., T, D) float -> (int8 values (..., T, D), float32 scale (..., T))."""
    x = np.asarray(x, dtype=np.float32)
    scale = np.abs(x).max(axis=-1) / 127.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = np.clip(np.rint(x / scale[..., None]), -127, 127).astype(np.int8)
    return q, scale


def dequantize_int8(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return q.astype(np.float32) * scale[..., None]


def encode(x: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Float targets -> (stored values, per-token scale or None)."""
    if dtype == "float16":
        return np.asarray(x, dtype=np.float16), None
    if dtype == "bfloat16":
        return bfloat16_bits(x), None
    if dtype == "int8":
        return quantize_int8(x)
    raise ValueError(f"unknown storage dtype {dtype!r}")


def decode(values: np.ndarray, scale: np.ndarray | None, dtype: str) -> np.ndarray:
    """Stored values -> float32."""
    if dtype == "float16":
        return values.astype(np.float32)
    if dtype == "bfloat16":
        return bfloat16_to_float32(values)
    if dtype == "int8":
        if scale is None:
            raise ValueError("int8 targets need their scale array")
        return dequantize_int8(values, scale)
    raise ValueError(f"unknown storage dtype {dtype!r}")


def zarr_dtype(dtype: str) -> str:
    return {"float16": "float16", "bfloat16": "uint16", "int8": "int8"}[dtype]


def fidelity(reference: np.ndarray, decoded: np.ndarray) -> dict[str, float]:
    """Per-image cosine (mean, min) and max relative error of `decoded` against `reference`."""
    ref = np.asarray(reference, dtype=np.float64).reshape(len(reference), -1)
    dec = np.asarray(decoded, dtype=np.float64).reshape(len(decoded), -1)
    cos = (ref * dec).sum(1) / np.maximum(np.linalg.norm(ref, axis=1) * np.linalg.norm(dec, axis=1), 1e-12)
    max_rel = float(np.abs(ref - dec).max() / max(np.abs(ref).max(), 1e-12)) if ref.size else 0.0
    return {
        "cosine_mean": float(cos.mean()) if len(cos) else 1.0,
        "cosine_min": float(cos.min()) if len(cos) else 1.0,
        "max_rel_error": max_rel,
    }
