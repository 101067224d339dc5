"""The three frozen teachers of method.md, and the one target each computes per image.

| kind              | class (transformers)                   | target                                          |
|-------------------|----------------------------------------|-------------------------------------------------|
| depth_anything    | DepthAnythingForDepthEstimation        | mean of the layer-normed backbone outputs at the |
|                   |                                        | config's out_indices, CLS dropped: (h*w, C)      |
| oneformer_swin    | OneFormerForUniversalSegmentation      | Swin stage-4 map, bilinear to grid x grid:       |
|                   |                                        | (grid*grid, C4)                                  |
| clip_image_embeds | CLIPVisionModelWithProjection          | image_embeds: (1, projection_dim)                |

Design choices and their cost:
- Each teacher keeps only the sub-module its target needs (the DINOv2 backbone,
  the Swin encoder, the CLIP vision tower); the depth head, the pixel decoder,
  the transformer decoder and OneFormer's text encoder are dropped after
  loading. Memory and compute go to the target only. Cost: the full model is
  still read once from disk, since `from_pretrained` is the one loading path.
- OneFormer's task token ("the task is panoptic") enters only the transformer
  decoder; the Swin backbone never sees it. Stage-4 features are therefore the
  same for every task, and no tokenizer or class-info file (which would need a
  download) is involved.
- Normalisation runs on the teacher's device from uint8 input (see
  preprocess.py); compute is float32 on CPU and half precision on GPU. The
  mean of the four depth maps and the seg resize are done in float32.
- `weights_sha256` hashes the kept sub-module's float32 state dict in key order
  (~1-3 s per GB), so two runs agree on a spec only if the weights agree.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from olavlm.schemas.spec import TeacherSpec

from .preprocess import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, draft_size
from .sources import TeacherSource

PAPER_DEPTH_SIZE = 336
"""Depth input side: 336 px squashed gives 24 x 24 patches of 14, the student's grid."""
PAPER_SEG_SIZE = 768
"""Seg input side: stage 4 of Swin (stride 32) is then exactly 24 x 24."""
PAPER_GRID = 24
"""Seg target grid: 24 x 24 = 576 tokens, one per student image token."""
PIL_RESAMPLE_NAMES = {2: "bilinear", 3: "bicubic"}


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
        model, "preprocessor_config.json", subfolder=subfolder, revision=revision or None,
        _raise_exceptions_for_missing_entries=False, _raise_exceptions_for_connection_errors=False,
    )
    if path is None:
        return {}
    with open(path) as f:
        return json.load(f)


