"""The OLA-VLM student: LLaVA-1.5 + task tokens + embedding predictor heads, in one forward.

Read top to bottom: `encode` (ids + pixels -> hidden states of the chosen layers), `forward` (NTP
+ embedding losses), `predict` (the heads); building and saving live in build.py. The student *is*
a transformers `LlavaForConditionalGeneration` (so it exports to plain LLaVA), but `encode`
composes its parts itself, because the task tokens come from one trainable parameter placed at the
positions `TokenLayout.locate` finds in the ids. Layer i is transformers' `hidden_states[i]`, the
paper's numbering, captured by hooks on the chosen layers only. Design choice: uint8 pixels are
normalised in `image_features`, on the model's device, with the saved processor's mean and std.
Cost: a batch is only meaningful with the model whose processor matches the loader's transform.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from olavlm.schemas.config import ModelConfig, scaled_layers
from olavlm.schemas.errors import ConfigError
from olavlm.schemas.spec import TeacherSpec
from olavlm.trainer.data.images import normalize_pixels
from olavlm.trainer.student.heads import ResamplerHead
from olavlm.trainer.student.losses import (
    Normalisers,
    embedding_loss,
    gather_targets,
    label_count,
    next_token_loss,
)
from olavlm.trainer.student.tokens import TokenLayout, ordered_tasks


def resolve_layers(config: ModelConfig, num_layers: int) -> dict[str, tuple[int, ...]]:
    """Distilled layers per task (paper numbering, 1..num_layers): the config's, else the paper's scaled."""
    default = scaled_layers(num_layers)
    out = {}
    for task in ordered_tasks(config.tasks):
        layers = config.layers.get(task) or default.get(task)
        if not layers:
            raise ConfigError(f"task {task!r} has no paper default layers: set ModelConfig.layers[{task!r}]")
        bad = [layer for layer in layers if not 1 <= layer <= num_layers]
        if bad:
            raise ConfigError(
                f"task {task!r}: layers {bad} outside the LLM's 1..{num_layers} "
                "(paper numbering: layer i = hidden_states[i])"
            )
        out[task] = tuple(sorted(set(layers)))
    return out


def _predicted_labels(
    labels: torch.Tensor, image_mask: torch.Tensor, task_masks: dict[str, torch.Tensor]
) -> torch.Tensor:
    """Image and task tokens are never predicted, whatever the data path put there. -> [B, L]"""
    no_label = image_mask | torch.stack(list(task_masks.values())).any(0) if task_masks else image_mask
    return labels.masked_fill(no_label, -100)


@dataclass(frozen=True)
class Encoded:
    """What `OlaVlm.encode` returns: everything the losses, the heads and the probe read."""

    hidden: torch.Tensor
    """Final (normed) hidden states [B, L, D]."""
    states: dict[int, torch.Tensor]
    """The requested layers' hidden states {layer: [B, L, D]} (layer i = hidden_states[i])."""
    image_mask: torch.Tensor
    """[B, L] bool: image-token positions."""
    task_masks: dict[str, torch.Tensor]
    """{task: [B, L] bool}: each task's token positions."""


