"""Stage 1 of the precompute path: image bytes -> uint8 arrays, one per teacher, on CPU.

Each teacher's recipe is a plain dict stored in its `TeacherSpec.preprocess`, so the cache records
exactly what was done: {"resize": [H, W]} (squash: depth, seg) or {"resize_shortest": S,
"center_crop": [H, W]} (CLIP: gen), plus "resample", "mean"/"std", "channel_order", "jpeg_draft"
(0 = full decode, the authors' path) and, for seg, the OneFormer processor's second resize
("processor_resize", "processor_resample"), done in PIL on uint8 as the processor does.

Design choice: only geometry happens here (decode, resize, crop) and the result stays uint8, a
quarter of float32's bytes through Ray's object store; normalisation runs on the teacher's device.
Cost: full decodes and resizes of large photos on the host. `--device-resize` moves the geometry to
the teacher's device (`device_prepare`, torch's antialiased filters): the host only decodes, at the
price of pixels a fraction of a grey level from PIL's (docs/FIDELITY.md, item 9).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image

from olavlm.schemas.corpus import decode_image
from olavlm.schemas.errors import ConfigError

RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
PIL_RESAMPLE_NAMES = {int(value): name for name, value in RESAMPLE.items()}
"""PIL's integer filter codes (as image processors store `resample`) -> the names used in specs."""
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def input_shape(preprocess: Mapping[str, Any]) -> tuple[int, int]:
    """(H, W) of the uint8 array `prepare` returns for this recipe."""
    if "processor_resize" in preprocess:
        return tuple(preprocess["processor_resize"])
    if "resize" in preprocess:
        return tuple(preprocess["resize"])
    return tuple(preprocess["center_crop"])


def draft_size(preprocess: Mapping[str, Any]) -> int:
    """Smallest side the decoder must keep so that resizing only ever shrinks from there."""
    if "resize" in preprocess:
        return int(max(preprocess["resize"]))
    return int(preprocess["resize_shortest"])


def shortest_side_size(width: int, height: int, shortest: int) -> tuple[int, int]:
    """(W, H) with the shorter side = `shortest`, as transformers' CLIP processor computes it."""
    if width <= height:
        return shortest, int(shortest * height / width)
    return int(shortest * width / height), shortest


def processor_output_size(height: int, width: int, size: Mapping[str, int]) -> tuple[int, int]:
    """(H, W) that a transformers image processor with this `size` dict resizes an H x W image to.

    {"shortest_edge": S, "longest_edge": L}: the short side becomes S unless the long side
    would pass L (then the long side becomes L), both truncated as
    `transformers.image_transforms.get_size_with_aspect_ratio` does; {"shortest_edge": S}
    alone: `get_resize_output_image_size(default_to_square=False)`; {"height", "width"}: fixed.
    """
    if size.get("height") and size.get("width"):
        return int(size["height"]), int(size["width"])
    shortest, longest = size.get("shortest_edge"), size.get("longest_edge")
    if not shortest:
        raise ValueError(f"image processor size {dict(size)} has neither shortest_edge nor height/width")
    raw = None
    if longest:
        short_side, long_side = float(min(height, width)), float(max(height, width))
        if long_side / short_side * shortest > longest:
            raw = longest * short_side / long_side
            shortest = int(round(raw))
    if (height <= width and height == shortest) or (width <= height and width == shortest):
        return height, width
    if width < height:
        return (int((raw if raw is not None else shortest) * height / width), shortest)
    return shortest, int((raw if raw is not None else shortest) * width / height)


def prepare(image: Image.Image, preprocess: Mapping[str, Any]) -> np.ndarray:
    """RGB PIL image -> uint8 (H, W, 3) ready for the device-side normalisation."""
    resample = RESAMPLE[preprocess["resample"]]
    if "resize" in preprocess:
        height, width = preprocess["resize"]
        image = image.resize((width, height), resample=resample)
        if "processor_resize" in preprocess and tuple(preprocess["processor_resize"]) != (height, width):
            height, width = preprocess["processor_resize"]  # the checkpoint's processor, after the squash
            image = image.resize((width, height), resample=RESAMPLE[preprocess["processor_resample"]])
        return np.asarray(image, dtype=np.uint8)
    width, height = shortest_side_size(*image.size, preprocess["resize_shortest"])
    image = image.resize((width, height), resample=resample)
    crop_h, crop_w = preprocess["center_crop"]
    top, left = (height - crop_h) // 2, (width - crop_w) // 2  # same rounding as transformers' center_crop
    if top < 0 or left < 0:
        raise ValueError(f"image {width}x{height} is smaller than the crop {crop_w}x{crop_h}")
    return np.asarray(image.crop((left, top, left + crop_w, top + crop_h)), dtype=np.uint8)


def resizes_on_device(preprocess: Mapping[str, Any]) -> bool:
    """True when the recipe leaves resize and crop to the teacher's device (`--device-resize`)."""
    return preprocess.get("resize_on") == "device"


def check_geometry(width: int, height: int, preprocess: Mapping[str, Any]) -> None:
    """The ValueError `prepare` would raise for this image size, raised on the host for a device recipe,
    so that a bad image is still a recorded sample error and never fails a teacher's batch."""
    if "resize" in preprocess:
        return
    new_w, new_h = shortest_side_size(width, height, preprocess["resize_shortest"])
    crop_h, crop_w = preprocess["center_crop"]
    if new_h < crop_h or new_w < crop_w:
        raise ValueError(f"image {new_w}x{new_h} is smaller than the crop {crop_w}x{crop_h}")


