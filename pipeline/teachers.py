"""The three frozen teachers (docs/METHOD.md), and the one target each computes per image.

| kind              | class (transformers)              | target                                              |
|-------------------|-----------------------------------|-----------------------------------------------------|
| depth_anything    | DepthAnythingForDepthEstimation   | mean of the layer-normed backbone outputs at the    |
|                   |                                   | config's out_indices, CLS dropped: (h*w, C)         |
| oneformer_swin    | OneFormerForUniversalSegmentation | Swin stage-4 map, bilinear to grid x grid: (g*g, C4)|
| clip_image_embeds | CLIPVisionModelWithProjection     | image_embeds: (1, projection_dim)                   |

Inputs follow the authors' released code (docs/FIDELITY.md); every constant that changes the pixels
goes into `TeacherSpec.preprocess`, so another processor config gives another fingerprint.
Design choice: each teacher keeps only the sub-module its target needs (backbone, Swin encoder,
vision tower); heads, decoders and OneFormer's text encoder are dropped after loading. Cost: the full
model is still read once from disk, `from_pretrained` being the one loading path. Weights load from
safetensors only; a pickle-only repository is refused, never unpickled.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from olavlm.schemas.spec import TeacherSpec

from .config import COMPILE_MODES
from .preprocess import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    PIL_RESAMPLE_NAMES,
    check_device_resample,
    draft_size,
    processor_output_size,
)
from .sources import TeacherLoadError, TeacherSource, unloadable
from .swin_attention import use_fused_window_attention

PAPER_DEPTH_SIZE = 336
"""Depth input side: 336 px squashed gives 24 x 24 patches of 14, the student's grid."""
PAPER_SEG_SIZE = 768
"""Seg squash side (the authors' `img.resize((768, 768))`), before the OneFormer processor's own resize."""
SEG_SQUASH_RESAMPLE = "bicubic"
"""PIL's default filter for `Image.resize` on RGB images (Pillow >= 7), which the authors' squash uses."""
PAPER_GRID = 24
"""Seg target grid: 24 x 24 = 576 tokens, one per student image token."""
ONEFORMER_PROCESSOR_DEFAULTS: dict[str, Any] = {
    "do_resize": True,
    "size": {"shortest_edge": 800, "longest_edge": 1333},
    "resample": 2,
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": list(IMAGENET_MEAN),
    "image_std": list(IMAGENET_STD),
}
"""`OneFormerImageProcessor`'s class defaults (transformers 4.x and 5.x): what a key missing from the file means."""


def weights_sha256(module: nn.Module) -> str:
    """sha256 over (name, dtype, shape, bytes) of every state-dict entry, in key order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def read_processor_config(model: str, subfolder: str, revision: str) -> dict[str, Any]:
    """The `preprocessor_config.json` of a hub repo or folder, {} when there is none (never a pickle)."""
    from transformers.utils import cached_file

    path = cached_file(
        model,
        "preprocessor_config.json",
        subfolder=subfolder,
        revision=revision or None,
        _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False,
    )
    if path is None:
        return {}
    with open(path) as f:
        return json.load(f)


def processor_size(processor: dict[str, Any]) -> dict[str, int]:
    """A processor's `size` as a dict; the 2022 hub layout (`"size": 800, "max_size": 1333`) included."""
    size = processor["size"]
    if isinstance(size, dict):
        return {k: int(v) for k, v in size.items() if v is not None}
    longest = processor.get("max_size", processor.get("_max_size"))
    return {"shortest_edge": int(size), **({"longest_edge": int(longest)} if longest else {})}


def unit_scale_normalisation(processor: dict[str, Any], where: str) -> tuple[list[float], list[float]]:
    """The processor's `(x * rescale - mean) / std` rewritten as `(x / 255 - m) / s` (what `Teacher.normalise` runs).

    With f = rescale_factor (1 when do_rescale is off): m = mean / (255 f), s = std / (255 f);
    without do_normalize, m = 0 and s = 1 / (255 f). A mean outside the rescaled pixel range
    [0, 255 f] (detectron2's 0-255 constants in a processor that rescales to [0, 1] first)
    would normalise every pixel to about -2: refused, naming the file, rather than followed.
    """
    factor = float(processor["rescale_factor"]) if processor["do_rescale"] else 1.0
    if not processor["do_normalize"]:
        return [0.0] * 3, [1.0 / (255.0 * factor)] * 3
    mean = [float(v) for v in processor["image_mean"]]
    std = [float(v) for v in processor["image_std"]]
    if max(mean) > 255.0 * factor:
        raise ValueError(
            f"{where}: image_mean {mean} lies outside the rescaled pixel range [0, {255.0 * factor:g}] "
            f"(do_rescale {processor['do_rescale']}, rescale_factor {factor}): every normalised pixel would be about "
            f"{-mean[0] / std[0]:.2f}. Fix the preprocessor_config.json (means on the [0, 1] scale, or do_rescale false)."
        )
    return [m / (255.0 * factor) for m in mean], [d / (255.0 * factor) for d in std]


