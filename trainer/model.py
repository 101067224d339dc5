"""The OLA-VLM student: LLaVA-1.5 + task tokens + embedding predictor heads, in one forward.

Design choices and their cost:
- The student *is* a transformers `LlavaForConditionalGeneration` (CLIP tower,
  `mlp2x_gelu` projector = LLaVA's `multi_modal_projector`, any decoder-only LM),
  so a trained model exports to a plain LLaVA checkpoint. The forward composes
  its parts explicitly (vision -> projector -> scatter into the image-token
  positions -> task tokens -> LLM -> lm_head) instead of calling LLaVA's
  forward, because the task tokens must come from a dedicated parameter.
- Task-token embeddings are one trainable `[num_tasks * tokens_per_task, D]`
  parameter placed at the task-token positions (found from the ids with
  `TokenLayout.locate`). The vocabulary rows of the same ids exist but are
  unused during training; `merged_llava()` writes the parameter into them for
  export and generation. Cost: if the LM ties input and output embeddings,
  the exported model's logits *for the task-token columns* change (they are
  suppressed in generation anyway).
- Hidden states of only the distilled layers are captured with forward hooks on
  the decoder blocks (layer i = output of block i = `hidden_states[i + 1]`); no
  all-layer `output_hidden_states` copy. Note the last block's hook output is
  before the final norm, unlike transformers' `hidden_states[-1]`.
- One sample holds at most one image (LLaVA-1.5 data); a row's image-token count
  must be 0 or `num_image_tokens`.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from torch import nn

from olavlm.schemas.config import ModelConfig, from_dict, scaled_layers, to_dict
from olavlm.schemas.spec import TeacherSpec

from .atomic import atomic_dir
from .heads import ResamplerHead
from .losses import embedding_loss, gather_targets, next_token_loss
from .tokens import TokenLayout, add_task_tokens, layout_of, ordered_tasks

FORMAT_VERSION = 1
CONFIG_FILE = "olavlm.json"
EXTRAS_FILE = "olavlm.safetensors"
LLAVA_DIR = "llava"


def target_shapes(teacher_specs: dict) -> dict[str, tuple[int, int]]:
    """{task: TeacherSpec | (T, D)} -> {task: (T, D)}."""
    out = {}
    for task, spec in teacher_specs.items():
        shape = spec.shape if isinstance(spec, TeacherSpec) else spec
        out[task] = (int(shape[0]), int(shape[1]))
    return out


def resolve_layers(config: ModelConfig, num_layers: int) -> dict[str, tuple[int, ...]]:
    """Distilled layers per task: the config's, else the paper's scaled to `num_layers`."""
    default = scaled_layers(num_layers)
    out = {}
    for task in ordered_tasks(config.tasks):
        layers = config.layers.get(task) or default.get(task)
        if not layers:
            raise ValueError(f"task {task!r} has no paper default layers: set ModelConfig.layers[{task!r}]")
        bad = [layer for layer in layers if not 0 <= layer < num_layers]
        if bad:
            raise ValueError(f"task {task!r}: layers {bad} outside the LLM's 0..{num_layers - 1}")
        out[task] = tuple(sorted(set(layers)))
    return out


class OlaVlm(nn.Module):
    """LLaVA student with task tokens and one `ResamplerHead` per (task, layer)."""

    def __init__(
        self,
        llava,
        *,
        config: ModelConfig,
        teacher_specs: dict,
        layout: TokenLayout,
        tokenizer=None,
        image_processor=None,
    ) -> None:
        super().__init__()
        tasks = ordered_tasks(config.tasks)
        if layout.tasks != tasks:
            raise ValueError(f"token layout tasks {layout.tasks} != configured tasks {tasks}")
        self.shapes = target_shapes(teacher_specs)
        missing = [t for t in tasks if t not in self.shapes]
        if missing:
            raise ValueError(f"no teacher spec (target shape) for tasks {missing}")
        self.llava = llava
        self.config = config
        self.layout = layout
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.teacher_specs = {t: s for t, s in teacher_specs.items() if isinstance(s, TeacherSpec)}
        text = llava.config.text_config
        self.layers = resolve_layers(config, text.num_hidden_layers)
        width = text.hidden_size

        # Task tokens: ids in sequence order, embeddings initialised from their vocabulary rows.
        ids = [i for task in tasks for i in layout.task_token_ids[task]]
        self.register_buffer("task_token_ids", torch.tensor(ids, dtype=torch.long), persistent=False)
        init = llava.get_input_embeddings().weight.detach()[ids].clone() if ids else torch.zeros(0, width)
        self.task_embeddings = nn.Parameter(init)  # [K, D]

        self.heads = nn.ModuleDict()
        for task in tasks:
            num_q, out_width = self.shapes[task]
            for layer in self.layers[task]:
                self.heads[f"{task}_l{layer}"] = ResamplerHead(
                    llm_width=width,
                    width=config.head_width,
                    out_width=out_width,
                    num_queries=num_q,
                    learned_queries=num_q > 1,  # T == 1 (gen): query = mean of the task's token states
                    num_heads=config.head_num_heads,
                    ffn_mult=config.head_ffn_mult,
                )
        self.logit_scales = nn.ParameterDict(
            {task: nn.Parameter(torch.tensor(float(config.logit_scale_init))) for task in tasks}
        )
        if config.gradient_checkpointing:
            llava.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        self.train()  # from_pretrained returns its parts in eval mode; a new module starts in train mode

    # ------------------------------------------------------------------ build / load

    @classmethod
    def from_config(cls, config: ModelConfig, teacher_specs: dict, *, dtype: torch.dtype | None = None) -> OlaVlm:
        """A new student from `config.vision_model` + `config.llm`, or from `config.llava_checkpoint`."""
        if config.llava_checkpoint:
            path = Path(config.llava_checkpoint)
            if (path / CONFIG_FILE).exists():
                model = cls.from_pretrained(path, dtype=dtype)
                if model.layout.tasks != ordered_tasks(config.tasks):
                    raise ValueError(f"{path}: checkpoint tasks {model.layout.tasks} != configured {config.tasks}")
                if model.shapes != {t: s for t, s in target_shapes(teacher_specs).items() if t in model.shapes}:
                    raise ValueError(f"{path}: checkpoint target shapes {model.shapes} != teacher specs")
                return model
            llava, tokenizer, image_processor = _load_llava(config.llava_checkpoint, dtype)
        else:
            if not (config.vision_model and config.llm):
                raise ValueError("ModelConfig needs vision_model and llm, or llava_checkpoint")
            llava, tokenizer, image_processor = _compose_llava(config, dtype)
        num_image_tokens = llava.config.image_seq_length
        layout = add_task_tokens(tokenizer, config.tasks, config.tokens_per_task, num_image_tokens)
        if len(tokenizer) > llava.get_input_embeddings().num_embeddings:
            llava.resize_token_embeddings(len(tokenizer))  # new rows: mean of the old ones (+ small noise)
        llava.config.image_token_id = layout.image_token_id
        return cls(
            llava,
            config=config,
            teacher_specs=teacher_specs,
            layout=layout,
            tokenizer=tokenizer,
            image_processor=image_processor,
        )

    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype: torch.dtype | None = None) -> OlaVlm:
        """Load a folder written by `save_pretrained` (safetensors + JSON only)."""
        from safetensors.torch import load_file
        from transformers import AutoImageProcessor, AutoTokenizer, LlavaForConditionalGeneration

        path = Path(path)
        meta = json.loads((path / CONFIG_FILE).read_text())
        if meta.get("format") != FORMAT_VERSION:
            raise ValueError(f"{path / CONFIG_FILE}: format {meta.get('format')!r}, expected {FORMAT_VERSION}")
        config = from_dict(ModelConfig, meta["model_config"])
        specs = {t: TeacherSpec.from_dict(d) for t, d in meta.get("teacher_specs", {}).items()}
        shapes = {t: tuple(s) for t, s in meta["target_shapes"].items()}
        llava = LlavaForConditionalGeneration.from_pretrained(path / LLAVA_DIR, dtype=dtype or torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path)
        image_processor = AutoImageProcessor.from_pretrained(path)
        layout = layout_of(tokenizer, config.tasks, config.tokens_per_task, meta["layout"]["num_image_tokens"])
        if _layout_dict(layout) != meta["layout"]:
            raise ValueError(f"{path}: tokenizer ids {_layout_dict(layout)} != saved layout {meta['layout']}")
        model = cls(
            llava,
            config=config,
            teacher_specs={**shapes, **specs},
            layout=layout,
            tokenizer=tokenizer,
            image_processor=image_processor,
        )
        extras = load_file(path / EXTRAS_FILE)
        missing, unexpected = model.load_state_dict(extras, strict=False)
        missing = [k for k in missing if not k.startswith("llava.")]
        if missing or unexpected:
            raise ValueError(f"{path / EXTRAS_FILE}: missing {missing}, unexpected {unexpected}")
        return model.to(dtype) if dtype is not None else model

    def save_pretrained(self, path: str | Path) -> Path:
        """Write LLaVA weights, olavlm extras (tokens, heads, scales), JSON config, tokenizer, processor.

        Atomic: everything goes to a temporary sibling folder that is renamed into place.
        """
        from safetensors.torch import save_file

        with atomic_dir(path) as tmp:
            self.llava.save_pretrained(tmp / LLAVA_DIR)
            extras = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items() if not k.startswith("llava.")}
            save_file(extras, tmp / EXTRAS_FILE)
            meta = {
                "format": FORMAT_VERSION,
                "model_config": to_dict(self.config),
                "target_shapes": {t: list(s) for t, s in self.shapes.items()},
                "teacher_specs": {t: s.to_dict() for t, s in self.teacher_specs.items()},
                "layers": {t: list(v) for t, v in self.layers.items()},
                "layout": _layout_dict(self.layout),
            }
            (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(tmp)
            if self.image_processor is not None:
                self.image_processor.save_pretrained(tmp)
        return Path(path)

    # ------------------------------------------------------------------ forward

    def forward(self, batch: dict, *, distill: bool = True) -> dict[str, torch.Tensor]:
        """Batch -> {'ntp', '<task>_l<layer>', '<task>', 'loss'} (scalars; 'loss' = ntp + task totals).

        batch: input_ids [B, L] long, attention_mask [B, L], labels [B, L] (-100 = ignored),
        pixel_values [B, 3, H, W] (anything where there is no image), has_image [B] bool,
        targets {task: [B, T, D]} (needed when distilling).
        """
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        image_mask, task_masks = self.layout.locate(input_ids)  # [B, L], {task: [B, L]}
        distill = distill and len(self.heads) > 0 and "targets" in batch
        capture = sorted({layer for layers in self.layers.values() for layer in layers}) if distill else []

        embeds = self.embed(input_ids, batch["pixel_values"], image_mask)  # [B, L, D]
        hidden, states = self.run_llm(embeds, attention_mask, capture)  # [B, L, D], {layer: [B, L, D]}
        logits = self.llava.lm_head(hidden)  # [B, L, V]

        # Image and task tokens are never predicted, whatever the data path put there.
        no_label = image_mask | torch.stack(list(task_masks.values())).any(0) if task_masks else image_mask
        labels = batch["labels"].masked_fill(no_label, -100)
        losses = {"ntp": next_token_loss(logits, labels)}
        total = losses["ntp"]
        if not distill:
            losses["loss"] = total
            return losses

        has_image = batch["has_image"].bool()
        if bool((has_image & ~image_mask.any(1)).any()):  # a sync, once per step
            raise ValueError("a sample has has_image=True but no image tokens in its input_ids")
        valid = has_image  # [B]: text-only samples give no embedding loss
        predictions = self.predict(states, attention_mask, task_masks)
        for task in self.layout.tasks:
            target = batch["targets"][task]  # [B, T, D]
            gathered = gather_targets(target, valid)  # once per task, shared by its layers
            task_total = 0.0
            for layer in self.layers[task]:
                term = embedding_loss(
                    predictions[f"{task}_l{layer}"],
                    target,
                    valid,
                    self.logit_scales[task],
                    global_targets=gathered,
                    info_nce_weight=self.config.info_nce_weight,
                    max_scale=self.config.logit_scale_max,
                )
                losses[f"{task}_l{layer}"] = term
                task_total = task_total + term
            losses[task] = self.config.task_loss_weight * task_total
            total = total + losses[task]
        losses["loss"] = total
        return losses

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
        """Next-token logits [B, L, V] of the student (what an exported LLaVA computes)."""
        image_mask, _ = self.layout.locate(input_ids)
        hidden, _ = self.run_llm(self.embed(input_ids, pixel_values, image_mask), attention_mask, [])
        return self.llava.lm_head(hidden)

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor, image_mask: torch.Tensor) -> torch.Tensor:
        """Token embeddings with image features and task-token embeddings in place. -> [B, L, D]"""
        embeds = self.llava.get_input_embeddings()(input_ids)  # [B, L, D]

        counts = image_mask.sum(1)  # [B]
        n = self.layout.num_image_tokens
        if bool(((counts != 0) & (counts != n)).any()):  # a sync, once per step
            raise ValueError(f"image-token counts per sample {counts.tolist()}: each must be 0 or {n}")
        rows = counts > 0
        if bool(rows.any()):
            features = self.image_features(pixel_values[rows])  # [b, N, D], rows with an image only
            embeds = embeds.masked_scatter(image_mask.unsqueeze(-1), features.to(embeds.dtype))

        if self.task_embeddings.numel():
            match = input_ids.unsqueeze(-1) == self.task_token_ids  # [B, L, K]
            slot = match.int().argmax(-1)  # [B, L] index into task_embeddings
            task_embeds = self.task_embeddings.to(embeds.dtype)[slot]  # [B, L, D]
            embeds = torch.where(match.any(-1, keepdim=True), task_embeds, embeds)
        return embeds

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[b, 3, H, W] -> projected patch features [b, N, D] (LLaVA: layer -2, CLS dropped)."""
        tower = self.llava.model.vision_tower
        pixel_values = pixel_values.to(tower.dtype)
        out = tower(pixel_values, output_hidden_states=True)
        patches = out.hidden_states[self.llava.config.vision_feature_layer][:, 1:]  # [b, N, D_vision]
        return self.llava.model.multi_modal_projector(patches)  # [b, N, D]

    def run_llm(
        self, embeds: torch.Tensor, attention_mask: torch.Tensor, capture: list[int]
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Decoder forward; returns the final (normed) hidden states and the captured block outputs."""
        with self._capture(capture) as states:
            out = self.llava.model.language_model(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False)
        return out.last_hidden_state, states

    def predictions(self, batch: dict) -> dict[str, torch.Tensor]:
        """Every head's prediction for a batch (probing, tests): {'<task>_l<layer>': [B, T, D_task]}."""
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        image_mask, task_masks = self.layout.locate(input_ids)
        capture = sorted({layer for layers in self.layers.values() for layer in layers})
        embeds = self.embed(input_ids, batch["pixel_values"], image_mask)
        _, states = self.run_llm(embeds, attention_mask, capture)
        return self.predict(states, attention_mask, task_masks)

    def predict(
        self, states: dict[int, torch.Tensor], attention_mask: torch.Tensor, task_masks: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Every head's prediction {'<task>_l<layer>': [B, T, D_task]}."""
        out = {}
        for task in self.layout.tasks:
            others = [m for t, m in task_masks.items() if t != task]
            key_mask = attention_mask.bool()  # [B, L]: no padding, no other task's tokens
            if others:
                key_mask = key_mask & ~torch.stack(others).any(0)
            own = task_masks[task].unsqueeze(-1).to(next(iter(states.values())).dtype)  # [B, L, 1]
            for layer in self.layers[task]:
                hidden = states[layer]  # [B, L, D]
                query = None
                if self.shapes[task][0] == 1:  # gen-like: one query = mean of the own task tokens' states
                    query = ((hidden * own).sum(1) / own.sum(1).clamp(min=1)).unsqueeze(1)  # [B, 1, D]
                out[f"{task}_l{layer}"] = self.heads[f"{task}_l{layer}"](hidden, key_mask, query)
        return out

    @contextlib.contextmanager
    def _capture(self, layers: list[int]):
        """Forward hooks that keep the outputs of the given decoder blocks (removed on exit)."""
        states: dict[int, torch.Tensor] = {}
        blocks = self.llava.model.language_model.layers
        handles = []
        for layer in layers:

            def hook(module, args, output, layer=layer):
                states[layer] = output[0] if isinstance(output, tuple) else output

            handles.append(blocks[layer].register_forward_hook(hook))
        try:
            yield states
        finally:
            for handle in handles:
                handle.remove()

    # ------------------------------------------------------------------ inference / export

    @torch.no_grad()
    def merged_llava(self):
        """The LLaVA model with the trained task embeddings written into their vocabulary rows (in place)."""
        weight = self.llava.get_input_embeddings().weight
        if self.task_embeddings.numel():
            weight[self.task_token_ids] = self.task_embeddings.to(weight.dtype)
        return self.llava


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
        raise ValueError(f"{path}: vision_feature_select_strategy must be 'default' (CLS dropped)")
    processor = AutoProcessor.from_pretrained(path)
    return llava, processor.tokenizer, processor.image_processor


def _layout_dict(layout: TokenLayout) -> dict:
    return {
        "image_token_id": layout.image_token_id,
        "num_image_tokens": layout.num_image_tokens,
        "task_token_ids": {t: list(ids) for t, ids in layout.task_token_ids.items()},
        "pad_token_id": layout.pad_token_id,
    }

