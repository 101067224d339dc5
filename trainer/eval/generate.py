"""Greedy answers to (image, prompt) from an olavlm checkpoint or an exported LLaVA.

Both kinds of folder end up as the same thing: a `LlavaForConditionalGeneration`
whose vocabulary rows hold the task-token embeddings, and input ids in which
`<image>` became the image tokens followed by the task tokens. For an olavlm
checkpoint the ids come from the LLM's chat template plus `TokenLayout.expand`
(exactly what the data path does in training); for an export they come from
the exported processor and its chat template. The prompt is answered with the
LLM's chat template; image and task tokens are never generated.
"""

from __future__ import annotations

from pathlib import Path

import torch

from olavlm.trainer.data.text import prompt_ids
from olavlm.trainer.student.build import CONFIG_FILE, load_student


def load_for_generation(path: str | Path):
    """-> (llava, prepare) where prepare(image, prompt) gives the model's inputs and the tokenizer."""
    path = Path(path)
    if (path / CONFIG_FILE).exists():
        model = load_student(path).eval()
        llava, tokenizer, layout = model.merged_llava(), model.tokenizer, model.layout
        suppress = [layout.image_token_id, *model.task_token_ids.tolist()]

        def prepare(image, prompt: str) -> dict:
            input_ids = torch.tensor([prompt_ids(tokenizer, layout, prompt)])
            # the saved processor pads or crops as the last training stage did (images.with_aspect_ratio)
            pixel_values = model.image_processor(images=image, return_tensors="pt")["pixel_values"]
            return {
                "input_ids": input_ids,
                "attention_mask": torch.ones_like(input_ids),
                "pixel_values": pixel_values,
            }

        return llava, prepare, tokenizer, suppress

    from transformers import AutoProcessor, LlavaForConditionalGeneration

    llava = LlavaForConditionalGeneration.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)

    def prepare(image, prompt: str) -> dict:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return dict(processor(images=image, text=text, return_tensors="pt"))

    return llava, prepare, processor.tokenizer, list(llava.generation_config.suppress_tokens or [])


@torch.no_grad()
def generate(path: str | Path, image, prompt: str, *, max_new_tokens: int = 64) -> str:
    """Greedy answer of the model in `path` (olavlm checkpoint or LLaVA export) to `prompt` about `image`."""
    llava, prepare, tokenizer, suppress = load_for_generation(path)
    inputs = prepare(image, prompt)
    out = llava.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        suppress_tokens=suppress,
        pad_token_id=tokenizer.pad_token_id,
    )
    new = out[0, inputs["input_ids"].shape[1] :]
    return tokenizer.decode(new, skip_special_tokens=True)
