"""Section 1: the three paper teachers at full size, seeded random weights saved once in the hub layouts.

`paper_configs` is the one copy of the paper checkpoints' configs (tests/test_teachers.py and
tests/test_teacher_reference.py import it from here).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from pathlib import Path

from olavlm.bench.gpu.common import free
from olavlm.bench.gpu.config import PAPER_RANDOM_VERSION, TEACHERS


# -- 1. full-size random teachers ----------------------------------------------------------------
def paper_configs():
    """(DepthAnythingConfig, OneFormerConfig, CLIPVisionConfig) as the three paper checkpoints' config.json state them."""
    from transformers import CLIPVisionConfig, DepthAnythingConfig, Dinov2Config, OneFormerConfig, SwinConfig

    depth = DepthAnythingConfig(  # depth-anything/Depth-Anything-V2-Large-hf
        backbone_config=Dinov2Config(
            hidden_size=1024,
            num_hidden_layers=24,
            num_attention_heads=16,
            intermediate_size=4096,
            patch_size=14,
            image_size=518,
            out_indices=[5, 12, 18, 24],
            reshape_hidden_states=False,
            layerscale_value=1.0,
        ),
        reassemble_hidden_size=1024,
        patch_size=14,
        neck_hidden_sizes=[256, 512, 1024, 1024],
        fusion_hidden_size=256,
        head_hidden_size=32,
    )
    seg = OneFormerConfig(  # shi-labs/oneformer_coco_swin_large
        backbone_config=SwinConfig(
            image_size=384,
            patch_size=4,
            embed_dim=192,
            depths=[2, 2, 18, 2],
            num_heads=[6, 12, 24, 48],
            window_size=12,
            drop_path_rate=0.3,
            out_features=["stage1", "stage2", "stage3", "stage4"],
        ),
        num_labels=133,
    )
    gen = CLIPVisionConfig(  # stabilityai/stable-diffusion-2-1-unclip, image_encoder (OpenCLIP ViT-H/14)
        hidden_size=1280,
        intermediate_size=5120,
        num_hidden_layers=32,
        num_attention_heads=16,
        patch_size=14,
        image_size=224,
        projection_dim=1024,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
    )
    return depth, seg, gen


def save_paper_teachers(folder: Path, device: str) -> dict[str, int]:
    """Seeded random full-size teachers -> folder/{depth,seg,gen} in the hub layouts; -> parameters per teacher.

    Built directly on `device` (on a GPU the random init of ~1.2 B parameters takes seconds,
    on a CPU minutes), saved as float32 safetensors like the hub checkpoints.
    """
    import torch
    import transformers
    from transformers import (
        CLIPVisionModelWithProjection,
        DepthAnythingForDepthEstimation,
        OneFormerForUniversalSegmentation,
    )

    transformers.utils.logging.disable_progress_bar()
    params = {}
    for seed, (name, cls, config, path) in enumerate(
        zip(
            TEACHERS,
            (
                DepthAnythingForDepthEstimation,
                OneFormerForUniversalSegmentation,
                CLIPVisionModelWithProjection,
            ),
            paper_configs(),
            (folder / "depth", folder / "seg", folder / "gen" / "image_encoder"),
        )
    ):
        torch.manual_seed(seed)
        with torch.device(device):
            model = cls(config).eval()
        params[name] = sum(p.numel() for p in model.parameters())
        model.save_pretrained(path, safe_serialization=True)
        del model
        free(device)
    copy_processor_configs(folder)
    (folder / "params.json").write_text(json.dumps(params))
    return params


def copy_processor_configs(folder: Path) -> None:
    """The processor configs of the paper teachers, as `save_random_teachers` writes them for a preset whose
    input sizes are the paper's (seg squash 768, CLIP 224): built tiny in a scratch folder, only its JSON copied."""
    from olavlm.pipeline.presets import RANDOM_PRESETS, save_random_teachers

    sizes = dataclasses.replace(RANDOM_PRESETS["tiny"], seg_image=768, clip_image=224, seg_grid=24)
    with tempfile.TemporaryDirectory(prefix="ola-processors-") as scratch:
        save_random_teachers(sizes, Path(scratch))
        for part in ("seg/preprocessor_config.json", "gen/feature_extractor/preprocessor_config.json"):
            (folder / part).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(scratch) / part, folder / part)


def build_paper_teachers(root: Path, device: str) -> tuple[Path, dict[str, int], bool]:
    """The folder of full-size random teachers under `root` (built once, in a staging folder renamed into place).

    -> (folder, parameters per teacher, whether it was reused).
    """
    # PRESET_VERSION: the processor configs come from the presets' code
    from olavlm.pipeline.presets import PRESET_VERSION, build_once

    folder = root / f"paper-random-v{PAPER_RANDOM_VERSION}-p{PRESET_VERSION}"
    reused = build_once(folder, lambda staging: save_paper_teachers(staging, device))
    return folder, json.loads((folder / "params.json").read_text()), reused