class Teacher(nn.Module):
    """A frozen teacher: uint8 images (B, H, W, 3) on its device -> float32 targets (B, T, D)."""

    def __init__(self, spec: TeacherSpec, module: nn.Module):
        super().__init__()
        self.spec = spec
        self.module = module.eval().requires_grad_(False)
        mean = torch.tensor(spec.preprocess["mean"], dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(spec.preprocess["std"], dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)
        self.compiled = None
        """`use_compiled`'s function of uint8 images on the device; None = eager."""
        self.static_batch = 0
        """Compiled: the largest batch seen; shorter batches are padded to it (one graph per job)."""

    @property
    def compute_dtype(self) -> torch.dtype:
        return next(self.module.parameters()).dtype

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, 3) RGB -> normalised (B, 3, H, W) in the compute dtype."""
        x = images.to(self.mean.device, non_blocking=True).permute(0, 3, 1, 2).float() / 255.0
        return ((x - self.mean) / self.std).to(self.compute_dtype)

    def targets(self, images: torch.Tensor) -> torch.Tensor:
        return self.extract(self.normalise(images)).float()

    def use_compiled(self, mode: str = "default", backend: str = "inductor") -> None:
        """`torch.compile` normalisation + extraction at this teacher's one input shape (dynamic=False).

        A short batch (a shard's last) is padded with black images to the largest batch seen and its
        rows sliced off, so a job runs one graph (and one CUDA graph with mode reduce-overhead).
        Cost: the compile time at the first batch, and the padded rows' compute once per shard.
        """
        options = {} if mode == "default" else {"mode": mode}
        self.compiled = torch.compile(self.targets, backend=backend, dynamic=False, **options)

    def _compute(self, images: torch.Tensor) -> torch.Tensor:
        if self.compiled is None:
            return self.targets(images)
        count = images.shape[0]
        self.static_batch = max(self.static_batch, count)
        # always a fresh (inference-mode) tensor of one shape: the graph's guards then hold for every batch
        padded = torch.zeros(
            (self.static_batch, *images.shape[1:]), dtype=images.dtype, device=self.mean.device
        )
        padded[:count].copy_(images, non_blocking=True)
        return self.compiled(padded)[:count].clone()  # CUDA graphs reuse their output memory

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if not len(images):  # a shard's last batch may carry only errors; attention cannot reshape 0 rows
            return torch.zeros((0, *self.spec.shape), device=self.mean.device)
        targets = self._compute(images)
        expected = (images.shape[0], *self.spec.shape)
        if tuple(targets.shape) != expected:
            raise RuntimeError(
                f"teacher {self.spec.name!r}: target shape {tuple(targets.shape)}, spec says {expected}"
            )
        return targets

    def extract(self, pixel_values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class DepthAnythingTeacher(Teacher):
    """DINOv2 backbone of Depth Anything: mean of the normed maps at out_indices, CLS dropped."""

    def extract(self, pixel_values: torch.Tensor) -> torch.Tensor:
        maps = self.module(pixel_values).feature_maps  # 4 x [B, 1+T, C] (or [B, C, h, w] if reshaped)
        maps = [m.flatten(2).transpose(1, 2) if m.dim() == 4 else m[:, 1:] for m in maps]  # [B, T, C] each
        return torch.stack([m.float() for m in maps]).mean(0)  # [B, T, C]


class OneFormerSwinTeacher(Teacher):
    """Swin backbone of OneFormer: the last stage's map, bilinear to grid x grid, flattened."""

    def extract(self, pixel_values: torch.Tensor) -> torch.Tensor:
        stage = self.module(pixel_values).feature_maps[self.stage_index].float()  # [B, C, h, w]
        grid = self.spec.preprocess["grid"]
        if stage.shape[-2:] != (grid, grid):
            stage = F.interpolate(stage, size=(grid, grid), mode="bilinear", align_corners=False)
        return stage.flatten(2).transpose(1, 2)  # [B, grid*grid, C]

    @property
    def stage_index(self) -> int:
        return list(self.module.out_features).index(self.module.stage_names[-1])


class ClipImageEmbedsTeacher(Teacher):
    """CLIP vision tower with projection: image_embeds as one token."""

    def extract(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.module(pixel_values=pixel_values).image_embeds.unsqueeze(1)  # [B, 1, D]


def _spec(source: TeacherSource, module: nn.Module, preprocess: dict, layers, shape) -> TeacherSpec:
    # 0 = full decode, the authors' path; a draft size only when the user traded fidelity for speed
    preprocess = {
        **preprocess,
        "channel_order": "RGB",
        "jpeg_draft": draft_size(preprocess) if source.jpeg_draft else 0,
    }
    if (
        source.device_resize
    ):  # only when chosen: default specs, and the caches they fingerprint, stay as they were
        check_device_resample(source.name, preprocess)
        preprocess["resize_on"] = "device"
    return TeacherSpec(
        **source.origin(),
        weights_sha256=weights_sha256(module),
        preprocess=preprocess,
        layers=tuple(int(v) for v in layers),
        shape=tuple(int(v) for v in shape),
    )


def depth_teacher(source: TeacherSource, model: nn.Module) -> DepthAnythingTeacher:
    backbone = model.backbone
    config = backbone.config
    if not config.apply_layernorm:
        raise ValueError(
            f"{source.model}: the depth target is defined on layer-normed maps (apply_layernorm=False)"
        )
    size = source.image_size or PAPER_DEPTH_SIZE
    patch = config.patch_size
    if size % patch:
        raise ValueError(
            f"teacher {source.name!r}: input {size} px is not a multiple of the patch size {patch}"
        )
    preprocess = {
        "resize": [size, size],
        "resample": "bicubic",
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
    }
    shape = ((size // patch) ** 2, config.hidden_size)
    return DepthAnythingTeacher(_spec(source, backbone, preprocess, config.out_indices, shape), backbone)


def seg_teacher(
    source: TeacherSource, model: nn.Module, processor: dict | None = None
) -> OneFormerSwinTeacher:
    """The Swin encoder of `model`, fed as the authors feed it: squash, then the checkpoint's OneFormer processor.

    `processor` is the checkpoint's `preprocessor_config.json` (None or {}: the processor's class defaults).
    """
    encoder = getattr(model, "model", model).pixel_level_module.encoder
    if encoder.stage_names[-1] not in encoder.out_features:
        raise ValueError(
            f"{source.model}: the Swin backbone does not output its last stage {encoder.stage_names[-1]}"
        )
    config = {**ONEFORMER_PROCESSOR_DEFAULTS, **(processor or {})}
    squash, grid = source.image_size or PAPER_SEG_SIZE, source.grid or PAPER_GRID
    size = processor_size(config)
    resize = processor_output_size(squash, squash, size) if config["do_resize"] else (squash, squash)
    resample = int(config["resample"])
    if resample not in PIL_RESAMPLE_NAMES:
        raise ValueError(
            f"{source.model}: preprocessor_config.json resample {resample} is not a PIL filter code"
        )
    mean, std = unit_scale_normalisation(config, f"{source.model}/preprocessor_config.json")
    preprocess = {
        "resize": [squash, squash],
        "resample": SEG_SQUASH_RESAMPLE,
        "processor_resize": list(resize),
        "processor_resample": PIL_RESAMPLE_NAMES[resample],
        "mean": mean,
        "std": std,
        "processor": {  # the constants as the checkpoint states them; mean/std above are what runs
            "class": "OneFormerImageProcessor",
            "task": "panoptic",
            "do_resize": bool(config["do_resize"]),
            "size": size,
            "resample": resample,
            "do_rescale": bool(config["do_rescale"]),
            "rescale_factor": float(config["rescale_factor"]),
            "do_normalize": bool(config["do_normalize"]),
            "image_mean": [float(v) for v in config["image_mean"]],
            "image_std": [float(v) for v in config["image_std"]],
        },
        "grid": grid,
        "interpolation": "bilinear, align_corners=False",
    }
    shape = (grid * grid, encoder.num_features[-1])
    return OneFormerSwinTeacher(
        _spec(source, encoder, preprocess, (len(encoder.stage_names) - 1,), shape), encoder
    )


def _side(value: Any, key: str) -> int:
    return int(value[key]) if isinstance(value, dict) else int(value)


def gen_teacher(
    source: TeacherSource, model: nn.Module, processor: dict | None = None
) -> ClipImageEmbedsTeacher:
    processor = processor or {}
    crop = processor.get("crop_size", model.config.image_size)
    crop_h, crop_w = (
        (_side(crop, "height"), _side(crop, "width")) if isinstance(crop, dict) else (int(crop),) * 2
    )
    size = processor.get("size", crop_h)
    preprocess = {
        "resize_shortest": _side(size, "shortest_edge"),
        "center_crop": [crop_h, crop_w],
        "resample": PIL_RESAMPLE_NAMES.get(processor.get("resample", 3), "bicubic"),
        "mean": [float(v) for v in processor.get("image_mean", CLIP_MEAN)],
        "std": [float(v) for v in processor.get("image_std", CLIP_STD)],
    }
    shape = (1, model.config.projection_dim)
    return ClipImageEmbedsTeacher(_spec(source, model, preprocess, (), shape), model)


def _pickle_only_message(source: TeacherSource, error: Exception) -> str | None:
    """A clear refusal when the weights exist only as a pickle; None when the failure is something else."""
    folder = os.path.join(source.model, source.subfolder)
    where = (
        folder
        if os.path.isdir(source.model)
        else f"{folder} at revision {source.revision or '(default branch)'}"
    )
    pickled = [
        n
        for n in ("pytorch_model.bin", "pytorch_model.bin.index.json")
        if os.path.exists(os.path.join(folder, n))
    ]
    text = str(error)
    if not pickled and "safetensors" not in text and ".bin" not in text:
        return None
    return (
        f"teacher {source.name!r}: {where} has no safetensors weights"
        f"{' (only ' + ', '.join(pickled) + ')' if pickled else ''}. olavlm reads safe formats only and never "
        "unpickles weights. Pin a revision that holds model.safetensors (the paper preset pins one per hub "
        "repository; shi-labs/oneformer_coco_swin_large gained it in the safetensors-conversion commit "
        "3a79bee4670e109b164c020beb56678a8ba26e2f), or convert the folder yourself once, e.g. "
        "`Model.from_pretrained(DIR, use_safetensors=False).save_pretrained(OUT)` after checking where the file came from."
    )


def _from_pretrained(cls, source: TeacherSource):
    """`cls.from_pretrained` of the source, safetensors only, with a refusal that names the repository."""
    try:
        return cls.from_pretrained(
            source.model, subfolder=source.subfolder, revision=source.revision or None, use_safetensors=True
        )
    except OSError as error:  # no hub access, unknown id or revision, gated: one line, not a traceback
        message = _pickle_only_message(source, error)
        if message is None:
            raise unloadable(source, error) from None
        raise TeacherLoadError(message) from None


def load_teacher(
    source: TeacherSource,
    *,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    swin_attention: str = "auto",
    compile: str = "off",
    compile_backend: str = "inductor",
) -> Teacher:
    """`from_pretrained` (safetensors only) -> the teacher on `device`; half precision on GPU by default.

    `swin_attention` and `compile` are the speed levers of `speed_up` (PrecomputeConfig's fields)."""
    import transformers

    transformers.utils.logging.disable_progress_bar()  # one bar per teacher and actor is noise
    if source.kind == "depth_anything":
        model = _from_pretrained(transformers.DepthAnythingForDepthEstimation, source)
        teacher = depth_teacher(source, model)
    elif source.kind == "oneformer_swin":
        model = _from_pretrained(transformers.OneFormerForUniversalSegmentation, source)
        teacher = seg_teacher(
            source, model, read_processor_config(source.model, source.subfolder, source.revision)
        )
    else:
        model = _from_pretrained(transformers.CLIPVisionModelWithProjection, source)
        # the unCLIP layout keeps the CLIP processor beside the encoder, in feature_extractor/
        processor_folder = "feature_extractor" if source.subfolder else ""
        teacher = gen_teacher(
            source, model, read_processor_config(source.model, processor_folder, source.revision)
        )
    del model  # drops the parts the target does not need (depth head, pixel decoder, text encoder)
    if dtype is None:
        dtype = torch.float16 if device.startswith("cuda") else torch.float32
    teacher.module.to(dtype=dtype)  # mean/std stay float32: normalisation happens before the cast
    return speed_up(teacher.to(device=device), swin_attention, compile, compile_backend)


def speed_up(teacher: Teacher, swin_attention: str = "auto", compile: str = "off", backend: str = "inductor"):
    """Levers that keep the targets (to float rounding), hence not in the spec: the seg encoder's fused
    window attention, `torch.compile` of the forward (COMPILE_MODES). -> the teacher."""
    if compile not in COMPILE_MODES:
        raise ValueError(f"--compile {compile!r} is not one of {', '.join(COMPILE_MODES)}")
    if teacher.spec.kind == "oneformer_swin":
        use_fused_window_attention(teacher.module, swin_attention, teacher.spec.model)
    if compile != "off":
        teacher.use_compiled(compile, backend)
    return teacher


def with_storage_dtype(spec: TeacherSpec, dtype: str) -> TeacherSpec:
    return dataclasses.replace(spec, dtype=dtype)
