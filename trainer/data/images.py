"""Stage 3b of the data path: image bytes -> the vision tower's input.

The constants (shortest-edge resize, centre crop, mean, std, resampling filter,
padding) come from the image processor saved with the model, so the student
sees what that processor would give it, within 2 grey levels (the resize below). Two aspect-ratio modes, as
LLaVA-1.5's `--image_aspect_ratio`:
- crop: resize the short side, centre crop (CLIPImageProcessor; LLaVA's PT);
- pad: first pad to a square with the processor's mean colour
  (`int(mean * 255)`, LLaVA-1.5's expand2square), then the same resize and crop
  (transformers' `LlavaImageProcessor(do_pad=True)`; the authors' VPT, IFT and
  probing). The mode travels with the model as its saved image processor
  (`with_aspect_ratio`), so `ola generate` and the exported processor use the
  same mode and constants as training (their pixels within 2 grey levels of it).

The work is done here rather than by the processor (docs/BENCHMARKS.md, "Image
decode", has the figures), because:
- the resize is torch's antialiased uint8 interpolation (SIMD; the same filter
  as PIL's, within 2 grey levels of it, one rounding per pass): ~5x faster than
  PIL's resize, which was most of the time of a LLaVA-size photo;
- the worker returns uint8 (3, H, W) and nothing else is done per sample:
  normalisation to float happens on the model's device (`normalize_pixels`,
  called by the model), so 4x fewer bytes cross the loader's shared memory.
JPEGs are decoded at full size: decoding at reduced DCT scale (PIL's `draft`)
is 2-3x faster for photos much larger than 336 but differs from the processor's
full decode + resize by up to ~50 grey levels on detailed photos, outside the
tolerance the tests hold the transform to. Cost: large photos take their full
decode time (2000x1500: ~10 ms of ~17 ms in all on one loaded core); other
resampling filters than bilinear/bicubic fall back to PIL's resize.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from olavlm.schemas.config import IMAGE_ASPECT_RATIOS, STAGE_IMAGE_ASPECT_RATIO
from olavlm.schemas.corpus import decode_image
from olavlm.schemas.errors import ConfigError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True, kw_only=True)
class ImageTransform:
    """Resize the shortest edge to `shortest_edge`, centre-crop `crop`, keep uint8."""

    shortest_edge: int = 336
    """Target of the shortest-edge resize (pixels)."""
    crop: tuple[int, int] = (336, 336)
    """Centre crop (height, width) after the resize."""
    mean: tuple[float, float, float] = CLIP_MEAN
    """Per-channel mean on the [0, 1] scale, subtracted in `normalize`."""
    std: tuple[float, float, float] = CLIP_STD
    """Per-channel std on the [0, 1] scale."""
    resample: int = 3
    """PIL resampling filter (3 = bicubic, CLIP's)."""
    pad: bool = False
    """Pad to a square with the mean colour before the resize (LLaVA-1.5's `--image_aspect_ratio pad`)."""

    @classmethod
    def from_pretrained(cls, folder: str) -> ImageTransform:
        """Constants of the image processor saved in `folder` (the vision tower's folder)."""
        from transformers import AutoImageProcessor

        return cls.from_processor(AutoImageProcessor.from_pretrained(folder))

    @classmethod
    def from_processor(cls, processor) -> ImageTransform:
        size, crop = processor.size, processor.crop_size

        def get(d, k):  # SizeDict in transformers 5, dict before
            return d.get(k) if isinstance(d, dict) else getattr(d, k, None)

        edge = get(size, "shortest_edge") or get(size, "height")
        crop_hw = (
            (get(crop, "height"), get(crop, "width"))
            if crop is not None and processor.do_center_crop
            else (edge, edge)
        )
        resample = processor.resample
        return cls(
            shortest_edge=int(edge),
            crop=(int(crop_hw[0]), int(crop_hw[1])),
            mean=tuple(float(x) for x in processor.image_mean),
            std=tuple(float(x) for x in processor.image_std),
            resample=int(getattr(resample, "value", resample)),
            pad=bool(getattr(processor, "do_pad", False)),
        )

    @property
    def background(self) -> tuple[int, int, int]:
        """The padding colour: the mean on the 0-255 scale, truncated as LLaVA's expand2square does."""
        return tuple(int(m * 255) for m in self.mean)

    def __call__(self, data: bytes) -> np.ndarray:
        """Encoded image bytes -> uint8 (3, crop_h, crop_w). Raises ValueError on undecodable bytes."""
        pixels = np.asarray(decode_image(data))  # (h, w, 3) uint8, full size: see the module docstring
        if self.pad:
            pixels = pad_to_square(pixels, self.background)
        height, width = pixels.shape[:2]
        new_w, new_h = shortest_edge_size(width, height, self.shortest_edge)
        resized = resize_chw(pixels, (new_h, new_w), self.resample)  # (3, new_h, new_w), any strides
        ch, cw = self.crop
        left, top = (new_w - cw) // 2, (new_h - ch) // 2
        if left < 0 or top < 0:  # crop larger than the resized image: pad with zeros, as the processor does
            canvas = np.zeros((3, ch, cw), np.uint8)
            y0, x0 = max(0, -top), max(0, -left)
            sub = resized[:, max(0, top) : max(0, top) + ch, max(0, left) : max(0, left) + cw]
            canvas[:, y0 : y0 + sub.shape[1], x0 : x0 + sub.shape[2]] = sub
            return canvas
        return np.ascontiguousarray(resized[:, top : top + ch, left : left + cw])

    def blank(self) -> np.ndarray:
        """The input of a text-only sample (zeros after normalisation is what the model ignores anyway)."""
        return np.zeros((3, *self.crop), np.uint8)


def shortest_edge_size(width: int, height: int, shortest_edge: int) -> tuple[int, int]:
    """(width, height) after resizing the short side to `shortest_edge`: transformers'
    get_resize_output_image_size rounding (int of the scaled long edge)."""
    scale = shortest_edge / min(width, height)
    return (shortest_edge, int(height * scale)) if width <= height else (int(width * scale), shortest_edge)


TORCH_FILTERS = {2: "bilinear", 3: "bicubic"}
"""PIL filter number -> torch's antialiased mode that reproduces it (others go through PIL)."""


def resize_chw(pixels: np.ndarray, size: tuple[int, int], resample: int) -> np.ndarray:
    """uint8 (h, w, 3) -> uint8 (3, height, width) with PIL filter `resample` (antialiased when shrinking).

    Bilinear and bicubic run as torch's uint8 antialiased interpolation, whose kernels are PIL's
    (within 2 grey levels: its rounding differs, once per pass). The result is a view with
    channels-last strides.
    """
    height, width = size
    if pixels.shape[:2] == (height, width):
        return pixels.transpose(2, 0, 1)
    mode = TORCH_FILTERS.get(resample)
    if mode is None:
        from PIL import Image

        return np.asarray(Image.fromarray(pixels).resize((width, height), resample=resample)).transpose(
            2, 0, 1
        )
    import torch

    with warnings.catch_warnings():  # PIL's arrays are read-only; the tensor is only read
        warnings.simplefilter("ignore", UserWarning)
        source = torch.from_numpy(pixels).permute(2, 0, 1).unsqueeze(0)  # channels-last: torch's SIMD path
    out = torch.nn.functional.interpolate(source, size=(height, width), mode=mode, antialias=True)
    return out[0].numpy()


def pad_to_square(pixels: np.ndarray, background: tuple[int, int, int]) -> np.ndarray:
    """Centre (h, w, 3) `pixels` on a square canvas of the long side filled with `background` (LLaVA's expand2square)."""
    height, width = pixels.shape[:2]
    if width == height:
        return pixels
    side = max(width, height)
    top, left = (side - height) // 2, (side - width) // 2
    # Only the bands get the colour, from one ready row: broadcasting a 3-vector over every
    # pixel costs more than the whole resize.
    row = np.tile(np.asarray(background, np.uint8), side).reshape(side, 3)
    canvas = np.empty((side, side, 3), np.uint8)
    canvas[:top], canvas[top + height :] = row, row
    canvas[top : top + height, :left], canvas[top : top + height, left + width :] = (
        row[:left],
        row[left + width :],
    )
    canvas[top : top + height, left : left + width] = pixels
    return canvas


def normalize_pixels(pixels, mean, std):
    """uint8 pixels [B, 3, H, W] (torch, any device) -> float32 (x / 255 - mean) / std, per channel.

    The one place the data path's uint8 becomes the vision tower's input: the model calls it on its
    device (trainer/student/model.py). Computed as (x - 255 mean) * (1 / (255 std)) in float32.
    """
    import torch

    shape = (1, 3, 1, 1)
    mean_255 = torch.tensor(mean, dtype=torch.float32).view(shape).mul_(255.0).to(pixels.device)
    inv_std_255 = (
        torch.tensor(std, dtype=torch.float32).view(shape).mul_(255.0).reciprocal_().to(pixels.device)
    )
    return (pixels.float() - mean_255).mul_(inv_std_255)


def resolve_aspect_ratio(ratio: str, stage: str) -> str:
    """The configured `image_aspect_ratio`, or the stage's default ('' -> crop for PT, pad for VPT and IFT)."""
    ratio = ratio or STAGE_IMAGE_ASPECT_RATIO[stage]
    if ratio not in IMAGE_ASPECT_RATIOS:
        raise ConfigError(
            f"image_aspect_ratio {ratio!r}: one of {IMAGE_ASPECT_RATIOS} (or '' for the stage default)"
        )
    return ratio


def with_aspect_ratio(processor, ratio: str):
    """The image processor that implements `ratio` with `processor`'s constants.

    'pad' needs transformers' `LlavaImageProcessor(do_pad=True)`; 'crop' keeps a processor
    without padding as it is. The result is what the model saves, exports and generates with.
    """
    if ratio not in IMAGE_ASPECT_RATIOS:
        raise ConfigError(f"image_aspect_ratio {ratio!r}: one of {IMAGE_ASPECT_RATIOS}")
    pad = ratio == "pad"
    if bool(getattr(processor, "do_pad", False)) == pad:
        return processor
    try:  # the PIL backend: the pixels of this module (the torchvision one would differ by rounding)
        from transformers import LlavaImageProcessorPil as LlavaImageProcessor
    except ImportError:  # transformers before the backend split
        from transformers import LlavaImageProcessor

    settings = {
        k: v for k, v in processor.to_dict().items() if k not in ("image_processor_type", "processor_class")
    }
    return LlavaImageProcessor(**{**settings, "do_pad": pad})
