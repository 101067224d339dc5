"""Stage 3b of the data path: image bytes -> the vision tower's input, uint8 (3, H, W).

The constants come from the image processor saved with the model; the aspect-ratio mode is
LLaVA-1.5's: crop (short side resized, centre crop; PT) or pad (to a square with the mean colour
first; VPT, IFT, probing), saved with the model (`with_aspect_ratio`) so generation and the export
see what training saw. Design choice: the work is done here, not by the processor: full JPEG
decode, torch's antialiased uint8 resize (PIL's filter, within 2 grey levels, much faster) and
uint8 out, normalised on the model's device. Cost: large photos pay their full decode; filters
other than bilinear / bicubic fall back to PIL. Figures: docs/BENCHMARKS.md, "Image decode".
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

    Bilinear and bicubic run as torch's uint8 antialiased interpolation with PIL's kernels (within 2
    grey levels: one rounding per pass); the result is a channels-last view.
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

    The one place the data path's uint8 becomes the vision tower's input; the model calls it on its device.
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
    """The image processor that implements `ratio` with `processor`'s constants, as the model saves it.

    'pad' needs transformers' `LlavaImageProcessor(do_pad=True)`; 'crop' keeps one without padding as it is.
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
