"""Stage 3a of the data path: conversation -> input ids and labels.

- LLaVA roles map to chat roles (human -> user, gpt -> assistant, system -> system).
- The text is rendered by the tokenizer's own chat template (`apply_chat_template`,
  tokenize=False); labels cover assistant turns only. Which characters belong to
  an assistant turn is found by rendering the conversation up to each assistant
  message with and without it (a generation prompt before it), so any template
  works, with or without `{% generation %}` markers. The rendered text is then
  tokenized piece by piece (prompt pieces, assistant pieces) in one batched
  tokenizer call. Cost: 2 template renders per assistant turn (~50 us each);
  token merges never cross a turn boundary, which is also how generation sees
  the prompt.
- The `<image>` placeholder (one per sample) becomes image tokens + task tokens
  (`TokenLayout.image_block`); a sample with an image but no placeholder gets
  one at the start of its first user turn, as LLaVA does.
- Truncation to `max_length` cuts text after the image block only; a sample
  whose image block itself does not fit is an error (never a cut image).
"""

from __future__ import annotations

from dataclasses import dataclass

from olavlm.schemas.errors import ConfigError, OlaError

from .tokens import IMAGE_TOKEN, TokenLayout

IGNORE = -100
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


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
    """LLaVA `conversations` -> chat messages; validates roles, types and the `<image>` placeholder."""
    if not isinstance(conversations, list) or not conversations:
        raise TextError("bad_json", "'conversations' must be a non-empty list")
    messages = []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str) or turn.get("from") not in ROLES:
            raise TextError("bad_json", f"turn {i} needs 'from' in {sorted(ROLES)} and a string 'value'")
        messages.append({"role": ROLES[turn["from"]], "content": turn["value"]})
    if not any(m["role"] == "assistant" for m in messages):
        raise TextError("bad_json", "no assistant ('gpt') turn: nothing to learn from")
    placeholders = sum(m["content"].count(IMAGE_TOKEN) for m in messages)
    if placeholders > 1:
        raise TextError("bad_json", f"{placeholders} {IMAGE_TOKEN} placeholders; one image per sample is supported")
    if has_image and placeholders == 0:
        first = next(i for i, m in enumerate(messages) if m["role"] == "user") if any(
            m["role"] == "user" for m in messages) else 0
        messages[first] = {**messages[first], "content": f"{IMAGE_TOKEN}\n{messages[first]['content']}"}
    if not has_image and placeholders:
        raise TextError("bad_json", f"text has {IMAGE_TOKEN} but the sample has no image file")
    return messages


class ChatRenderer:
    """`apply_chat_template(..., tokenize=False)` without its per-call overhead.

    Calls the tokenizer's compiled Jinja template directly (transformers caches the
    compilation); checked once against `apply_chat_template` on a probe conversation
    and replaced by it if they ever disagree. Cost: relies on a private transformers
    helper, guarded by that check and the fallback.
    """

    PROBE = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]

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

    def _slow(self, messages, generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def _fast(self, messages, generation_prompt: bool) -> str:
        return self._compiled.render(messages=messages, tools=None, documents=None,
                                     add_generation_prompt=generation_prompt, **self._kwargs)

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


def tokenize(conversations, tokenizer, layout: TokenLayout, *, has_image: bool, max_length: int,
             render: ChatRenderer | None = None) -> Tokenized:
    """LLaVA conversations -> expanded input ids (image + task tokens) and labels (assistant turns only).

    Pass a `ChatRenderer` made once per tokenizer when tokenizing many samples.
    """
    render = render or ChatRenderer(tokenizer)
    pieces = render_pieces(to_messages(conversations, has_image), render)
    encoded = tokenizer([text for text, _ in pieces], add_special_tokens=False)["input_ids"]
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
        raise TextError("too_long", f"image and task tokens end at position {block_end} > max_length {max_length}")
    ids, labels = ids[:max_length], labels[:max_length]
    if all(label == IGNORE for label in labels):
        raise TextError("no_labels", f"no assistant token left within max_length {max_length}")
    return Tokenized(ids, labels)


def prompt_ids(tokenizer, layout: TokenLayout, prompt: str, *, image: bool = True) -> list[int]:
    """One user turn (`<image>` + newline + `prompt`) and the generation prompt, image block expanded.

    What the model reads before it answers: generation and probing use it (no answer text).
    """
    content = f"{IMAGE_TOKEN}\n{prompt}" if image else prompt
    text = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)
    return layout.expand(tokenizer(text, add_special_tokens=False)["input_ids"])
