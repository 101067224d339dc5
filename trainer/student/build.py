"""Build, load and save an `OlaVlm` (the model file keeps only what runs in a step).

`build_student` composes a CLIP tower and a causal LM on the meta device and puts the loaded parts
in (no second copy, no random init), or starts from a LLaVA / olavlm folder. A saved folder holds
`llava/` (transformers' format), `olavlm.safetensors` (task tokens, heads, logit scales),
`olavlm.json`, tokenizer and image processor, written atomically; the trainer also writes
trainable-only folders (the trained tensors plus `frozen_base`: the base's ModelConfig and hash,
rebuilt and checked on load) and sharded ones (FSDP2's per-rank `shards/`). Design choice: the
base hash samples DIGEST_SAMPLES values per tensor, so it costs per tensor, not per byte. Cost: an
edit confined to unsampled values goes unnoticed, and the base folders must stay where they were.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import torch

from olavlm.schemas.config import ModelConfig, from_dict, to_dict
from olavlm.schemas.errors import ConfigError
from olavlm.schemas.spec import TeacherSpec
from olavlm.trainer.atomic import atomic_dir
from olavlm.trainer.student.model import OlaVlm
from olavlm.trainer.student.sharded import load_sharded, without_aliases
from olavlm.trainer.student.tokens import TokenLayout, add_task_tokens, layout_of, ordered_tasks

FORMAT_VERSION = 2
"""olavlm.json format; another is refused (no converter: no other format was released)."""
CONFIG_FILE = "olavlm.json"
EXTRAS_FILE = "olavlm.safetensors"
LLAVA_DIR = "llava"
TRAINABLE_FILE = "llava_trainable.safetensors"
"""Trainable-only folders: the LLaVA tensors that differ from the frozen base (names as llava.state_dict())."""
BASE_KEY = "frozen_base"
"""olavlm.json key of a trainable-only folder: {"source": ModelConfig dict, "hash", "digests"}."""
SHARDED_KEY = "sharded"
"""olavlm.json key of a sharded folder (FSDP2 saves): the subfolder of its shard files."""
SHARDS_DIR = "shards"
SHARD_FILES_KEY = "shard_files"
"""olavlm.json key of a sharded folder: the number of ranks that wrote it, each of whose files must be there."""
DIGEST_SAMPLES = 4096
"""Values read per tensor by the sampled frozen-base hash (see the module docstring)."""


def build_student(
    config: ModelConfig,
    targets: dict[str, TeacherSpec | tuple[int, int]],
    *,
    dtype: torch.dtype | None = None,
) -> OlaVlm:
    """A new student from `config.vision_model` + `config.llm`, or from `config.llava_checkpoint`.

    `targets`: the teachers' specs (recorded in the checkpoint) or bare (T, D) shapes.
    """
    specs = {t: s for t, s in targets.items() if isinstance(s, TeacherSpec)}
    shapes = {t: tuple(s.shape) if isinstance(s, TeacherSpec) else tuple(s) for t, s in targets.items()}
    if config.llava_checkpoint:
        path = Path(config.llava_checkpoint)
        if (path / CONFIG_FILE).exists():
            model = load_student(path, dtype=dtype)  # its frozen base: this folder, or its recorded root
            if model.layout.tasks != ordered_tasks(config.tasks):
                raise ConfigError(
                    f"{path}: checkpoint tasks {model.layout.tasks} != configured {config.tasks}"
                )
            if model.shapes != {t: s for t, s in shapes.items() if t in model.shapes}:
                raise ConfigError(
                    f"{path}: checkpoint target shapes {model.shapes} != teacher specs {shapes}"
                )
            return model
        llava, tokenizer, image_processor = _load_llava(config.llava_checkpoint, dtype)
    else:
        if not (config.vision_model and config.llm):
            raise ConfigError("ModelConfig needs vision_model and llm, or llava_checkpoint")
        llava, tokenizer, image_processor = _compose_llava(config, dtype)
    layout = add_task_tokens(tokenizer, config.tasks, config.tokens_per_task, llava.config.image_seq_length)
    if len(tokenizer) > llava.get_input_embeddings().num_embeddings:
        with torch.random.fork_rng(devices=[]):  # fixed noise: a rebuilt frozen base is the same bit for bit
            torch.manual_seed(0)
            llava.resize_token_embeddings(len(tokenizer))  # new rows: mean of the old ones (+ small noise)
    llava.config.image_token_id = layout.image_token_id
    model = OlaVlm(
        llava,
        config=config,
        target_shapes=shapes,
        layout=layout,
        tokenizer=tokenizer,
        image_processor=image_processor,
        teacher_specs=specs,
    )
    model.loaded_digests = llava_digests(llava)
    model.frozen_base = {"source": _source(config), "digests": model.loaded_digests}
    return model


def load_student(path: str | Path, *, dtype: torch.dtype | None = None) -> OlaVlm:
    """Load a folder written by `save_student` (safetensors + JSON only)."""
    from safetensors.torch import load_file
    from transformers import AutoImageProcessor, AutoTokenizer, LlavaForConditionalGeneration

    path = Path(path)
    meta = json.loads((path / CONFIG_FILE).read_text())
    sharded = SHARDED_KEY in meta
    extras = None if sharded else load_file(path / EXTRAS_FILE)
    if meta.get("format") != FORMAT_VERSION:
        raise ConfigError(
            f"{path / CONFIG_FILE}: checkpoint format {meta.get('format')!r}; this olavlm reads "
            f"format {FORMAT_VERSION} only: retrain or save it again with the olavlm that wrote it"
        )
    config = from_dict(ModelConfig, meta["model_config"])
    specs = {t: TeacherSpec.from_dict(d) for t, d in meta.get("teacher_specs", {}).items()}
    shapes = {t: tuple(s) for t, s in meta["target_shapes"].items()}
    if BASE_KEY in meta:
        llava = _rebuild_base(path, meta, shapes, specs)
    elif sharded:
        llava = _skeleton(path / LLAVA_DIR)
    else:
        llava = LlavaForConditionalGeneration.from_pretrained(path / LLAVA_DIR, dtype=dtype or torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    image_processor = AutoImageProcessor.from_pretrained(path)
    layout = layout_of(tokenizer, config.tasks, config.tokens_per_task, meta["layout"]["num_image_tokens"])
    if _layout_dict(layout) != meta["layout"]:
        raise ConfigError(f"{path}: tokenizer ids {_layout_dict(layout)} != saved layout {meta['layout']}")
    model = OlaVlm(
        llava,
        config=config,
        target_shapes=shapes,
        layout=layout,
        tokenizer=tokenizer,
        image_processor=image_processor,
        teacher_specs=specs,
    )
    if sharded:  # every tensor, extras included, from the shard files (any number of them)
        load_sharded(
            path / meta[SHARDED_KEY],
            without_aliases(model.state_dict(), model),
            files=meta.get(SHARD_FILES_KEY),
        )
    else:
        missing, unexpected = model.load_state_dict(extras, strict=False)
        missing = [k for k in missing if not k.startswith("llava.")]
        if missing or unexpected:
            raise ConfigError(f"{path / EXTRAS_FILE}: missing {missing}, unexpected {unexpected}")
    model.loaded_digests = llava_digests(llava)
    # a trainable-only folder's base is its recorded root (so that deleting this folder breaks no later one)
    model.frozen_base = (
        {"source": meta[BASE_KEY]["source"], "digests": meta[BASE_KEY]["digests"]}
        if BASE_KEY in meta
        else {
            "source": _source(dataclasses.replace(config, llava_checkpoint=str(path))),
            "digests": model.loaded_digests,
        }
    )
    return model.to(dtype) if dtype is not None else model


def _skeleton(folder: Path):
    """A float32 LLaVA of `folder`'s config with its memory allocated but not initialised (shards fill it)."""
    from transformers import GenerationConfig, LlavaConfig, LlavaForConditionalGeneration
    from transformers.initialization import no_init_weights

    with no_init_weights():
        llava = LlavaForConditionalGeneration(LlavaConfig.from_pretrained(folder))
    # no_init_weights also skips tie_weights (transformers 5): a tied LLM (Qwen2-0.5B, Llama-3.2-1B) would load
    # with lm_head as a separate, never-filled parameter and a resume's optimizer would miss its state
    llava.tie_weights()
    llava.generation_config = GenerationConfig.from_pretrained(folder)
    return llava.eval()  # as from_pretrained returns it


