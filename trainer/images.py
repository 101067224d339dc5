"""Stage 3b of the data path: image bytes -> the vision tower's input.

The constants (shortest-edge resize, centre crop, mean, std, resampling filter,
padding) come from the image processor saved with the model, so the student
sees exactly what that processor would give it. Two aspect-ratio modes, as
LLaVA-1.5's `--image_aspect_ratio`:
- crop: resize the short side, centre crop (CLIPImageProcessor; LLaVA's PT);
- pad: first pad to a square with the processor's mean colour
  (`int(mean * 255)`, LLaVA-1.5's expand2square), then the same resize and crop
  (transformers' `LlavaImageProcessor(do_pad=True)`; the authors' VPT, IFT and
  probing). The mode travels with the model as its saved image processor
  (`with_aspect_ratio`), so `ola generate` and the exported processor give the
  model the same pixels as training did. The work is done here in
PIL + numpy rather than by the processor, because:
- JPEGs are decoded at reduced scale when they are much larger than the target
  (`draft`, `decode_image(draft_size=...)`): several times faster for photos;
- the worker returns uint8 (3, H, W); normalisation to float happens once per
  batch in `collate` (4x fewer bytes through the loader's shared memory).
Cost: the draft decode differs from a full decode + resize by a few grey levels
(a test bounds it); PNG/WebP are decoded in full.
"""

from __future__ import annotations

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
        crop_hw = (get(crop, "height"), get(crop, "width")) if crop is not None and processor.do_center_crop else (edge, edge)
        resample = processor.resample
        return cls(shortest_edge=int(edge), crop=(int(crop_hw[0]), int(crop_hw[1])),
                   mean=tuple(float(x) for x in processor.image_mean), std=tuple(float(x) for x in processor.image_std),
                   resample=int(getattr(resample, "value", resample)), pad=bool(getattr(processor, "do_pad", False)))

    @property
    def background(self) -> tuple[int, int, int]:
        """The padding colour: the mean on the 0-255 scale, truncated as LLaVA's expand2square does."""
        return tuple(int(m * 255) for m in self.mean)

    def __call__(self, data: bytes) -> np.ndarray:
        """Encoded image bytes -> uint8 (3, crop_h, crop_w). Raises ValueError on undecodable bytes."""
        image = decode_image(data, draft_size=self.shortest_edge)
        if self.pad:
            image = expand_to_square(image, self.background)
        width, height = image.size
        scale = self.shortest_edge / min(width, height)
        # Same rounding as transformers' get_resize_output_image_size (int of the scaled long edge).
        new = (self.shortest_edge, int(height * scale)) if width <= height else (int(width * scale), self.shortest_edge)
        if (width, height) != new:
            image = image.resize(new, resample=self.resample)
        ch, cw = self.crop
        left, top = (new[0] - cw) // 2, (new[1] - ch) // 2
        if left < 0 or top < 0:  # crop larger than the resized image: pad with zeros, as the processor does
            canvas = np.zeros((ch, cw, 3), np.uint8)
            array = np.asarray(image)
            y0, x0 = max(0, -top), max(0, -left)
            sub = array[max(0, top): max(0, top) + ch, max(0, left): max(0, left) + cw]
            canvas[y0:y0 + sub.shape[0], x0:x0 + sub.shape[1]] = sub
            array = canvas
        else:
            array = np.asarray(image.crop((left, top, left + cw, top + ch)))
        return np.ascontiguousarray(array.transpose(2, 0, 1))

    def blank(self) -> np.ndarray:
        """The input of a text-only sample (zeros after normalisation is what the model ignores anyway)."""
        return np.zeros((3, *self.crop), np.uint8)


def expand_to_square(image, background: tuple[int, int, int]):
    """Centre `image` on a square canvas of its long side filled with `background` (LLaVA's expand2square)."""
    from PIL import Image

    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), background)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def resolve_aspect_ratio(ratio: str, stage: str) -> str:
    """The configured `image_aspect_ratio`, or the stage's default ('' -> crop for PT, pad for VPT and IFT)."""
    ratio = ratio or STAGE_IMAGE_ASPECT_RATIO[stage]
    if ratio not in IMAGE_ASPECT_RATIOS:
        raise ConfigError(f"image_aspect_ratio {ratio!r}: one of {IMAGE_ASPECT_RATIOS} (or '' for the stage default)")
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

    settings = {k: v for k, v in processor.to_dict().items() if k not in ("image_processor_type", "processor_class")}
    return LlavaImageProcessor(**{**settings, "do_pad": pad})
