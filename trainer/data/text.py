"""Stage 3a of the data path: conversation -> input ids and labels.

The conversation is the sample json's `conversations` (validated as `ola corpus from-llava` does),
or a caption as the answer to `DataConfig.caption_prompt`. The `<image>` placeholder becomes the
image and task tokens; truncation to `max_length` never cuts them (a sample whose block does not
fit is an error). Design choice: the tokenizer's own chat template renders the text, and the
assistant turns (the labels) are found by rendering up to each assistant message with and without
it, so any template works; pieces are tokenized one by one, so no merge crosses a turn boundary.
Cost: two template renders per assistant turn.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from olavlm.schemas.conversation import ConversationError, caption_conversation, validate_conversation
from olavlm.schemas.errors import ConfigError, OlaError
from olavlm.trainer.student.tokens import IMAGE_TOKEN, TokenLayout

IGNORE = -100


class TextError(OlaError, ValueError):
    """A conversation that cannot be tokenized; `reason` is a short metric name.

    The loader turns it into a `DataError` with the sample's key and shard."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Tokenized:
    input_ids: list[int]
    labels: list[int]


def to_messages(conversations, has_image: bool) -> list[dict[str, str]]:
    """LLaVA `conversations` -> chat messages, validated by `schemas.conversation.validate_conversation`
    (the same check `ola corpus from-llava` applies)."""
    try:
        return validate_conversation(conversations, has_image)
    except ConversationError as exc:
        raise TextError(exc.reason, str(exc)) from None


def sample_conversation(files: dict[str, bytes], *, has_image: bool, caption_prompt: str) -> list:
    """A sample's conversation: the `json` member's `conversations`, else its caption.

    The caption is the `txt` member (img2dataset's layout), else the json's `caption`; it
    becomes one user turn (`<image>` + `caption_prompt`) and the caption as the answer.
    `caption_prompt=""` turns that off (a caption-only sample is then `bad_json`)."""
    meta = None
    if "json" in files:
        try:
            meta = json.loads(files["json"])
        except (ValueError, UnicodeDecodeError) as exc:
            raise TextError("bad_json", f"json member does not parse: {exc}") from None
        if isinstance(meta, dict) and "conversations" in meta:
            return meta["conversations"]
    caption = None
    if "txt" in files:
        try:
            caption = files["txt"].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise TextError("bad_json", f"txt member is not UTF-8: {exc}") from None
    elif isinstance(meta, dict) and isinstance(meta.get("caption"), str):
        caption = meta["caption"]
    if caption is None:
        what = "no 'conversations' in the json" if "json" in files else "no json member"
        raise TextError("bad_json", f"{what} and no txt caption (has {sorted(files)})")
    if not caption_prompt:
        raise TextError(
            "bad_json", "caption-only sample (no 'conversations') and DataConfig.caption_prompt is ''"
        )
    if not has_image:
        raise TextError("bad_json", "caption-only sample without an image")
    try:
        return caption_conversation(caption, caption_prompt)
    except ConversationError as exc:
        raise TextError(exc.reason, str(exc)) from None


