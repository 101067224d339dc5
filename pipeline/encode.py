"""Stage 3: float32 targets on the teacher's device -> storage dtype, before they leave it.

The same encodings as `schemas.quant` (which the readers decode with), done in torch so that int8
quantisation runs on the GPU and only 1 byte per value (+ a float32 scale per token) crosses to the
host. For int8 the fidelity against the float32 outputs is summed per batch here and merged by
`combine_fidelity`. Cost: a few extra reductions per batch. torch is imported inside
`encode_on_device`: the CPU writer tasks import this module too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class EncodedBatch:
    values: np.ndarray
    """(B, T, D) in the storage dtype of `schemas.quant.zarr_dtype`."""
    scale: np.ndarray | None
    """(B, T) float32 for int8, else None."""
    fidelity: dict[str, float] | None
    """int8 only: partial sums for `combine_fidelity`."""


def encode_on_device(x, dtype: str) -> EncodedBatch:
    """float32 tensor (B, T, D) -> stored values; int8 is quantised per token exactly as `quant.quantize_int8`."""
    import torch  # here, not at the top: writer tasks import this module for `combine_fidelity` only

    if dtype == "float16":
        return EncodedBatch(x.to(torch.float16).cpu().numpy(), None, None)
    if dtype == "bfloat16":  # raw bit pattern, as quant.bfloat16_bits (round to nearest even)
        return EncodedBatch(x.to(torch.bfloat16).view(torch.int16).cpu().numpy().view(np.uint16), None, None)
    if dtype != "int8":
        raise ValueError(f"unknown storage dtype {dtype!r}")
    x = x.float()
    scale = x.abs().amax(dim=-1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round(x / scale[..., None]), -127, 127)  # round half to even, as np.rint
    decoded = q * scale[..., None]
    ref, dec = x.flatten(1).double(), decoded.flatten(1).double()
    cos = (ref * dec).sum(1) / torch.clamp(ref.norm(dim=1) * dec.norm(dim=1), min=1e-12)
    partial = {
        "n": float(len(cos)),
        "cosine_sum": float(cos.sum()) if len(cos) else 0.0,
        "cosine_min": float(cos.min()) if len(cos) else 1.0,
        "max_abs_error": float((ref - dec).abs().max()) if ref.numel() else 0.0,
        "max_abs_ref": float(ref.abs().max()) if ref.numel() else 0.0,
    }
    return EncodedBatch(q.to(torch.int8).cpu().numpy(), scale.cpu().numpy(), partial)


def combine_fidelity(parts: list[dict[str, float]]) -> dict[str, float]:
    """Merge per-batch partials into {cosine_mean, cosine_min, max_rel_error} over the shard."""
    n = sum(p["n"] for p in parts)
    if not n:
        return {"cosine_mean": 1.0, "cosine_min": 1.0, "max_rel_error": 0.0}
    max_ref = max(p["max_abs_ref"] for p in parts)
    return {
        "cosine_mean": sum(p["cosine_sum"] for p in parts) / n,
        "cosine_min": min(p["cosine_min"] for p in parts if p["n"]),
        "max_rel_error": max(p["max_abs_error"] for p in parts) / max(max_ref, 1e-12),
    }