def prepare_all(data: bytes, recipes: Mapping[str, Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """Image bytes -> {teacher: uint8 (H, W, 3)}. Raises ValueError (undecodable, too large, ...).

    A device recipe gets the decoded image itself, one array object per draft size shared by the
    teachers that decode at that size (Ray's pickling then ships it once per batch)."""
    decoded: dict[int, Image.Image] = {}
    full: dict[int, np.ndarray] = {}
    out = {}
    for name, preprocess in recipes.items():
        size = int(preprocess.get("jpeg_draft", 0))
        if size not in decoded:
            decoded[size] = decode_image(data, draft_size=size or None)
        if resizes_on_device(preprocess):
            check_geometry(*decoded[size].size, preprocess)
            if size not in full:
                full[size] = np.asarray(decoded[size], dtype=np.uint8)
            out[name] = full[size]
        else:
            out[name] = prepare(decoded[size], preprocess)
    return out


INTERPOLATE_MODES = {"bilinear": "bilinear", "bicubic": "bicubic", "nearest": "nearest-exact"}
"""PIL filter names -> F.interpolate modes (PIL's NEAREST samples pixel centres: torch's "nearest-exact").
Other PIL filters (lanczos, box, hamming) have no torch equivalent: `check_device_resample` refuses them."""


def check_device_resample(teacher: str, recipe: Mapping[str, Any]) -> None:
    """Raise a ConfigError naming the teacher and filter when a recipe resizes with a filter the device
    path cannot reproduce (called when the spec is built, before any image is read)."""
    for key in ("resample", "processor_resample"):
        if key in recipe and recipe[key] not in INTERPOLATE_MODES:
            raise ConfigError(
                f"teacher {teacher!r}: --device-resize cannot reproduce PIL's {recipe[key]!r} filter "
                f"({key}); torch resizes with {', '.join(INTERPOLATE_MODES)} only: run without it"
            )


def _device_resize(x, size: tuple[int, int], resample: str):
    """(N, 3, H, W) -> (N, 3, *size), antialiased as PIL's filters, in x's dtype: uint8 through torch's
    uint8 kernels (PIL's two passes), float rounded and clamped to the uint8 range as PIL's output is."""
    import torch
    import torch.nn.functional as F

    mode = INTERPOLATE_MODES[resample]  # check_device_resample refused any other filter
    options = (
        {} if mode == "nearest-exact" else {"antialias": True, "align_corners": False}
    )  # AA bicubic: PIL's a = -0.5
    if x.dtype == torch.uint8:
        return F.interpolate(x.contiguous(memory_format=torch.channels_last), size=size, mode=mode, **options)
    return F.interpolate(x, size=size, mode=mode, **options).round_().clamp_(0, 255)


def _device_geometry(x, recipe: Mapping[str, Any]):
    """(N, 3, H, W) of equal-size images -> (N, 3, h, w), same dtype: the recipe's geometry, as `prepare`."""
    if "resize" in recipe:
        x = _device_resize(x, tuple(recipe["resize"]), recipe["resample"])
        if "processor_resize" in recipe and tuple(recipe["processor_resize"]) != tuple(recipe["resize"]):
            x = _device_resize(x, tuple(recipe["processor_resize"]), recipe["processor_resample"])
        return x
    height, width = x.shape[-2:]
    new_w, new_h = shortest_side_size(width, height, recipe["resize_shortest"])
    x = _device_resize(x, (new_h, new_w), recipe["resample"])
    crop_h, crop_w = recipe["center_crop"]
    top, left = (new_h - crop_h) // 2, (new_w - crop_w) // 2  # as `prepare`
    if top < 0 or left < 0:
        raise ValueError(f"image {new_w}x{new_h} is smaller than the crop {crop_w}x{crop_h}")
    return x[:, :, top : top + crop_h, left : left + crop_w]


def device_prepare(
    images: list[np.ndarray], recipe: Mapping[str, Any], device: str, *, uint8_kernels: bool | None = None
):
    """uint8 (H, W, 3) images of any sizes -> uint8 torch (B, h, w, 3) on `device`: `prepare`'s geometry run there.

    Images of equal size are resized in one batched call. `uint8_kernels` (default: on a CPU device)
    uses torch's uint8 kernels, which follow PIL's arithmetic and are much faster on CPU than float;
    otherwise (CUDA has no uint8 kernels) float32, rounded to uint8 after each resize as PIL's path is.
    """
    import warnings

    import torch

    if uint8_kernels is None:
        uint8_kernels = torch.device(device).type == "cpu"

    if not len(images):
        return torch.zeros((0, *input_shape(recipe), 3), dtype=torch.uint8, device=device)
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, array in enumerate(images):
        groups.setdefault(array.shape, []).append(index)
    out: list = [None] * len(images)
    with warnings.catch_warnings():  # "non-writable array": only read, copied by .to() / .float()
        warnings.simplefilter("ignore", UserWarning)
        for indices in groups.values():
            x = torch.stack([torch.from_numpy(images[i]).to(device, non_blocking=True) for i in indices])
            x = x.permute(0, 3, 1, 2)
            x = (
                _device_geometry(x if uint8_kernels else x.float(), recipe)
                .to(torch.uint8)
                .permute(0, 2, 3, 1)
            )
            for row, index in enumerate(indices):
                out[index] = x[row]
    return torch.stack(out)