def _rebuild_base(path: Path, meta: dict, shapes: dict, specs: dict):
    """A trainable-only folder's LLaVA: its frozen base rebuilt in float32, checked, its saved tensors overlaid."""
    from safetensors.torch import load_file

    base = meta[BASE_KEY]
    source = from_dict(ModelConfig, base["source"])
    where = source.llava_checkpoint or f"{source.vision_model} + {source.llm}"
    try:
        llava = build_student(source, {**shapes, **specs}).llava
    except (OSError, ValueError) as exc:  # ConfigError is a ValueError too
        raise ConfigError(
            f"{path}: its frozen base {where} cannot be built ({exc}); the checkpoint was saved "
            f"against base hash {base['hash']}"
        ) from None
    overlay = load_file(path / TRAINABLE_FILE)
    state = llava.state_dict()
    wrong = sorted(n for n, t in overlay.items() if n not in state or state[n].shape != t.shape)
    if wrong:
        raise ConfigError(f"{path / TRAINABLE_FILE}: tensors {wrong[:5]} do not fit the base {where}")
    kept = [n for n in state if n not in overlay]
    rebuilt = frozen_hash(llava_digests(llava), kept)
    if rebuilt != base["hash"]:
        raise ConfigError(
            f"{path}: its frozen base {where} has hash {rebuilt}, the checkpoint was saved against "
            f"{base['hash']} (a different or changed base; rebuild it or point the checkpoint at "
            "the original)"
        )
    llava.load_state_dict(overlay, strict=False)
    return llava


