"""Teacher presets: `paper` (the checkpoints of docs/METHOD.md), `tiny` and `small` (random, offline).

| preset | depth target | seg target | gen target | use |
|--------|--------------|------------|------------|-----|
| tiny   | (64, 32)     | (16, 128)  | (1, 32)    | tests, the demo |
| small  | (256, 384)   | (144, 384) | (1, 256)   | `ola bench precompute` on CPU |
| paper  | (576, 1024)  | (576, 1536)| (1, 1024)  | the real thing (downloads from the hub once) |

Design choice: `tiny` and `small` are seeded random configs of the *same* classes as the paper's
teachers, saved with `save_pretrained` in the hub checkpoints' layout (processor configs included)
under `$OLAVLM_TEACHERS_DIR` and loaded back through `from_pretrained`, so tests exercise the real
loading path. Cost: another torch version may initialise differently, which gives a new weights
hash and so a new spec. The paper preset pins each hub repository to a commit with safetensors
weights (`PAPER_REVISIONS`); an unpinned one records revision "" and is identified by its hash.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from olavlm.schemas.errors import ConfigError

from .sources import KINDS, TeacherSource

TEACHER_NAMES = ("depth", "seg", "gen")
PRESETS = ("paper", "tiny", "small")
PRESET_VERSION = 2
"""Bump when a random preset's config changes, so old folders are not reused."""

PAPER_REVISIONS = {
    # No full commit sha of this repository was found in the material available offline
    # (only the abbreviated a09be6a of its refs/pr/1 branch): unpinned, never invented.
    "depth": "",
    # "Adding `safetensors` variant of this model" (SFconvertbot): the first commit
    # with model.safetensors; all earlier commits hold only pytorch_model.bin (a pickle).
    # Source: huggingface.co/shi-labs/oneformer_coco_swin_large/tree/3a79bee4670e109b164c020beb56678a8ba26e2f
    "seg": "3a79bee4670e109b164c020beb56678a8ba26e2f",
    # image_encoder/ holds config.json + model.safetensors (2.53 GB, fp32) + model.fp16.safetensors;
    # feature_extractor/preprocessor_config.json beside it.
    # Source: huggingface.co/stabilityai/stable-diffusion-2-1-unclip/tree/e99f66a92bdcd1b0fb0d4b6a9b81b3b37d8bea44/image_encoder
    "gen": "e99f66a92bdcd1b0fb0d4b6a9b81b3b37d8bea44",
}
"""Hub commit per paper teacher ("" = default branch); each pinned one holds safetensors weights."""

PAPER = {
    "depth": TeacherSource(
        name="depth",
        kind="depth_anything",
        model="depth-anything/Depth-Anything-V2-Large-hf",
        revision=PAPER_REVISIONS["depth"],
    ),
    "seg": TeacherSource(
        name="seg",
        kind="oneformer_swin",
        model="shi-labs/oneformer_coco_swin_large",
        revision=PAPER_REVISIONS["seg"],
    ),
    "gen": TeacherSource(
        name="gen",
        kind="clip_image_embeds",
        model="stabilityai/stable-diffusion-2-1-unclip",
        subfolder="image_encoder",
        revision=PAPER_REVISIONS["gen"],
    ),
}
KIND_OF = {name: source.kind for name, source in PAPER.items()}


@dataclass(frozen=True, kw_only=True)
class RandomPreset:
    """Sizes of a seeded random preset (same classes as the paper's teachers)."""

    depth_hidden: int
    depth_layers: int
    depth_heads: int
    depth_image: int
    """Depth input side (multiple of the patch size 14)."""
    swin_embed: int
    swin_depths: tuple[int, ...]
    swin_heads: tuple[int, ...]
    seg_image: int
    """Seg squash side (the paper's 768); the processor then resizes to round(seg_image * 800 / 768)."""
    seg_grid: int
    clip_hidden: int
    clip_layers: int
    clip_heads: int
    clip_image: int
    clip_patch: int
    clip_projection: int


RANDOM_PRESETS = {
    "tiny": RandomPreset(
        depth_hidden=32,
        depth_layers=4,
        depth_heads=2,
        depth_image=112,
        swin_embed=16,
        swin_depths=(1, 1, 1, 1),
        swin_heads=(1, 1, 2, 2),
        seg_image=160,
        seg_grid=4,
        clip_hidden=32,
        clip_layers=2,
        clip_heads=2,
        clip_image=64,
        clip_patch=16,
        clip_projection=32,
    ),
    "small": RandomPreset(
        depth_hidden=384,
        depth_layers=6,
        depth_heads=6,
        depth_image=224,
        swin_embed=48,
        swin_depths=(2, 2, 2, 2),
        swin_heads=(3, 6, 12, 24),
        seg_image=384,
        seg_grid=12,
        clip_hidden=384,
        clip_layers=6,
        clip_heads=6,
        clip_image=224,
        clip_patch=16,
        clip_projection=256,
    ),
}


