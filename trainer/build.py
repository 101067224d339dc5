"""Build, load and save an `OlaVlm` (the model file keeps only what runs in a step).

- `build_student`: a new student from a CLIP tower + a causal LM (composed into
  `LlavaForConditionalGeneration` on the meta device, then the loaded parts put
  in: no second copy, no random init), or from an existing LLaVA / olavlm folder.
- `save_student` / `load_student`: a folder of `llava/` (transformers' own
  format), `olavlm.safetensors` (task tokens, heads, logit scales), `olavlm.json`
  (config, target shapes, teacher specs, token layout), tokenizer and image
  processor. Safetensors and JSON only; written atomically.
Cost: a checkpoint always holds the full LLaVA weights (sharded, trainable-only
saving is the trainer checkpoint's job).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from olavlm.schemas.config import ModelConfig, from_dict, to_dict
from olavlm.schemas.errors import ConfigError
from olavlm.schemas.spec import TeacherSpec

from .atomic import atomic_dir
from .model import CONFIG_FILE, EXTRAS_FILE, FORMAT_VERSION, LLAVA_DIR, OlaVlm
from .tokens import TokenLayout, add_task_tokens, layout_of, ordered_tasks


def build_student(config: ModelConfig, targets: dict[str, TeacherSpec | tuple[int, int]],
                  *, dtype: torch.dtype | None = None) -> OlaVlm:
    """A new student from `config.vision_model` + `config.llm`, or from `config.llava_checkpoint`.

    `targets`: the teachers' specs (recorded in the checkpoint) or bare (T, D) shapes.
    """
    specs = {t: s for t, s in targets.items() if isinstance(s, TeacherSpec)}
    shapes = {t: tuple(s.shape) if isinstance(s, TeacherSpec) else tuple(s) for t, s in targets.items()}
    if config.llava_checkpoint:
        path = Path(config.llava_checkpoint)
        if (path / CONFIG_FILE).exists():
            model = load_student(path, dtype=dtype)
            if model.layout.tasks != ordered_tasks(config.tasks):
                raise ConfigError(f"{path}: checkpoint tasks {model.layout.tasks} != configured {config.tasks}")
            if model.shapes != {t: s for t, s in shapes.items() if t in model.shapes}:
                raise ConfigError(f"{path}: checkpoint target shapes {model.shapes} != teacher specs {shapes}")
            return model
        llava, tokenizer, image_processor = _load_llava(config.llava_checkpoint, dtype)
    else:
        if not (config.vision_model and config.llm):
            raise ConfigError("ModelConfig needs vision_model and llm, or llava_checkpoint")
        llava, tokenizer, image_processor = _compose_llava(config, dtype)
    layout = add_task_tokens(tokenizer, config.tasks, config.tokens_per_task, llava.config.image_seq_length)
    if len(tokenizer) > llava.get_input_embeddings().num_embeddings:
        llava.resize_token_embeddings(len(tokenizer))  # new rows: mean of the old ones (+ small noise)
    llava.config.image_token_id = layout.image_token_id
    return OlaVlm(llava, config=config, target_shapes=shapes, layout=layout, tokenizer=tokenizer,
                  image_processor=image_processor, teacher_specs=specs)


def load_student(path: str | Path, *, dtype: torch.dtype | None = None) -> OlaVlm:
    """Load a folder written by `save_student` (safetensors + JSON only)."""
    from safetensors.torch import load_file
    from transformers import AutoImageProcessor, AutoTokenizer, LlavaForConditionalGeneration

    path = Path(path)
    meta = json.loads((path / CONFIG_FILE).read_text())
    extras = load_file(path / EXTRAS_FILE)
    if meta.get("format") == 1:
        meta, extras = _from_format_1(meta, extras)
    if meta.get("format") != FORMAT_VERSION:
        raise ConfigError(f"{path / CONFIG_FILE}: format {meta.get('format')!r}, expected {FORMAT_VERSION}")
    config = from_dict(ModelConfig, meta["model_config"])
    specs = {t: TeacherSpec.from_dict(d) for t, d in meta.get("teacher_specs", {}).items()}
    shapes = {t: tuple(s) for t, s in meta["target_shapes"].items()}
    llava = LlavaForConditionalGeneration.from_pretrained(path / LLAVA_DIR, dtype=dtype or torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    image_processor = AutoImageProcessor.from_pretrained(path)
    layout = layout_of(tokenizer, config.tasks, config.tokens_per_task, meta["layout"]["num_image_tokens"])
    if _layout_dict(layout) != meta["layout"]:
        raise ConfigError(f"{path}: tokenizer ids {_layout_dict(layout)} != saved layout {meta['layout']}")
    model = OlaVlm(llava, config=config, target_shapes=shapes, layout=layout, tokenizer=tokenizer,
                   image_processor=image_processor, teacher_specs=specs)
    missing, unexpected = model.load_state_dict(extras, strict=False)
    missing = [k for k in missing if not k.startswith("llava.")]
    if missing or unexpected:
        raise ConfigError(f"{path / EXTRAS_FILE}: missing {missing}, unexpected {unexpected}")
    return model.to(dtype) if dtype is not None else model


def save_student(model: OlaVlm, path: str | Path) -> Path:
    """Write LLaVA weights, olavlm extras (tokens, heads, scales), JSON config, tokenizer, processor (atomically)."""
    from safetensors.torch import save_file

    with atomic_dir(path) as tmp:
        model.llava.save_pretrained(tmp / LLAVA_DIR)
        extras = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if not k.startswith("llava.")}
        save_file(extras, tmp / EXTRAS_FILE)
        meta = {
            "format": FORMAT_VERSION,
            "model_config": to_dict(model.config),
            "target_shapes": {t: list(s) for t, s in model.shapes.items()},
            "teacher_specs": {t: s.to_dict() for t, s in model.teacher_specs.items()},
            "layers": {t: list(v) for t, v in model.layers.items()},
            "layout": _layout_dict(model.layout),
        }
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
        if model.tokenizer is not None:
            model.tokenizer.save_pretrained(tmp)
        if model.image_processor is not None:
            model.image_processor.save_pretrained(tmp)
    return Path(path)


def _from_format_1(meta: dict, extras: dict) -> tuple[dict, dict]:
    """Format 1 counted layers from 0 (block k's output); the same tensors are layers k + 1 now."""
    layers = {t: [k + 1 for k in ks] for t, ks in meta["layers"].items()}
    renamed = {}
    for name, tensor in extras.items():
        head, _, rest = name.partition(".")  # "heads.depth_l7.kv_proj.weight" -> "heads", "depth_l7..."
        if head == "heads":
            key, _, tail = rest.partition(".")
            task, _, k = key.rpartition("_l")
            name = f"heads.{task}_l{int(k) + 1}.{tail}"
        renamed[name] = tensor
    model_config = {**meta["model_config"], "layers": layers}
    return {**meta, "format": FORMAT_VERSION, "model_config": model_config, "layers": layers}, renamed


def _compose_llava(config: ModelConfig, dtype):
    """LlavaForConditionalGeneration from a CLIP vision tower and a causal LM, their weights loaded as-is."""
    from transformers import (
        AutoImageProcessor,
        AutoModelForCausalLM,
        AutoTokenizer,
        CLIPVisionModel,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    dtype = dtype or torch.float32
    vision = CLIPVisionModel.from_pretrained(config.vision_model, dtype=dtype)
    llm = AutoModelForCausalLM.from_pretrained(config.llm, dtype=dtype)
    vc = vision.config
    num_image_tokens = (vc.image_size // vc.patch_size) ** 2  # 'default' strategy: CLS dropped
    llava_config = LlavaConfig(
        vision_config=vc,
        text_config=llm.config,
        image_seq_length=num_image_tokens,
        vision_feature_layer=config.vision_feature_layer,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",  # mlp2x_gelu
        tie_word_embeddings=bool(getattr(llm.config, "tie_word_embeddings", False)),
    )
    # Build the shell on the meta device (no memory, no init), then put the loaded parts in.
    with torch.device("meta"):
        llava = LlavaForConditionalGeneration(llava_config)
    llava.model.vision_tower = vision
    llava.model.language_model = getattr(llm, llm.base_model_prefix)
    llava.lm_head = llm.lm_head
    llava.model.multi_modal_projector = LlavaMultiModalProjector(llava_config).to(dtype)
    llava.generation_config = llm.generation_config
    leftover = [n for n, p in llava.named_parameters() if p.is_meta]
    if leftover:
        raise RuntimeError(f"parameters left on the meta device: {leftover[:5]}")
    tokenizer = AutoTokenizer.from_pretrained(config.llm)
    image_processor = AutoImageProcessor.from_pretrained(config.vision_model)
    return llava, tokenizer, image_processor


def _load_llava(path: str, dtype):
    """An existing (transformers-format) LLaVA checkpoint with its processor."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    llava = LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype or torch.float32)
    if llava.config.vision_feature_select_strategy != "default":
        raise ConfigError(f"{path}: vision_feature_select_strategy must be 'default' (CLS dropped)")
    processor = AutoProcessor.from_pretrained(path)
    return llava, processor.tokenizer, processor.image_processor


def _layout_dict(layout: TokenLayout) -> dict:
    return {
        "image_token_id": layout.image_token_id,
        "num_image_tokens": layout.num_image_tokens,
        "task_token_ids": {t: list(ids) for t, ids in layout.task_token_ids.items()},
        "pad_token_id": layout.pad_token_id,
    }