class ChatRenderer:
    """`apply_chat_template(..., tokenize=False)` and the tokenizer call, without their per-call overhead.

    Renders with the compiled Jinja template, encodes piece by piece with the fast tokenizer's backend and
    memoises prompt pieces. Cost: relies on a private transformers helper and the backend tokenizer, both
    checked against the public API at construction, which is the fallback.
    """

    MEMO_SIZE = 4096
    """Distinct prompt pieces kept (then the memo starts again)."""

    PROBE = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
    ]

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(f"tokenizer {tokenizer.name_or_path!r} has no chat template")
        self._compiled = None
        try:
            from transformers.utils.chat_template_utils import _compile_jinja_template

            self._compiled = _compile_jinja_template(tokenizer.chat_template)
            self._kwargs = dict(tokenizer.special_tokens_map)
            for gp in (False, True):
                if self._fast(self.PROBE, gp) != self._slow(self.PROBE, gp):
                    self._compiled = None
        except Exception:  # any change of the private helper: use the public API
            self._compiled = None
        self._backend = getattr(tokenizer, "_tokenizer", None)
        self._memo: dict[str, list[int]] = {}
        probe = [self(self.PROBE, False), f"{IMAGE_TOKEN}\n a b", "b<|im_end|>\n"]
        if self._backend is None or self._encode_fast(probe) != self._encode_slow(probe):
            self._backend = None

    def _encode_slow(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def _encode_fast(self, texts: list[str]) -> list[list[int]]:
        return [self._backend.encode(text, add_special_tokens=False).ids for text in texts]

    def encode(self, pieces: list[tuple[str, bool]]) -> list[list[int]]:
        """Token ids of each (text, is_assistant) piece, without special tokens; do not modify them."""
        if self._backend is None:
            return self._encode_slow([text for text, _ in pieces])
        out = []
        for text, assistant in pieces:
            ids = None if assistant else self._memo.get(text)
            if ids is None:
                ids = self._backend.encode(text, add_special_tokens=False).ids
                if not assistant:
                    if len(self._memo) >= self.MEMO_SIZE:
                        self._memo.clear()
                    self._memo[text] = ids
            out.append(ids)
        return out

    def _slow(self, messages, generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )

    def _fast(self, messages, generation_prompt: bool) -> str:
        return self._compiled.render(
            messages=messages,
            tools=None,
            documents=None,
            add_generation_prompt=generation_prompt,
            **self._kwargs,
        )

    def __call__(self, messages, generation_prompt: bool) -> str:
        if self._compiled is None:
            return self._slow(messages, generation_prompt)
        return self._fast(messages, generation_prompt)


def render_pieces(messages: list[dict[str, str]], render: ChatRenderer) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, is_assistant) pieces, concatenating to the full rendering."""
    full = render(messages, False)
    pieces: list[tuple[str, bool]] = []
    done = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(render(messages[:i], True))
        end = len(render(messages[: i + 1], False))
        if not (done <= start <= end <= len(full)):
            raise TextError("template", "the chat template does not render conversations prefix-consistently")
        pieces.append((full[done:start], False))
        pieces.append((full[start:end], True))
        done = end
    pieces.append((full[done:], False))
    return [(text, assistant) for text, assistant in pieces if text]


def tokenize(
    conversations,
    tokenizer,
    layout: TokenLayout,
    *,
    has_image: bool,
    max_length: int,
    render: ChatRenderer | None = None,
) -> Tokenized:
    """LLaVA conversations -> expanded input ids (image + task tokens) and labels (assistant turns only).

    Pass a `ChatRenderer` made once per tokenizer when tokenizing many samples.
    """
    render = render or ChatRenderer(tokenizer)
    pieces = render_pieces(to_messages(conversations, has_image), render)
    encoded = render.encode(pieces)
    ids: list[int] = []
    labels: list[int] = []
    block = layout.image_block()
    block_end = -1
    for (_, assistant), piece in zip(pieces, encoded):
        for token in piece:
            if token == layout.image_token_id:
                if assistant:
                    raise TextError("bad_json", f"{IMAGE_TOKEN} inside an assistant turn")
                ids.extend(block)
                labels.extend([IGNORE] * len(block))
                block_end = len(ids)
            else:
                ids.append(token)
                labels.append(token if assistant else IGNORE)
    if has_image and block_end < 0:
        raise TextError("template", f"{IMAGE_TOKEN} did not survive tokenization (is it a special token?)")
    if block_end > max_length:
        raise TextError(
            "too_long", f"image and task tokens end at position {block_end} > max_length {max_length}"
        )
    ids, labels = ids[:max_length], labels[:max_length]
    if all(label == IGNORE for label in labels):
        raise TextError("no_labels", f"no assistant token left within max_length {max_length}")
    return Tokenized(ids, labels)


def prompt_ids(tokenizer, layout: TokenLayout, prompt: str, *, image: bool = True) -> list[int]:
    """One user turn (`<image>` + newline + `prompt`) and the generation prompt, image block expanded.

    What the model reads before it answers: generation and probing use it (no answer text).
    """
    content = f"{IMAGE_TOKEN}\n{prompt}" if image else prompt
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )
    return layout.expand(tokenizer(text, add_special_tokens=False)["input_ids"])