def teachers_dir() -> Path:
    return Path(os.environ.get("OLAVLM_TEACHERS_DIR", Path.home() / ".cache" / "olavlm" / "teachers"))


def preset_sources(preset: str, names: tuple[str, ...] = TEACHER_NAMES) -> dict[str, TeacherSource]:
    """The sources of a preset; random presets are built on first use (offline, seeded)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown teacher preset {preset!r} (choose from {', '.join(PRESETS)})")
    unknown = [n for n in names if n not in TEACHER_NAMES]
    if unknown:
        raise ValueError(
            f"unknown teacher(s) {unknown} in preset {preset!r} (has {', '.join(TEACHER_NAMES)})"
        )
    if preset == "paper":
        return {n: PAPER[n] for n in names}
    sizes = RANDOM_PRESETS[preset]
    folder = build_random_preset(preset)
    sources = {
        "depth": TeacherSource(
            name="depth", kind="depth_anything", model=str(folder / "depth"), image_size=sizes.depth_image
        ),
        "seg": TeacherSource(
            name="seg",
            kind="oneformer_swin",
            model=str(folder / "seg"),
            image_size=sizes.seg_image,
            grid=sizes.seg_grid,
        ),
        "gen": TeacherSource(
            name="gen", kind="clip_image_embeds", model=str(folder / "gen"), subfolder="image_encoder"
        ),
    }
    return {n: sources[n] for n in names}


def with_overrides(sources: dict[str, TeacherSource], overrides: dict[str, str]) -> dict[str, TeacherSource]:
    """`--teacher depth=PATH_OR_ID`: other weights (revision cleared), the preset teacher's recipe.
    `--teacher NAME=KIND:PATH_OR_ID` adds a teacher of a known kind under a new name, at the paper's sizes."""
    import dataclasses

    out = dict(sources)
    for name, model in overrides.items():
        kind, _, rest = model.partition(":")
        if kind in KINDS and rest:
            if name in out:
                raise ConfigError(
                    f"--teacher {name}={model}: {name!r} is a preset teacher; give only PATH_OR_ID"
                )
            subfolder = (
                "image_encoder"
                if kind == "clip_image_embeds" and os.path.isdir(os.path.join(rest, "image_encoder"))
                else ""
            )
            out[name] = TeacherSource(name=name, kind=kind, model=rest, subfolder=subfolder)
            continue
        if name not in out:
            raise ConfigError(
                f"--teacher {name}=...: {name!r} is not among the selected teachers {sorted(out)}; "
                f"a new teacher needs its kind: --teacher {name}=KIND:PATH_OR_ID (KIND: {', '.join(KINDS)})"
            )
        subfolder = (
            out[name].subfolder if out[name].kind == "clip_image_embeds" and model == out[name].model else ""
        )
        if out[name].kind == "clip_image_embeds" and os.path.isdir(os.path.join(model, "image_encoder")):
            subfolder = "image_encoder"  # an unCLIP-style folder
        out[name] = dataclasses.replace(out[name], model=model, subfolder=subfolder, revision="")
    return out


def build_random_preset(preset: str, root: Path | None = None) -> Path:
    """Save the seeded random teachers of `preset` under `root`; reuse a finished folder."""
    folder = (root or teachers_dir()) / f"{preset}-v{PRESET_VERSION}"
    build_once(folder, lambda staging: save_random_teachers(RANDOM_PRESETS[preset], staging))
    return folder


def build_once(folder: Path, save: Callable[[Path], object]) -> bool:
    """`save(staging)` into a staging folder beside `folder`, marked DONE and renamed into place, unless a
    finished `folder` exists (concurrent builders never see half a folder); -> whether it was reused."""
    if (folder / "DONE").exists():
        return True
    staging = folder.with_name(f".{folder.name}.{uuid.uuid4().hex[:8]}")
    try:
        save(staging)
        (staging / "DONE").write_text("complete\n")
        folder.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(staging, folder)
        except OSError:  # another process finished first; its folder is identical
            if not (folder / "DONE").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return False


