"""The model side of `ola eval`: one adapter over olavlm checkpoints and exported LLaVA folders.

`EvalModel` is the whole interface the scorer needs (tests plug oracle models into it): greedy
`generate` and `logprobs` (each continuation's summed log-probability after the prompt). Design
choice: `LlavaEvalModel` serves both kinds of folder with one code path, a
`LlavaForConditionalGeneration` (olavlm through `merged_llava()`) plus a prompt -> ids function
(olavlm: chat template + `TokenLayout.expand`, as training; export: its processor's template), with
pixels from the saved image processor. Generation left-pads; likelihood right-pads, so each row
scores as it would alone. Cost: options longer than one token make one row per (question, option),
encoding the image once per option.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Protocol

import torch

from olavlm.schemas.errors import ConfigError
from olavlm.trainer.data.images import ImageTransform, normalize_pixels
from olavlm.trainer.eval.questions import EvalDataError
from olavlm.trainer.student.build import CONFIG_FILE, load_student


class EvalModel(Protocol):
    def generate(self, prompts: list[str], images: list[bytes]) -> list[str]:
        """Greedy replies to (prompt, encoded image) pairs."""
        ...

    def logprobs(
        self, prompts: list[str], images: list[bytes], continuations: list[list[str]]
    ) -> list[list[float]]:
        """Per question, the log-probability of each of its continuations after the prompt."""
        ...


def is_olavlm(folder: str | Path) -> bool:

    return (Path(folder) / CONFIG_FILE).exists()


class LlavaEvalModel:
    """`EvalModel` over an olavlm model folder or an exported LLaVA folder (see the module docstring)."""

    def __init__(
        self,
        folder: str | Path,
        *,
        device: str | None = None,
        dtype: torch.dtype | None = None,
        image_aspect_ratio: str = "",
        max_new_tokens: int = 32,
    ):
        from olavlm.trainer.student.tokens import IMAGE_TOKEN

        folder = Path(folder)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        if is_olavlm(folder):
            model = load_student(folder)
            self.llava, self.tokenizer, image_processor = (
                model.merged_llava(),
                model.tokenizer,
                model.image_processor,
            )
            layout = model.layout
            self.suppress = [layout.image_token_id, *model.task_token_ids.tolist()]
            tokenizer = self.tokenizer

            def render(prompt: str) -> str:
                messages = [{"role": "user", "content": f"{IMAGE_TOKEN}\n{prompt}"}]
                return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

            self._render, self._expand = render, layout.expand
        else:
            if not (folder / "config.json").exists():
                raise FileNotFoundError(
                    f"{folder}: neither an olavlm model/run folder nor a LLaVA checkpoint"
                )
            from transformers import AutoProcessor, LlavaForConditionalGeneration

            self.llava = LlavaForConditionalGeneration.from_pretrained(folder)
            processor = AutoProcessor.from_pretrained(folder)
            self.tokenizer, image_processor = processor.tokenizer, processor.image_processor
            self.suppress = list(self.llava.generation_config.suppress_tokens or [])
            image_id = self.llava.config.image_token_id
            block = [image_id] * self.llava.config.image_seq_length

            def render(prompt: str) -> str:
                messages = [
                    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}
                ]
                return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

            def expand(ids: list[int]) -> list[int]:
                return [t for token in ids for t in (block if token == image_id else (token,))]

            self._render, self._expand = render, expand
        self.llava = self.llava.to(self.device, dtype).eval()
        self.dtype = dtype
        transform = ImageTransform.from_processor(image_processor)
        if image_aspect_ratio:
            if image_aspect_ratio not in ("pad", "crop"):
                raise ConfigError(
                    f"image_aspect_ratio {image_aspect_ratio!r}: 'pad', 'crop' or '' (the model's own)"
                )
            transform = dataclasses.replace(transform, pad=image_aspect_ratio == "pad")
        self.transform = transform
        self.image_aspect_ratio = "pad" if transform.pad else "crop"
        self.max_new_tokens = max_new_tokens
        self.pad_id = (
            self.tokenizer.pad_token_id
            if self.tokenizer.pad_token_id is not None
            else self.tokenizer.eos_token_id
        )

    # -------------------------------------------------------------------- inputs

    def prompt_ids(self, prompt: str) -> list[int]:
        """Chat-templated, image-expanded ids of one prompt, ending with the generation prompt."""
        return self._expand(self.tokenizer(self._render(prompt), add_special_tokens=False)["input_ids"])

    def pixels(self, images: list[bytes]) -> torch.Tensor:
        """Encoded images -> normalised pixel values [B, 3, H, W] on the device."""
        import numpy as np

        batch = torch.from_numpy(np.stack([self.transform(image) for image in images]))  # uint8 [B, 3, H, W]
        # the training path's normalisation (same float32 arithmetic), on the device
        return normalize_pixels(batch.to(self.device), self.transform.mean, self.transform.std).to(self.dtype)

    def _pad(self, rows: list[list[int]], *, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, r in enumerate(rows):
            span = slice(length - len(r), length) if left else slice(0, len(r))
            ids[i, span] = torch.tensor(r, dtype=torch.long)
            mask[i, span] = 1
        return ids.to(self.device), mask.to(self.device)

    # -------------------------------------------------------------------- EvalModel

    @torch.no_grad()
    def generate(self, prompts: list[str], images: list[bytes]) -> list[str]:
        ids, mask = self._pad([self.prompt_ids(p) for p in prompts], left=True)  # [B, L]
        out = self.llava.generate(
            input_ids=ids,
            attention_mask=mask,
            pixel_values=self.pixels(images),
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            suppress_tokens=self.suppress or None,
            pad_token_id=self.pad_id,
        )  # [B, L + new]
        return [
            self.tokenizer.decode(row, skip_special_tokens=True).strip() for row in out[:, ids.shape[1] :]
        ]

    @torch.no_grad()
    def logprobs(
        self, prompts: list[str], images: list[bytes], continuations: list[list[str]]
    ) -> list[list[float]]:
        prompt_rows = [self.prompt_ids(p) for p in prompts]
        cont_ids = [
            [self.tokenizer(c, add_special_tokens=False)["input_ids"] for c in conts]
            for conts in continuations
        ]
        if any(not c for conts in cont_ids for c in conts):
            raise EvalDataError("an empty option text has no log-probability (use --continuation letter)")
        pixels = self.pixels(images)  # [B, 3, H, W]
        if all(len(c) == 1 for conts in cont_ids for c in conts):
            # One forward per question: every option is one token read off the last position.
            ids, mask = self._pad(prompt_rows, left=False)
            logits = self.llava(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits  # [B, L, V]
            last = mask.sum(1) - 1  # [B]
            logp = torch.log_softmax(logits[torch.arange(len(prompts)), last].float(), -1)  # [B, V]
            return [[float(logp[i, c[0]]) for c in conts] for i, conts in enumerate(cont_ids)]
        rows, owner, spans = [], [], []
        for i, (prompt, conts) in enumerate(zip(prompt_rows, cont_ids)):
            for c in conts:
                rows.append(prompt + c)
                owner.append(i)
                spans.append((len(prompt), len(c)))
        ids, mask = self._pad(rows, left=False)
        logits = self.llava(
            input_ids=ids, attention_mask=mask, pixel_values=pixels[owner]
        ).logits  # [R, L, V]
        logp = torch.log_softmax(logits.float(), -1)
        scores = []
        for r, (start, n) in enumerate(spans):
            targets = ids[r, start : start + n]  # token t is predicted at position t - 1
            scores.append(float(logp[r, start - 1 : start - 1 + n].gather(-1, targets[:, None]).sum()))
        out: list[list[float]] = [[] for _ in prompts]
        for r, i in enumerate(owner):
            out[i].append(scores[r])
        return out