def _unit_scale(values: list[float]) -> list[float]:
    """Processor mean/std given on the 0-255 scale (detectron2 style) -> the [0, 1] scale."""
    return [v / 255.0 for v in values] if max(values) > 1.0 else [float(v) for v in values]


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

    @property
    def compute_dtype(self) -> torch.dtype:
        return next(self.module.parameters()).dtype

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, 3) RGB -> normalised (B, 3, H, W) in the compute dtype."""
        x = images.to(self.mean.device, non_blocking=True).permute(0, 3, 1, 2).float() / 255.0
        return ((x - self.mean) / self.std).to(self.compute_dtype)

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if not len(images):  # a shard's last batch may carry only errors; attention cannot reshape 0 rows
            return torch.zeros((0, *self.spec.shape), device=self.mean.device)
        targets = self.extract(self.normalise(images)).float()
        expected = (images.shape[0], *self.spec.shape)
        if tuple(targets.shape) != expected:
            raise RuntimeError(f"teacher {self.spec.name!r}: target shape {tuple(targets.shape)}, spec says {expected}")
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
    preprocess = {**preprocess, "channel_order": "RGB", "jpeg_draft": draft_size(preprocess)}
    return TeacherSpec(
        name=source.name, kind=source.kind, model=source.model, subfolder=source.subfolder,
        revision=source.revision, weights_sha256=weights_sha256(module), preprocess=preprocess,
        layers=tuple(int(v) for v in layers), shape=tuple(int(v) for v in shape),
    )


def depth_teacher(source: TeacherSource, model: nn.Module) -> DepthAnythingTeacher:
    backbone = model.backbone
    config = backbone.config
    if not config.apply_layernorm:
        raise ValueError(f"{source.model}: the depth target is defined on layer-normed maps (apply_layernorm=False)")
    size = source.image_size or PAPER_DEPTH_SIZE
    patch = config.patch_size
    if size % patch:
        raise ValueError(f"teacher {source.name!r}: input {size} px is not a multiple of the patch size {patch}")
    preprocess = {"resize": [size, size], "resample": "bicubic", "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    shape = ((size // patch) ** 2, config.hidden_size)
    return DepthAnythingTeacher(_spec(source, backbone, preprocess, config.out_indices, shape), backbone)


def seg_teacher(source: TeacherSource, model: nn.Module, processor: dict | None = None) -> OneFormerSwinTeacher:
    encoder = getattr(model, "model", model).pixel_level_module.encoder
    if encoder.stage_names[-1] not in encoder.out_features:
        raise ValueError(f"{source.model}: the Swin backbone does not output its last stage {encoder.stage_names[-1]}")
    processor = processor or {}
    size, grid = source.image_size or PAPER_SEG_SIZE, source.grid or PAPER_GRID
    preprocess = {
        "resize": [size, size], "resample": PIL_RESAMPLE_NAMES.get(processor.get("resample", 2), "bilinear"),
        "mean": _unit_scale(processor.get("image_mean", list(IMAGENET_MEAN))),
        "std": _unit_scale(processor.get("image_std", list(IMAGENET_STD))),
        "grid": grid, "interpolation": "bilinear, align_corners=False",
    }
    shape = (grid * grid, encoder.num_features[-1])
    return OneFormerSwinTeacher(_spec(source, encoder, preprocess, (len(encoder.stage_names) - 1,), shape), encoder)


def _side(value: Any, key: str) -> int:
    return int(value[key]) if isinstance(value, dict) else int(value)


def gen_teacher(source: TeacherSource, model: nn.Module, processor: dict | None = None) -> ClipImageEmbedsTeacher:
    processor = processor or {}
    crop = processor.get("crop_size", model.config.image_size)
    crop_h, crop_w = (_side(crop, "height"), _side(crop, "width")) if isinstance(crop, dict) else (int(crop),) * 2
    size = processor.get("size", crop_h)
    preprocess = {
        "resize_shortest": _side(size, "shortest_edge"), "center_crop": [crop_h, crop_w],
        "resample": PIL_RESAMPLE_NAMES.get(processor.get("resample", 3), "bicubic"),
        "mean": [float(v) for v in processor.get("image_mean", CLIP_MEAN)],
        "std": [float(v) for v in processor.get("image_std", CLIP_STD)],
    }
    shape = (1, model.config.projection_dim)
    return ClipImageEmbedsTeacher(_spec(source, model, preprocess, (), shape), model)


def load_teacher(source: TeacherSource, *, device: str = "cpu", dtype: torch.dtype | None = None) -> Teacher:
    """`from_pretrained` (safetensors only) -> the teacher on `device`; half precision on GPU by default."""
    import transformers

    transformers.utils.logging.disable_progress_bar()  # one bar per teacher and actor is noise
    common = {"revision": source.revision or None, "use_safetensors": True}
    if source.kind == "depth_anything":
        model = transformers.DepthAnythingForDepthEstimation.from_pretrained(source.model, subfolder=source.subfolder, **common)
        teacher = depth_teacher(source, model)
    elif source.kind == "oneformer_swin":
        model = transformers.OneFormerForUniversalSegmentation.from_pretrained(source.model, subfolder=source.subfolder, **common)
        teacher = seg_teacher(source, model, read_processor_config(source.model, source.subfolder, source.revision))
    else:
        model = transformers.CLIPVisionModelWithProjection.from_pretrained(source.model, subfolder=source.subfolder, **common)
        # the unCLIP layout keeps the CLIP processor beside the encoder, in feature_extractor/
        processor_folder = "feature_extractor" if source.subfolder else ""
        teacher = gen_teacher(source, model, read_processor_config(source.model, processor_folder, source.revision))
    del model  # drops the parts the target does not need (depth head, pixel decoder, text encoder)
    if dtype is None:
        dtype = torch.float16 if device.startswith("cuda") else torch.float32
    teacher.module.to(dtype=dtype)  # mean/std stay float32: normalisation happens before the cast
    return teacher.to(device=device)


def with_storage_dtype(spec: TeacherSpec, dtype: str) -> TeacherSpec:
    return dataclasses.replace(spec, dtype=dtype)
