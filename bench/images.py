"""`ola bench decode`: ms per image of each way to turn JPEG bytes into the vision tower's 336x336 pixels.

Each decoder does the processor's whole job (decode, shortest edge -> 336 bicubic antialiased,
centre crop, uint8; in pad mode the mean-colour square pad first) on photos that ship in the
packages (no downloads), on one core, min over `repeats` calls (the least disturbed run on a shared
machine). `max_diff` is against the model's image processor, on the normalised scale the tests bound
and in grey levels. Decoders whose package is missing (simplejpeg, torchvision) are reported as
unavailable. Cost: the figures depend on the core and its load; rerun on the training machine.
"""

from __future__ import annotations

import io
import os
import time

import numpy as np

SHORTEST_EDGE = 336


def _jpeg(array: np.ndarray, quality: int = 90) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def bench_images(seed: int = 0, only: tuple[str, ...] = ()) -> dict[str, bytes]:
    """{name: JPEG bytes} of the photos described in the module docstring (`only`: these names)."""
    from PIL import Image

    from olavlm.bench.loader import _photo
    from olavlm.schemas.extras import require

    data = require("skimage.data", "ola bench decode (its photos)")

    def coffee() -> bytes:
        upscaled = np.asarray(Image.fromarray(data.coffee()).resize((2000, 1500), Image.BICUBIC)).astype(
            np.int16
        )
        grain = np.random.default_rng(seed).integers(-6, 7, upscaled.shape)
        return _jpeg(np.clip(upscaled + grain, 0, 255).astype(np.uint8))

    def retina() -> bytes:
        with open(os.path.join(os.path.dirname(data.__file__), "retina.jpg"), "rb") as f:
            return f.read()

    makers = {
        "bench photo 500x375": lambda: _photo(np.random.default_rng(seed)),
        "cat 451x300": lambda: _jpeg(data.chelsea()),
        "coffee 2000x1500": coffee,
        "retina 1411x1411": retina,
    }
    return {name: make() for name, make in makers.items() if not only or name in only}


def _resize_crop_pil(image, resample: int = 3, reducing_gap: float | None = None) -> np.ndarray:
    from olavlm.trainer.data.images import shortest_edge_size

    new = shortest_edge_size(*image.size, SHORTEST_EDGE)
    resized = image.resize(new, resample=resample, reducing_gap=reducing_gap)
    left, top = (new[0] - SHORTEST_EDGE) // 2, (new[1] - SHORTEST_EDGE) // 2
    return np.ascontiguousarray(
        np.asarray(resized.crop((left, top, left + SHORTEST_EDGE, top + SHORTEST_EDGE))).transpose(2, 0, 1)
    )


def _resize_crop_torch(pixels: np.ndarray) -> np.ndarray:
    """(h, w, 3) uint8 -> the transform's resize + crop (trainer/data/images.py)."""
    from olavlm.trainer.data.images import resize_chw, shortest_edge_size

    new_w, new_h = shortest_edge_size(pixels.shape[1], pixels.shape[0], SHORTEST_EDGE)
    resized = resize_chw(pixels, (new_h, new_w), 3)
    left, top = (new_w - SHORTEST_EDGE) // 2, (new_h - SHORTEST_EDGE) // 2
    return np.ascontiguousarray(resized[:, top : top + SHORTEST_EDGE, left : left + SHORTEST_EDGE])


def _pil_open(data: bytes, draft: int | None = None):
    from PIL import Image

    image = Image.open(io.BytesIO(data))
    if draft:
        image.draft("RGB", (draft, draft))
    return image.convert("RGB")