class OlaVlm(nn.Module):
    """LLaVA student with task tokens and one `ResamplerHead` per (task, layer)."""

    def __init__(
        self,
        llava,
        *,
        config: ModelConfig,
        target_shapes: dict[str, tuple[int, int]],
        layout: TokenLayout,
        tokenizer=None,
        image_processor=None,
        teacher_specs: dict[str, TeacherSpec] | None = None,
    ) -> None:
        super().__init__()
        tasks = ordered_tasks(config.tasks)
        if layout.tasks != tasks:
            raise ValueError(f"token layout tasks {layout.tasks} != configured tasks {tasks}")
        missing = [t for t in tasks if t not in target_shapes]
        if missing:
            raise ValueError(f"no target shape for tasks {missing}")
        self.shapes = {t: (int(s[0]), int(s[1])) for t, s in target_shapes.items()}
        self.llava = llava
        self.config = config
        self.layout = layout
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.teacher_specs = dict(teacher_specs or {})
        text = llava.config.text_config
        self.num_layers = text.num_hidden_layers
        self.layers = resolve_layers(config, self.num_layers)
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

    # ------------------------------------------------------------------ forward

    def forward(
        self, batch: dict, *, distill: bool = True, norm: Normalisers | None = None
    ) -> dict[str, torch.Tensor]:
        """Batch -> {'ntp', '<task>_l<layer>', '<task>', 'loss'} (scalars; 'loss' = ntp + task totals).

        batch: collate.py's contract (targets needed when distilling). norm: the optimizer step's
        global counts (`count_items`, summed over micro-batches and ranks; losses.py); None: this
        batch's own.
        """
        distill = distill and len(self.heads) > 0 and "targets" in batch
        capture = self.distilled_layers() if distill else []
        enc = self.encode(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], capture)
        logits = self.llava.lm_head(enc.hidden)  # [B, L, V]

        labels = _predicted_labels(batch["labels"], enc.image_mask, enc.task_masks)
        if norm is None:
            losses = {"ntp": next_token_loss(logits, labels)}
        else:
            losses = {"ntp": next_token_loss(logits, labels, tokens=norm.tokens, world_size=norm.world_size)}
        total = losses["ntp"]
        if not distill:
            losses["loss"] = total
            return losses

        has_image = batch["has_image"].bool()
        if bool((has_image & ~enc.image_mask.any(1)).any()):  # a sync, once per step
            raise ValueError("a sample has has_image=True but no image tokens in its input_ids")
        valid = has_image  # [B]: text-only samples give no embedding loss
        predictions = self.predict(enc, batch["attention_mask"])
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
                    images=None if norm is None else norm.images,
                )
                losses[f"{task}_l{layer}"] = term
                task_total = task_total + term
            losses[task] = self.config.task_loss_weight * task_total
            total = total + losses[task]
        losses["loss"] = total
        return losses

    def count_items(self, batch: dict) -> tuple[int, int]:
        """(label tokens, samples with an image) of a batch, as `forward` counts them: image and task
        tokens are never labels. The loop calls it on the CPU batch (int() of a GPU tensor would sync)."""
        image_mask, task_masks = self.layout.locate(batch["input_ids"])
        labels = _predicted_labels(batch["labels"], image_mask, task_masks)
        return int(label_count(labels)), int(batch["has_image"].bool().sum())

    def distilled_layers(self) -> list[int]:
        return sorted({layer for layers in self.layers.values() for layer in layers})

    def encode(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor,
        capture: list[int] = (),
    ) -> Encoded:
        """ids [B, L] + pixels [B, 3, H, W] -> final hidden states and the `capture` layers' states.

        The one path from inputs to hidden states: training, logits, predictions and the probe use it.
        """
        image_mask, task_masks = self.layout.locate(input_ids)  # [B, L], {task: [B, L]}
        embeds = self.embed(input_ids, pixel_values, image_mask)  # [B, L, D]
        bad = [layer for layer in capture if not 1 <= layer <= self.num_layers]
        if bad:
            raise ConfigError(f"layers {bad} outside the LLM's 1..{self.num_layers}")
        with self._capture([layer for layer in capture if layer < self.num_layers]) as states:
            out = self.llava.model.language_model(
                inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False
            )
        if self.num_layers in capture:  # hidden_states[-1] is the normed final output, not the block's
            states[self.num_layers] = out.last_hidden_state
        return Encoded(out.last_hidden_state, states, image_mask, task_masks)

    def logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor
    ) -> torch.Tensor:
        """Next-token logits [B, L, V] of the student (what an exported LLaVA computes)."""
        return self.llava.lm_head(self.encode(input_ids, attention_mask, pixel_values).hidden)

    def predictions(self, batch: dict) -> dict[str, torch.Tensor]:
        """Every head's prediction for a batch (tests, inspection): {'<task>_l<layer>': [B, T, D_task]}."""
        enc = self.encode(
            batch["input_ids"], batch["attention_mask"], batch["pixel_values"], self.distilled_layers()
        )
        return self.predict(enc, batch["attention_mask"])

    def embed(
        self, input_ids: torch.Tensor, pixel_values: torch.Tensor, image_mask: torch.Tensor
    ) -> torch.Tensor:
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
        elif torch.is_grad_enabled():
            # No image: the projector enters the graph times 0 (as in LLaVA's training), so it gets a zero
            # gradient like every other trainable part, and DDP needs no search for unused parameters.
            touched = [p.view(-1)[:1] for p in self.llava.model.multi_modal_projector.parameters()]
            embeds = embeds + 0.0 * torch.cat(touched).sum().to(embeds.dtype)

        if self.task_embeddings.numel():
            match = input_ids.unsqueeze(-1) == self.task_token_ids  # [B, L, K]
            slot = match.int().argmax(-1)  # [B, L] index into task_embeddings
            task_embeds = self.task_embeddings.to(embeds.dtype)[slot]  # [B, L, D]
            embeds = torch.where(match.any(-1, keepdim=True), task_embeds, embeds)
        return embeds

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[b, 3, H, W] -> projected patch features [b, N, D] (LLaVA: layer -2, CLS dropped).

        uint8 pixels (the loader's batches) are normalised here with the image processor's mean and std;
        float pixels (the processor's own output) count as normalised.
        """
        tower = self.llava.model.vision_tower
        if pixel_values.dtype == torch.uint8:
            if self.image_processor is None:
                raise ValueError("uint8 pixel_values need the model's image processor (its mean and std)")
            pixel_values = normalize_pixels(
                pixel_values, self.image_processor.image_mean, self.image_processor.image_std
            )
        pixel_values = pixel_values.to(tower.dtype)
        out = tower(pixel_values, output_hidden_states=True)
        patches = out.hidden_states[self.llava.config.vision_feature_layer][:, 1:]  # [b, N, D_vision]
        return self.llava.model.multi_modal_projector(patches)  # [b, N, D]

    def predict(self, enc: Encoded, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every head's prediction {'<task>_l<layer>': [B, T, D_task]} from the encoded layers."""
        out = {}
        for task in self.layout.tasks:
            others = [m for t, m in enc.task_masks.items() if t != task]
            key_mask = attention_mask.bool()  # [B, L]: no padding, no other task's tokens
            if others:
                key_mask = key_mask & ~torch.stack(others).any(0)
            own = enc.task_masks[task].unsqueeze(-1).to(enc.hidden.dtype)  # [B, L, 1]
            for layer in self.layers[task]:
                hidden = enc.states[layer]  # [B, L, D]
                query = None
                if self.shapes[task][0] == 1:  # gen-like: one query = mean of the own task tokens' states
                    query = ((hidden * own).sum(1) / own.sum(1).clamp(min=1)).unsqueeze(1)  # [B, 1, D]
                out[f"{task}_l{layer}"] = self.heads[f"{task}_l{layer}"](hidden, key_mask, query)
        return out

    @contextlib.contextmanager
    def _capture(self, layers: list[int]):
        """Forward hooks keeping hidden_states[i] = the output of block i - 1 (0-based), removed on exit."""
        states: dict[int, torch.Tensor] = {}
        blocks = self.llava.model.language_model.layers
        handles = []
        for layer in layers:

            def hook(module, args, output, layer=layer):
                states[layer] = output[0] if isinstance(output, tuple) else output

            handles.append(blocks[layer - 1].register_forward_hook(hook))
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
