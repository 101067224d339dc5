"""Image decode + resize (trainer/data/images.py) against the image processors, and uint8 pixels through the model.

The tolerance is the one the other transform tests use: 0.05 on the normalised scale
(~3 grey levels), the uint8 rounding of the resized image.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from olavlm.trainer.data.images import ImageTransform, normalize_pixels, with_aspect_ratio

TOLERANCE = 0.05


def detailed_jpeg(width: int, height: int, seed: int = 0) -> bytes:
    """A JPEG with detail at every scale (smooth gradient + pixel noise): where reduced-scale decoding shows."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 200, width)[None, :, None] + np.linspace(0, 55, height)[:, None, None]
    array = np.clip(ramp + rng.integers(-40, 41, (height, width, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def processor_pixels(processor, data: bytes) -> torch.Tensor:
    image = Image.open(io.BytesIO(data)).convert("RGB")
    return torch.as_tensor(processor(images=image, return_tensors="np")["pixel_values"][0])


def ours(transform: ImageTransform, data: bytes) -> torch.Tensor:
    return normalize_pixels(torch.from_numpy(transform(data))[None], transform.mean, transform.std)[0]


@pytest.mark.parametrize("resample", [3, 2], ids=["bicubic", "bilinear"])
@pytest.mark.parametrize("ratio", ["crop", "pad"])
@pytest.mark.parametrize("size", [(160, 120), (90, 130), (30, 20)], ids=["5x-larger", "portrait", "upscaled"])
def test_transform_matches_the_processor(ratio, resample, size):
    """5x larger than the target is where a reduced-scale (draft) JPEG decode kicked in and differed by ~20 levels."""
    from transformers import CLIPImageProcessor

    clip = CLIPImageProcessor(
        size={"shortest_edge": 24}, crop_size={"height": 24, "width": 24}, resample=resample
    )
    processor = with_aspect_ratio(clip, ratio)
    transform = ImageTransform.from_processor(processor)
    assert transform.pad == (ratio == "pad") and transform.resample == resample
    data = detailed_jpeg(*size)
    got, want = ours(transform, data), processor_pixels(processor, data)
    assert got.shape == want.shape == (3, 24, 24)
    assert (got - want).abs().max() < TOLERANCE


def test_non_square_crop_and_crop_larger_than_the_image():
    from transformers import CLIPImageProcessor

    data = detailed_jpeg(70, 40, seed=1)
    for crop in ({"height": 20, "width": 28}, {"height": 30, "width": 30}):  # 30 > 24 x 40/70: zero bands
        processor = CLIPImageProcessor(size={"shortest_edge": 24}, crop_size=crop)
        transform = ImageTransform.from_processor(processor)
        got = torch.from_numpy(transform(data))
        assert got.shape == (3, crop["height"], crop["width"]) and got.is_contiguous()
        assert (
            normalize_pixels(got[None], transform.mean, transform.std)[0] - processor_pixels(processor, data)
        ).abs().max() < TOLERANCE


def test_other_filters_fall_back_to_pil():
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor(
        size={"shortest_edge": 24}, crop_size={"height": 24, "width": 24}, resample=1
    )
    transform = ImageTransform.from_processor(processor)  # 1 = Lanczos: no torch equivalent
    data = detailed_jpeg(50, 40)
    assert (ours(transform, data) - processor_pixels(processor, data)).abs().max() < TOLERANCE


def test_normalize_pixels_is_the_former_collate_formula_bit_for_bit():
    transform = ImageTransform()
    pixels = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 3, 5, 7), dtype=np.uint8))
    mean = torch.tensor(transform.mean).view(1, 3, 1, 1) * 255.0
    inv_std = 1.0 / (torch.tensor(transform.std).view(1, 3, 1, 1) * 255.0)
    got = normalize_pixels(pixels, transform.mean, transform.std)
    assert got.dtype == torch.float32 and torch.equal(got, (pixels.float() - mean) * inv_std)


def test_model_normalises_uint8_pixels_as_the_processor_would():
    """The loader's uint8 batch through the model = the same pixels normalised before (exactly),
    and ~ the image processor's float pixels (within the transform's rounding)."""
    from tests._student import SAMPLES, make_batch, tiny_model

    model = tiny_model(seed=2)
    model.eval()
    transform = ImageTransform.from_processor(model.image_processor)
    side = transform.crop[0]
    images = [detailed_jpeg(3 * side + 7 * i, 2 * side + 5, seed=i) for i in range(len(SAMPLES))]
    batch = make_batch(model, SAMPLES)
    uint8 = torch.from_numpy(np.stack([transform(data) for data in images]))
    float_before = normalize_pixels(uint8, transform.mean, transform.std)
    processor = torch.stack([processor_pixels(model.image_processor, data) for data in images])
    assert (float_before - processor).abs().max() < TOLERANCE

    def logits(pixels):
        with torch.no_grad():
            return model.logits(batch["input_ids"], batch["attention_mask"], pixels)

    from_uint8 = logits(uint8)
    assert torch.equal(from_uint8, logits(float_before))
    torch.testing.assert_close(from_uint8, logits(processor), atol=0.05, rtol=0.05)
    assert not torch.allclose(
        from_uint8, logits(uint8.float()), atol=0.05, rtol=0.05
    )  # un-normalised differs
    model.image_processor = None
    with pytest.raises(ValueError, match="image processor"):
        logits(uint8)


def test_bench_decode_ranks_the_decoders_against_the_processor():
    from olavlm.bench.images import bench_decode

    result = bench_decode(repeats=1, only=("cat 451x300", "retina 1411x1411"))
    rows = {(r["mode"], r["decoder"], r["image"]): r for r in result["rows"]}
    images = {r["image"] for r in result["rows"]}
    assert images == {"cat 451x300", "retina 1411x1411"} and all(r["ms"] > 0 for r in rows.values())
    for image in images:  # what the data path uses stays within the tests' tolerance, in both modes
        assert rows["crop", "PIL decode + torch resize (ImageTransform)", image]["max_diff"] < TOLERANCE
        assert (
            rows["pad", "PIL decode + numpy pad + torch resize (ImageTransform pad)", image]["max_diff"]
            < TOLERANCE
        )
    # the reduced-scale decode it replaced does not, on a detailed photo much larger than 336
    assert (
        rows["crop", "PIL draft(336) + PIL resize (former ImageTransform)", "retina 1411x1411"]["max_diff"]
        > TOLERANCE
    )


@pytest.mark.parametrize("height,width", [(37, 50), (50, 37), (7, 4), (3, 8), (6, 6)])
def test_pad_to_square_is_llavas_expand2square(height, width):
    from olavlm.trainer.data.images import pad_to_square

    pixels = np.random.default_rng(height * width).integers(0, 256, (height, width, 3), dtype=np.uint8)
    background = (122, 116, 104)
    side = max(height, width)
    want = Image.new("RGB", (side, side), background)  # LLaVA's expand2square, as written there
    want.paste(Image.fromarray(pixels), ((side - width) // 2, (side - height) // 2))
    np.testing.assert_array_equal(pad_to_square(pixels, background), np.asarray(want))