def random_configs(sizes: RandomPreset):
    """(DepthAnythingConfig, OneFormerConfig, CLIPVisionConfig) of a random preset."""
    from transformers import CLIPVisionConfig, DepthAnythingConfig, Dinov2Config, OneFormerConfig, SwinConfig

    depth_layers = sizes.depth_layers
    out_indices = sorted(
        {max(1, round(i * depth_layers / 24)) for i in (5, 12, 18, 24)}
    )  # paper's picks, scaled
    while len(out_indices) < 4:  # the neck needs four maps
        out_indices = sorted(
            set(out_indices) | {next(i for i in range(1, depth_layers + 1) if i not in out_indices)}
        )
    h = sizes.depth_hidden
    depth = DepthAnythingConfig(
        backbone_config=Dinov2Config(
            hidden_size=h,
            num_hidden_layers=depth_layers,
            num_attention_heads=sizes.depth_heads,
            intermediate_size=4 * h,
            patch_size=14,
            image_size=sizes.depth_image,
            out_indices=out_indices,
            reshape_hidden_states=False,
            layerscale_value=1.0,
        ),
        reassemble_hidden_size=h,
        patch_size=14,
        neck_hidden_sizes=[h // 2, h, h, h],
        fusion_hidden_size=max(16, h // 2),
        head_hidden_size=8,
    )
    seg = OneFormerConfig(
        backbone_config=SwinConfig(
            image_size=sizes.seg_image,
            patch_size=4,
            embed_dim=sizes.swin_embed,
            depths=list(sizes.swin_depths),
            num_heads=list(sizes.swin_heads),
            window_size=7,
            drop_path_rate=0.0,
            out_features=["stage1", "stage2", "stage3", "stage4"],
        ),
        hidden_dim=32,
        conv_dim=32,
        mask_dim=32,
        encoder_feedforward_dim=64,
        dim_feedforward=64,
        encoder_layers=1,
        decoder_layers=2,
        num_attention_heads=2,
        num_queries=8,
        query_dec_layers=1,
        text_encoder_width=32,
        text_encoder_num_layers=1,
        text_encoder_vocab_size=64,
        text_encoder_proj_layers=1,
        text_encoder_n_ctx=4,
        num_labels=4,
    )
    gen = CLIPVisionConfig(
        hidden_size=sizes.clip_hidden,
        intermediate_size=4 * sizes.clip_hidden,
        num_hidden_layers=sizes.clip_layers,
        num_attention_heads=sizes.clip_heads,
        image_size=sizes.clip_image,
        patch_size=sizes.clip_patch,
        projection_dim=sizes.clip_projection,
        hidden_act="gelu",
    )
    return depth, seg, gen


def save_random_teachers(sizes: RandomPreset, folder: Path) -> None:
    """Seeded random weights -> folder/{depth,seg,gen} in the layout of the paper's checkpoints."""
    import torch
    from transformers import (
        CLIPVisionModelWithProjection,
        DepthAnythingForDepthEstimation,
        OneFormerForUniversalSegmentation,
    )

    from .preprocess import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD

    depth_config, seg_config, gen_config = random_configs(sizes)
    for seed, (cls, config, path) in enumerate(
        [
            (DepthAnythingForDepthEstimation, depth_config, folder / "depth"),
            (OneFormerForUniversalSegmentation, seg_config, folder / "seg"),
            (CLIPVisionModelWithProjection, gen_config, folder / "gen" / "image_encoder"),
        ]
    ):
        torch.manual_seed(seed)
        cls(config).eval().save_pretrained(path, safe_serialization=True)
    # processor configs laid out as the hub checkpoints ship them; seg: the paper's 800/1333 scaled to the squash
    seg_processor = {
        "image_processor_type": "OneFormerImageProcessor",
        "do_resize": True,
        "resample": 2,
        "size": {
            "shortest_edge": round(sizes.seg_image * 800 / 768),
            "longest_edge": round(sizes.seg_image * 1333 / 768),
        },
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(IMAGENET_MEAN),
        "image_std": list(IMAGENET_STD),
    }
    clip_processor = {
        "crop_size": {"height": sizes.clip_image, "width": sizes.clip_image},
        "size": {"shortest_edge": sizes.clip_image},
        "resample": 3,
        "image_mean": list(CLIP_MEAN),
        "image_std": list(CLIP_STD),
    }
    (folder / "gen" / "feature_extractor").mkdir(parents=True)
    for path, data in (
        (folder / "seg" / "preprocessor_config.json", seg_processor),
        (folder / "gen" / "feature_extractor" / "preprocessor_config.json", clip_processor),
    ):
        path.write_text(json.dumps(data, indent=2))
