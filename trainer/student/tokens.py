"""Image and task tokens: how they enter the vocabulary and how they are found again.

The text holds one `<image>` placeholder per image. Before the model sees the ids,
the placeholder becomes `num_image_tokens` image tokens followed by the task tokens
(gen, depth, seg order, 8 each by default). Positions are always recovered from
the ids (`locate`), never from fixed offsets or system-prompt lengths (a defect
of the authors' code). Task tokens are real vocabulary entries, so an exported
checkpoint carries them as added tokens with their trained embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from olavlm.schemas.config import TASK_ORDER
from olavlm.schemas.errors import ConfigError

IMAGE_TOKEN = "<image>"


def ordered_tasks(tasks) -> tuple[str, ...]:
    """gen, depth, seg first (the paper's order), any other teacher after, sorted."""
    tasks = set(tasks)
    return tuple(t for t in TASK_ORDER if t in tasks) + tuple(sorted(tasks - set(TASK_ORDER)))


def task_token_strings(task: str, count: int) -> list[str]:
    return [f"<{task}_{i}>" for i in range(count)]


@dataclass(frozen=True)
class TokenLayout:
    """Token ids the data path and the model agree on."""

    image_token_id: int
    num_image_tokens: int
    task_token_ids: dict[str, tuple[int, ...]]
    """Per task, in sequence order; tasks in `ordered_tasks` order."""
    pad_token_id: int

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self.task_token_ids)

    def image_block(self) -> list[int]:
        """What one `<image>` placeholder expands to."""
        block = [self.image_token_id] * self.num_image_tokens
        for ids in self.task_token_ids.values():
            block.extend(ids)
        return block

    def expand(self, ids: list[int]) -> list[int]:
        out: list[int] = []
        for token in ids:
            out.extend(self.image_block() if token == self.image_token_id else (token,))
        return out

    def locate(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(B, L) ids -> image-token mask (B, L), {task: task-token mask (B, L)}."""
        image_mask = input_ids == self.image_token_id
        task_masks = {}
        for task, ids in self.task_token_ids.items():
            task_masks[task] = torch.isin(input_ids, torch.tensor(ids, device=input_ids.device))
        return image_mask, task_masks


def add_task_tokens(tokenizer, tasks, tokens_per_task: int, num_image_tokens: int) -> TokenLayout:
    """Add `<image>` (if absent) and the task tokens to `tokenizer`; return the layout."""
    tasks = ordered_tasks(tasks)
    new = [IMAGE_TOKEN] if IMAGE_TOKEN not in tokenizer.get_vocab() else []
    for task in tasks:
        new.extend(t for t in task_token_strings(task, tokens_per_task) if t not in tokenizer.get_vocab())
    if new:  # special: never split or normalised by the tokenizer
        tokenizer.add_tokens(new, special_tokens=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return layout_of(tokenizer, tasks, tokens_per_task, num_image_tokens)


def layout_of(tokenizer, tasks, tokens_per_task: int, num_image_tokens: int) -> TokenLayout:
    """The layout of a tokenizer that already holds the tokens (a saved checkpoint's)."""
    vocab = tokenizer.get_vocab()
    missing = [t for task in tasks for t in task_token_strings(task, tokens_per_task) if t not in vocab]
    if IMAGE_TOKEN not in vocab or missing:
        raise ConfigError(f"tokenizer lacks {([IMAGE_TOKEN] if IMAGE_TOKEN not in vocab else []) + missing}")
    task_ids = {
        task: tuple(vocab[t] for t in task_token_strings(task, tokens_per_task))
        for task in ordered_tasks(tasks)
    }
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return TokenLayout(vocab[IMAGE_TOKEN], num_image_tokens, task_ids, pad)