def decoders() -> tuple[dict, dict[str, str]]:
    """({name: bytes -> uint8 (3, 336, 336)}, {name: why unavailable}) for the crop mode."""
    from olavlm.trainer.data.images import ImageTransform

    found = {
        "PIL decode + PIL resize (the processor's path)": lambda d: _resize_crop_pil(_pil_open(d)),
        "PIL draft(336) + PIL resize (former ImageTransform)": lambda d: _resize_crop_pil(
            _pil_open(d, SHORTEST_EDGE)
        ),
        "PIL decode + PIL resize reducing_gap=2": lambda d: _resize_crop_pil(_pil_open(d), reducing_gap=2.0),
        "PIL draft(336) + torch resize": lambda d: _resize_crop_torch(
            np.asarray(_pil_open(d, SHORTEST_EDGE))
        ),
        "PIL draft(672) + torch resize": lambda d: _resize_crop_torch(
            np.asarray(_pil_open(d, 2 * SHORTEST_EDGE))
        ),
        "PIL decode + torch resize (ImageTransform)": ImageTransform(),
    }
    missing = {}
    try:
        import simplejpeg

        found["simplejpeg decode + torch resize"] = lambda d: _resize_crop_torch(
            simplejpeg.decode_jpeg(d, colorspace="RGB")
        )
        found["simplejpeg scaled decode (>= 336) + torch resize"] = lambda d: _resize_crop_torch(
            simplejpeg.decode_jpeg(d, colorspace="RGB", min_height=SHORTEST_EDGE, min_width=SHORTEST_EDGE)
        )
    except ImportError as exc:
        missing["simplejpeg"] = f"not importable ({exc}); not in the lock"
    try:
        import torch
        from torchvision.io import decode_jpeg

        found["torchvision decode_jpeg + torch resize"] = lambda d: _resize_crop_torch(
            decode_jpeg(torch.frombuffer(bytearray(d), dtype=torch.uint8)).permute(1, 2, 0).numpy()
        )
    except ImportError as exc:
        missing["torchvision"] = f"not importable ({exc}); not in the lock"
    return found, missing


def _min_ms(fn, data: bytes, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn(data)
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def bench_decode(repeats: int = 15, seed: int = 0, only: tuple[str, ...] = ()) -> dict:
    """Run the benchmark; returns the figures as a dict (see the module docstring). `only`: image names."""
    import warnings

    import torch
    from transformers import CLIPImageProcessor

    from olavlm.trainer.data.images import ImageTransform, with_aspect_ratio

    warnings.filterwarnings("ignore", message=".*torchvision.*")  # the processor's backend notice
    torch.set_num_threads(1)
    processors = {
        "crop": CLIPImageProcessor(
            size={"shortest_edge": SHORTEST_EDGE}, crop_size={"height": SHORTEST_EDGE, "width": SHORTEST_EDGE}
        )
    }
    processors["pad"] = with_aspect_ratio(processors["crop"], "pad")
    mean = np.asarray(processors["crop"].image_mean, np.float64).reshape(3, 1, 1)
    std = np.asarray(processors["crop"].image_std, np.float64).reshape(3, 1, 1)
    found, missing = decoders()
    images = bench_images(seed, only)
    rows, wanted = [], {}

    def row(mode, name, fn, processor, data, image_name):
        key = (mode, image_name)
        if key not in wanted:
            wanted[key] = processor(images=_pil_open(data), return_tensors="np")["pixel_values"][
                0
            ]  # normalised
        want = wanted[key]
        got = np.asarray(fn(data), np.float64)  # 0-255
        levels = float(np.abs(got - (want * std + mean) * 255).max())
        rows.append(
            {
                "mode": mode,
                "decoder": name,
                "image": image_name,
                "ms": round(_min_ms(fn, data, repeats), 2),
                "max_diff": round(float(np.abs((got / 255 - mean) / std - want).max()), 4),
                "max_diff_grey_levels": round(levels, 1),
            }
        )

    for image_name, data in images.items():
        processor = processors["crop"]
        row(
            "crop",
            "transformers CLIPImageProcessor (PIL backend, float output)",
            lambda d, p=processor: (
                p(images=_pil_open(d), return_tensors="np")["pixel_values"][0] * std * 255 + mean * 255
            ),
            processor,
            data,
            image_name,
        )
        for name, fn in found.items():
            row("crop", name, fn, processor, data, image_name)
        processor = processors["pad"]
        row(
            "pad",
            "transformers LlavaImageProcessor(do_pad=True) (PIL backend, float output)",
            lambda d, p=processor: (
                p(images=_pil_open(d), return_tensors="np")["pixel_values"][0] * std * 255 + mean * 255
            ),
            processor,
            data,
            image_name,
        )
        row(
            "pad",
            "PIL decode + numpy pad + torch resize (ImageTransform pad)",
            ImageTransform(pad=True),
            processor,
            data,
            image_name,
        )
    return {
        "repeats": repeats,
        "statistic": "min ms per image, one core",
        "load_average": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "unavailable": missing,
        "rows": rows,
    }
