"""One validation of a LLaVA conversation, shared by conversion and training.

`ola corpus from-llava` and the trainer's text stage both call `validate_conversation` (roles,
types, empty values, an assistant turn, `<image>` placeholders against the image), so an entry that
conversion writes is one that training accepts; it lives in torch-free schemas/ for both to import.
Cost: what depends on the tokenizer (chat template, `max_length`) is still checked only in
training. `caption_conversation` turns a bare caption (img2dataset's `txt`) into the same form.
"""

from __future__ import annotations

IMAGE_TOKEN = "<image>"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
"""LLaVA role names (and their chat names) -> chat roles."""


class ConversationError(ValueError):
    """A conversation that training would refuse; `reason` is a short metric name, the message says why."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def validate_conversation(conversations, has_image: bool) -> list[dict[str, str]]:
    """LLaVA `conversations` -> chat messages [{"role", "content"}]; raises ConversationError.

    A sample with an image and no placeholder gets one at the start of its first user turn,
    as LLaVA does."""
    if not isinstance(conversations, list) or not conversations:
        raise ConversationError("bad_json", "'conversations' must be a non-empty list")
    messages = []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict):
            raise ConversationError("bad_json", f"turn {i} is a {type(turn).__name__}, not an object")
        role, value = turn.get("from"), turn.get("value")
        if role not in ROLES:
            raise ConversationError("bad_json", f"turn {i}: 'from' is {role!r}, not one of {sorted(ROLES)}")
        if not isinstance(value, str):
            raise ConversationError(
                "bad_json", f"turn {i}: 'value' is a {type(value).__name__}, not a string"
            )
        if not value.strip():
            raise ConversationError("bad_json", f"turn {i}: 'value' is empty")
        if ROLES[role] == "assistant" and IMAGE_TOKEN in value:
            raise ConversationError("bad_json", f"turn {i}: {IMAGE_TOKEN} inside an assistant turn")
        messages.append({"role": ROLES[role], "content": value})
    if not any(m["role"] == "assistant" for m in messages):
        raise ConversationError("bad_json", "no assistant ('gpt') turn: nothing to learn from")
    placeholders = sum(m["content"].count(IMAGE_TOKEN) for m in messages)
    if placeholders > 1:
        raise ConversationError(
            "bad_json", f"{placeholders} {IMAGE_TOKEN} placeholders; one image per sample is supported"
        )
    if not has_image and placeholders:
        raise ConversationError("bad_json", f"text has {IMAGE_TOKEN} but the sample has no image")
    if has_image and placeholders == 0:
        first = next((i for i, m in enumerate(messages) if m["role"] == "user"), 0)
        messages[first] = {**messages[first], "content": f"{IMAGE_TOKEN}\n{messages[first]['content']}"}
    return messages


def caption_conversation(caption, prompt: str) -> list[dict[str, str]]:
    """A caption -> [user: `<image>` + prompt, assistant: caption] (LLaVA's pretraining form)."""
    if not isinstance(caption, str) or not caption.strip():
        raise ConversationError("bad_json", "the caption is empty")
    return [
        {"from": "human", "value": f"{IMAGE_TOKEN}\n{prompt}" if prompt else IMAGE_TOKEN},
        {"from": "gpt", "value": caption.strip()},
    ]
