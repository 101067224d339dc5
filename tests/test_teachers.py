"""Teachers: each target equals a hand computation from the model's raw outputs.

The full-size paper architectures (target shapes, input sizes, comparisons with an independent
computation through `ola precompute`) live in test_teacher_reference.py (slow).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from olavlm.bench.gpu import paper_configs
from olavlm.pipeline import preprocess
from olavlm.pipeline.presets import RANDOM_PRESETS, preset_sources, random_configs, with_overrides
from olavlm.pipeline.sources import TeacherSource
from olavlm.pipeline.teachers import load_teacher
from tests._precompute_data import jpeg, photo


@pytest.fixture(scope="module")
def tiny():
    return preset_sources("tiny")


def batch_for(teacher, count: int = 3) -> torch.Tensor:
    """Real photos through the teacher's own CPU preprocessing: uint8 (B, H, W, 3)."""
    arrays = [preprocess.prepare(photo(i), teacher.spec.preprocess) for i in range(count)]
    return torch.from_numpy(np.stack(arrays))


def normalised(images: torch.Tensor, mean, std) -> torch.Tensor:
    """The normalisation written out by hand, float32 NCHW."""
    x = images.permute(0, 3, 1, 2).float() / 255.0
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


@pytest.mark.timeout(120)
def test_depth_target_is_mean_of_normed_hidden_states(tiny):
    from transformers import DepthAnythingForDepthEstimation

    teacher = load_teacher(tiny["depth"])
    images = batch_for(teacher)
    model = DepthAnythingForDepthEstimation.from_pretrained(tiny["depth"].model).eval()
    with torch.no_grad():
        pixels = normalised(images, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
        hidden = model(
            pixel_values=pixels, output_hidden_states=True
        ).hidden_states  # embeddings + each block
        norm = model.backbone.layernorm
        out_indices = model.config.backbone_config.out_indices
        reference = torch.stack([norm(hidden[i]) for i in out_indices]).mean(0)[:, 1:]  # CLS dropped
    assert teacher.spec.layers == tuple(out_indices)
    assert teacher.spec.shape == (64, 32) and reference.shape == (3, 64, 32)
    torch.testing.assert_close(teacher(images), reference, rtol=1e-5, atol=1e-5)


@pytest.mark.timeout(120)
def test_seg_target_is_stage4_of_the_full_model_for_any_task(tiny):
    from transformers import OneFormerForUniversalSegmentation

    teacher = load_teacher(tiny["seg"])
    images = batch_for(teacher, 2)
    model = OneFormerForUniversalSegmentation.from_pretrained(tiny["seg"].model).eval()
    pixels = normalised(images, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    stage4 = []
    for task_token in (
        3,
        7,
    ):  # two different task inputs ("panoptic", "semantic", ...): same backbone features
        task_inputs = torch.full((2, model.config.task_seq_len), task_token, dtype=torch.long)
        with torch.no_grad():
            out = model(pixel_values=pixels, task_inputs=task_inputs, output_hidden_states=True)
        stage4.append(out.encoder_hidden_states[-1])
    torch.testing.assert_close(stage4[0], stage4[1], rtol=0, atol=0)
    with torch.no_grad():
        level = model.model.pixel_level_module(pixels).encoder_features[-1]  # [B, C4, 5, 5] at 160 px
    torch.testing.assert_close(level, stage4[0])
    grid = teacher.spec.preprocess["grid"]
    reference = (
        F.interpolate(level, size=(grid, grid), mode="bilinear", align_corners=False)
        .flatten(2)
        .transpose(1, 2)
    )
    # 160 squash -> the processor's 167 (800/768 scaled) -> Swin stage 4 of 6 x 6 -> 4 x 4
    assert images.shape[1:3] == (167, 167) and level.shape[-2:] == (6, 6)
    assert teacher.spec.shape == (16, 128) == tuple(reference.shape[1:])
    torch.testing.assert_close(teacher(images), reference, rtol=1e-5, atol=1e-5)


@pytest.mark.timeout(120)
def test_seg_pixels_equal_the_oneformer_processor_on_the_squash(tiny):
    """768-style squash (PIL bicubic), then the checkpoint's OneFormerImageProcessor: bit-identical pixels."""
    import json

    from transformers.models.oneformer.image_processing_pil_oneformer import OneFormerImageProcessorPil

    teacher = load_teacher(tiny["seg"])
    config = json.loads((Path(tiny["seg"].model) / "preprocessor_config.json").read_text())
    assert config["size"]["shortest_edge"] == 167  # the tiny squash 160 scaled like the paper's 800 / 768
    processor = OneFormerImageProcessorPil(**{k: v for k, v in config.items() if k != "image_processor_type"})
    squash = teacher.spec.preprocess["resize"]
    assert (
        teacher.spec.preprocess["resample"] == "bicubic"
        and teacher.spec.preprocess["processor"]["task"] == "panoptic"
    )
    for i in range(3):
        image = photo(i)
        reference = processor(image.resize(tuple(squash)), ["panoptic"], return_tensors="pt")
        assert reference["pixel_mask"].all()  # one square image: nothing padded
        ours = teacher.normalise(
            torch.from_numpy(preprocess.prepare(image, teacher.spec.preprocess).copy())[None]
        )
        torch.testing.assert_close(ours, reference["pixel_values"], rtol=0, atol=1e-6)


def test_seg_recipe_reads_every_processor_constant(monkeypatch):
    """Sizes, filter, rescale and mean/std of the processor file all reach the spec (and so the fingerprint)."""
    from olavlm.pipeline import teachers

    monkeypatch.setattr(teachers, "weights_sha256", lambda module: "0" * 64)  # meta tensors: nothing to hash
    from transformers import OneFormerForUniversalSegmentation

    _, seg_config, _ = random_configs(RANDOM_PRESETS["tiny"])
    with torch.device("meta"):
        model = OneFormerForUniversalSegmentation(seg_config)
    source = TeacherSource(name="seg", kind="oneformer_swin", model="x", image_size=768, grid=24)

    def spec(processor):
        return teachers.seg_teacher(source, model, processor).spec

    default = spec(None)  # no preprocessor_config.json: OneFormerImageProcessor's class defaults
    assert (
        default.preprocess["processor_resize"] == [800, 800]
        and default.preprocess["processor_resample"] == "bilinear"
    )
    assert preprocess.input_shape(default.preprocess) == (800, 800)
    hub_2022 = spec(
        {
            "size": 800,
            "max_size": 1333,
            "resample": 2,  # the 2022 hub layout of the COCO Swin-L repo
            "image_mean": [0.48500001430511475, 0.4560000002384186, 0.4059999883174896],
            "image_std": [0.2290000021457672, 0.2239999920129776, 0.22499999403953552],
        }
    )
    assert hub_2022.preprocess["processor"]["size"] == {"shortest_edge": 800, "longest_edge": 1333}
    assert hub_2022.preprocess["processor_resize"] == [800, 800]
    fingerprints = {default.fingerprint, hub_2022.fingerprint}
    for change in (
        {"size": {"shortest_edge": 640, "longest_edge": 1333}},
        {"resample": 3},
        {"rescale_factor": 1 / 256},
        {"image_std": [0.2, 0.2, 0.2]},
    ):
        fingerprints.add(spec(change).fingerprint)
    assert len(fingerprints) == 6
    # detectron2's 0-255 constants without the 1/255 rescale: the same normalisation as [0, 1] ones with it
    raw = spec(
        {"do_rescale": False, "image_mean": [123.675, 116.28, 103.53], "image_std": [58.395, 57.12, 57.375]}
    )
    np.testing.assert_allclose(raw.preprocess["mean"], (0.485, 0.456, 0.406), rtol=1e-6)
    np.testing.assert_allclose(raw.preprocess["std"], (0.229, 0.224, 0.225), rtol=1e-6)
    with pytest.raises(ValueError, match="outside the rescaled pixel range"):
        spec({"image_mean": [123.675, 116.28, 103.53], "image_std": [58.395, 57.12, 57.375]})


def test_processor_output_size_matches_transformers():
    from transformers.image_transforms import get_size_with_aspect_ratio

    rng = np.random.default_rng(0)
    for _ in range(500):
        height, width, shortest = (int(v) for v in rng.integers(8, 3000, 3))
        longest = int(rng.integers(shortest + 1, 4000)) if rng.random() < 0.7 else None
        size = {"shortest_edge": shortest, **({"longest_edge": longest} if longest else {})}
        assert preprocess.processor_output_size(height, width, size) == get_size_with_aspect_ratio(
            (height, width), shortest, longest
        )
    assert preprocess.processor_output_size(768, 768, {"shortest_edge": 800, "longest_edge": 1333}) == (
        800,
        800,
    )
    assert preprocess.processor_output_size(10, 20, {"height": 5, "width": 7}) == (5, 7)


@pytest.mark.timeout(120)
def test_pickle_only_weights_are_refused_naming_the_folder(tmp_path, tiny):
    import shutil

    from safetensors.torch import load_file

    folder = tmp_path / "seg"
    shutil.copytree(tiny["seg"].model, folder)
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    source = TeacherSource(name="seg", kind="oneformer_swin", model=str(folder), image_size=160, grid=4)
    with pytest.raises(
        OSError, match=r"no safetensors weights \(only pytorch_model.bin\).*safe formats only"
    ) as error:
        load_teacher(source)
    assert str(folder) in str(error.value)


def test_paper_preset_pins_revisions_that_hold_safetensors():
    from olavlm.pipeline.presets import PAPER, PAPER_REVISIONS

    for name in ("seg", "gen"):
        assert len(PAPER[name].revision) == 40 and int(PAPER[name].revision, 16) >= 0
    assert (
        PAPER["seg"].revision == "3a79bee4670e109b164c020beb56678a8ba26e2f"
    )  # the safetensors conversion commit
    assert PAPER_REVISIONS["depth"] == ""  # no full sha in the offline material: unpinned, not invented
    overridden = with_overrides(dict(PAPER), {"seg": "/some/folder"})
    assert overridden["seg"].revision == ""  # other weights: their identity is the weights hash


@pytest.mark.timeout(120)
def test_spec_provenance_names_revision_and_weights_hash(tiny):
    import dataclasses

    spec = load_teacher(tiny["gen"]).spec
    line = spec.provenance()
    assert spec.weights_sha256 in line and "unpinned" in line and line.startswith(tiny["gen"].model)
    pinned = dataclasses.replace(spec, revision="e" * 40)
    assert ("e" * 40) in pinned.provenance() and pinned.fingerprint != spec.fingerprint


def test_cache_of_another_format_version_is_refused(tmp_path):
    import json

    from olavlm.schemas.cache import CacheError, TargetCache

    (tmp_path / "cache.json").write_text(
        json.dumps({"format": "olavlm-target-cache", "format_version": 1, "teachers": {}, "created": 0})
    )
    with pytest.raises(
        CacheError,
        match=r"format version 1 is not supported \(this olavlm reads version 2 only\): recompute it",
    ):
        TargetCache(tmp_path).metadata()


@pytest.mark.timeout(120)
def test_gen_target_is_image_embeds_through_the_clip_processor(tiny):
    from transformers import CLIPImageProcessorPil, CLIPVisionModelWithProjection

    teacher = load_teacher(tiny["gen"])
    images = [photo(i) for i in range(3)]
    processor = CLIPImageProcessorPil.from_pretrained(tiny["gen"].model, subfolder="feature_extractor")
    model = CLIPVisionModelWithProjection.from_pretrained(tiny["gen"].model, subfolder="image_encoder").eval()
    with torch.no_grad():
        reference = model(pixel_values=processor(images, return_tensors="pt").pixel_values).image_embeds[
            :, None
        ]
    ours = teacher(
        torch.from_numpy(np.stack([preprocess.prepare(im, teacher.spec.preprocess) for im in images]))
    )
    assert teacher.spec.shape == (1, 32) and ours.shape == (3, 1, 32)
    # the processor resizes in float, we in uint8: equal up to that rounding
    cosine = F.cosine_similarity(ours.flatten(1), reference.flatten(1))
    assert cosine.min() > 0.999, cosine


def test_preprocess_geometry():
    squash = {"resize": [336, 336], "resample": "bicubic"}
    clip = {"resize_shortest": 224, "center_crop": [224, 224], "resample": "bicubic"}
    wide = Image.new("RGB", (600, 400), (10, 20, 30))
    assert preprocess.prepare(wide, squash).shape == (336, 336, 3)
    assert preprocess.prepare(wide, clip).shape == (224, 224, 3)
    assert preprocess.shortest_side_size(600, 400, 224) == (336, 224)
    assert preprocess.draft_size(squash) == 336 and preprocess.draft_size(clip) == 224


def test_prepare_all_decodes_once_per_draft_size(monkeypatch):
    calls = []
    original = preprocess.decode_image
    monkeypatch.setattr(
        preprocess,
        "decode_image",
        lambda data, draft_size: calls.append(draft_size) or original(data, draft_size),
    )
    recipes = {
        "a": {"resize": [64, 64], "resample": "bicubic", "jpeg_draft": 64},
        "b": {"resize": [32, 32], "resample": "bilinear", "jpeg_draft": 64},
        "c": {"resize_shortest": 48, "center_crop": [48, 48], "resample": "bicubic", "jpeg_draft": 48},
    }
    out = preprocess.prepare_all(jpeg(photo(0)), recipes)
    assert sorted(calls) == [48, 64]
    assert {k: v.shape for k, v in out.items()} == {"a": (64, 64, 3), "b": (32, 32, 3), "c": (48, 48, 3)}


@pytest.mark.timeout(120)
def test_spec_is_reproducible_and_names_the_weights(tiny):
    first, second = load_teacher(tiny["depth"]).spec, load_teacher(tiny["depth"]).spec
    assert first.fingerprint == second.fingerprint and len(first.weights_sha256) == 64
    other = load_teacher(preset_sources("tiny", ("gen",))["gen"]).spec
    assert other.weights_sha256 != first.weights_sha256


def test_override_keeps_the_recipe(tiny, tmp_path):
    sources = with_overrides(tiny, {"depth": str(tmp_path)})
    assert sources["depth"].model == str(tmp_path) and sources["depth"].image_size == tiny["depth"].image_size
    with pytest.raises(ValueError, match="not among"):
        with_overrides(tiny, {"normals": "x"})


def test_random_presets_are_deterministic(tmp_path):
    from safetensors.numpy import load_file

    from olavlm.pipeline.presets import save_random_teachers

    a, b = tmp_path / "a", tmp_path / "b"
    for folder in (a, b):
        save_random_teachers(RANDOM_PRESETS["tiny"], folder)
    for part in ("depth/model.safetensors", "seg/model.safetensors", "gen/image_encoder/model.safetensors"):
        left, right = load_file(a / part), load_file(b / part)
        assert left.keys() == right.keys() and all(np.array_equal(left[k], right[k]) for k in left)


def test_jpeg_helper_roundtrip():
    assert Image.open(io.BytesIO(jpeg(photo(1)))).format == "JPEG"


def test_depth_target_is_the_mean_of_the_normed_hidden_states_at_out_indices(tiny):
    """The depth target, recomputed from the backbone's `output_hidden_states` (hidden_states[0] is the
    embedding output, so out_index i is block i - 1 counted from 0: the paper's [5, 12, 18, 24] are
    blocks 4, 11, 17, 23), layer-normed, CLS dropped, averaged."""
    teacher = load_teacher(tiny["depth"])
    backbone = teacher.module
    out_indices = backbone.config.out_indices
    assert len(out_indices) == 4 and paper_configs()[0].backbone_config.out_indices == [5, 12, 18, 24]
    pixels = teacher.normalise(batch_for(teacher, 2))
    with torch.no_grad():
        got = teacher.extract(pixels)
        hidden = backbone(pixels, output_hidden_states=True).hidden_states
        want = torch.stack([backbone.layernorm(hidden[i])[:, 1:] for i in out_indices]).mean(0)
        wrong = torch.stack([backbone.layernorm(hidden[i - 1])[:, 1:] for i in out_indices]).mean(0)
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, wrong, atol=1e-3)  # one block off is a different target


def test_random_preset_configs_match_their_table():
    depth, seg, gen = random_configs(RANDOM_PRESETS["tiny"])
    assert depth.backbone_config.hidden_size == 32 and gen.projection_dim == 32
    assert seg.backbone_config.embed_dim * 8 == 128


@pytest.mark.timeout(120)
def test_empty_batch_gives_empty_targets(tiny):
    teacher = load_teacher(tiny["depth"])
    height, width = preprocess.input_shape(teacher.spec.preprocess)
    assert teacher(torch.zeros((0, height, width, 3), dtype=torch.uint8)).shape == (0, 64, 32)


def test_jpeg_draft_is_opt_in_and_recorded_in_the_spec():
    """Default: full decode (the authors' path), whose pixels equal a plain PIL decode + resize;
    --jpeg-draft records a draft size, so its cache has another fingerprint."""
    from olavlm.pipeline.config import PrecomputeConfig

    default = PrecomputeConfig(corpus="c", cache="k", preset="tiny", teachers=("depth", "gen")).sources()
    drafted = PrecomputeConfig(
        corpus="c", cache="k", preset="tiny", teachers=("depth", "gen"), jpeg_draft=True
    ).sources()
    for name in ("depth", "gen"):
        full, fast = load_teacher(default[name]).spec, load_teacher(drafted[name]).spec
        assert full.preprocess["jpeg_draft"] == 0
        assert fast.preprocess["jpeg_draft"] == preprocess.draft_size(fast.preprocess) > 0
        assert full.fingerprint != fast.fingerprint
    # A photo 4x the depth input: the default pixels are PIL's full decode + bicubic squash, exactly;
    # the draft decode's are not (the reason it is opt-in).
    recipe = load_teacher(default["depth"]).spec.preprocess
    height, width = recipe["resize"]
    data = jpeg(photo(0).convert("RGB").resize((4 * width, 4 * height), Image.BICUBIC))
    expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((width, height), Image.BICUBIC))
    assert np.array_equal(preprocess.prepare_all(data, {"depth": recipe})["depth"], expected)
    fast = load_teacher(drafted["depth"]).spec.preprocess
    assert not np.array_equal(preprocess.prepare_all(data, {"depth": fast})["depth"], expected)
