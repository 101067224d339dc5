"""Tiny student helpers shared by the model tests (built once per process, offline)."""

from __future__ import annotations

import functools
import tempfile

import torch

from olavlm.schemas.config import ModelConfig
from olavlm.trainer.student.build import build_student

SPECS = {"gen": (1, 24), "depth": (64, 32), "seg": (64, 48)}
"""Tiny target shapes {task: (T, D)}: depth/seg one query per image token, gen one query."""


@functools.cache
def tiny_folders():
    from olavlm.trainer.student.presets import build_tiny_student

    return build_tiny_student(tempfile.mkdtemp(prefix="ola-tiny-"), seed=0)


def tiny_config(**changes) -> ModelConfig:
    s = tiny_folders()
    base = dict(vision_model=s.vision_model, llm=s.llm, head_width=32, head_num_heads=4, head_ffn_mult=2)
    return ModelConfig(**{**base, **changes})


def tiny_model(seed: int = 0, specs=SPECS, **changes):

    config = tiny_config(**changes)  # first: building the folders reseeds the RNG
    torch.manual_seed(seed)
    return build_student(config, specs)


def sample_ids(model, prompt: str, answer: str, *, image: bool = True) -> tuple[list[int], list[int]]:
    """Chat-templated ids (image block expanded) and labels on the assistant turn only."""
    content = ("<image>\n" if image else "") + prompt
    messages = [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]
    out = model.tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, labels = [], []
    for token, is_answer in zip(out["input_ids"], out["assistant_masks"]):
        block = model.layout.image_block() if token == model.layout.image_token_id else [token]
        ids.extend(block)
        labels.extend(block if is_answer else [-100] * len(block))
    return ids, labels


def make_batch(model, samples, *, pad_to: int = 0, seed: int = 0, specs=SPECS) -> dict:
    """samples: list of (prompt, answer, has_image). Right-padded batch in the data path's contract."""
    gen = torch.Generator().manual_seed(seed)
    rows = [sample_ids(model, p, a, image=img) for p, a, img in samples]
    length = max(pad_to, max(len(ids) for ids, _ in rows))
    pad = model.layout.pad_token_id
    input_ids = torch.full((len(rows), length), pad, dtype=torch.long)
    labels = torch.full((len(rows), length), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, (ids, lab) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        attention_mask[i, : len(ids)] = 1
    has_image = torch.tensor([img for _, _, img in samples])
    pixel_values = torch.randn(len(rows), 3, 32, 32, generator=gen) * has_image[:, None, None, None]
    targets = {t: torch.randn(len(rows), *shape, generator=gen) for t, shape in specs.items()}
    return dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        labels=labels,
        pixel_values=pixel_values,
        has_image=has_image,
        targets=targets,
    )


SAMPLES = [
    ("What is in the image?", "A dog on a table.", True),
    ("How many cars are there?", "Three.", True),
    ("Describe the scene.", "Two people walk along the beach at sunset.", True),
]