def _source(config: ModelConfig) -> dict:
    """The config a frozen base is rebuilt from, its local folders made absolute (hub ids stay as they are),
    so that a checkpoint loads from any working directory."""
    local = {
        name: str(Path(value).resolve())
        for name in ("vision_model", "llm", "llava_checkpoint")
        if (value := getattr(config, name)) and Path(value).exists()
    }
    return to_dict(dataclasses.replace(config, **local))


# -- frozen base: sampled digests -------------------------------------------------------------------
def tensor_digest(name: str, tensor: torch.Tensor) -> str:
    """SHA-256 (16 hex) of a tensor's name, shape and DIGEST_SAMPLES evenly strided values as float32."""
    flat = tensor.detach().reshape(-1)
    stride = max(1, flat.numel() // DIGEST_SAMPLES)
    sample = flat[::stride][:DIGEST_SAMPLES].to(device="cpu", dtype=torch.float32).contiguous()
    digest = hashlib.sha256(f"{name}|{list(tensor.shape)}|".encode())
    digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


def llava_digests(llava) -> dict[str, str]:
    """{name: tensor_digest} of every tensor of llava.state_dict() (call before FSDP2 shards them)."""
    return {name: tensor_digest(name, t) for name, t in llava.state_dict().items()}


def frozen_hash(digests: dict[str, str], names) -> str:
    """The frozen-base hash of the tensors `names`: SHA-256 of their sorted (name, digest) lines."""
    combined = hashlib.sha256("".join(f"{n}={digests[n]}\n" for n in sorted(names)).encode())
    return f"sampled-sha256:{combined.hexdigest()}"


def trainable_only_default(model: OlaVlm) -> bool:
    """Whether a checkpoint of `model` is trainable-only by default: most of its weights are frozen (PT)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return frozen > trainable and hasattr(model, "frozen_base")


def overlay_names(model: OlaVlm) -> list[str]:
    """State names (as model.state_dict()) a trainable-only folder holds: every non-LLaVA tensor (task tokens,
    heads, scales: small), each trainable LLaVA tensor, and any frozen one that differs from the frozen base."""
    base, now = model.frozen_base["digests"], model.loaded_digests
    names = []
    for name, tensor in model.state_dict(keep_vars=True).items():
        inner = name.removeprefix("llava.")
        if inner == name or tensor.requires_grad or base.get(inner) is None or base[inner] != now.get(inner):
            names.append(name)
    return names


def save_student(
    model: OlaVlm,
    path: str | Path,
    *,
    trainable_only: bool = False,
    tensors: dict[str, torch.Tensor] | None = None,
    sharded: bool = False,
) -> Path:
    """Write LLaVA weights, olavlm extras (tokens, heads, scales), JSON config, tokenizer, processor (atomically).

    trainable_only: only `overlay_names(model)` and the frozen base's reference. `tensors`: full tensors to
    write instead of the model's own (gathered by the trainer under FSDP2). sharded: only `llava/config.json`;
    the trainer's processes write the state into `shards/` (checkpoint.save_state).
    """
    import torch.distributed
    from safetensors.torch import save_file

    def cpu(t: torch.Tensor) -> torch.Tensor:  # own storage: safetensors refuses tied (shared) tensors
        return t.detach().to("cpu", copy=True).contiguous()

    state = tensors if tensors is not None else model.state_dict()
    with atomic_dir(path) as tmp:
        base = None
        if sharded:
            model.llava.config.save_pretrained(tmp / LLAVA_DIR)
            model.llava.generation_config.save_pretrained(tmp / LLAVA_DIR)
            state = {}  # extras travel in the shards too
        elif trainable_only:
            names = overlay_names(model)
            save_file(
                {n.removeprefix("llava."): cpu(state[n]) for n in names if n.startswith("llava.")},
                tmp / TRAINABLE_FILE,
            )
            kept = [n for n in model.frozen_base["digests"] if f"llava.{n}" not in names]
            base = {**model.frozen_base, "hash": frozen_hash(model.frozen_base["digests"], kept)}
        else:
            model.llava.save_pretrained(tmp / LLAVA_DIR)
        extras = {k: cpu(v) for k, v in state.items() if not k.startswith("llava.")}
        if not sharded:
            save_file(extras, tmp / EXTRAS_FILE)
        meta = {
            "format": FORMAT_VERSION,
            "model_config": to_dict(model.config),
            "target_shapes": {t: list(s) for t, s in model.shapes.items()},
            "teacher_specs": {t: s.to_dict() for t, s in model.teacher_specs.items()},
            "layers": {t: list(v) for t, v in model.layers.items()},
            "layout": _layout_dict(model.layout),
        }
        if base is not None:
            meta[BASE_KEY] = base
        if sharded:
            meta[SHARDED_KEY] = SHARDS_DIR
            if torch.distributed.is_initialized():  # else one file, named model-00001-of-00001 by torch
                meta[SHARD_FILES_KEY] = torch.distributed.get_world_size()
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
        if model.tokenizer is not None:
            model.tokenizer.save_pretrained(tmp)
        if model.image_processor is not None:
            model.image_processor.save_pretrained(tmp)
    return Path(path)


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
