"""ChatRenderer.encode (trainer/data/text.py): the per-piece backend encoding and its prompt memo give the
tokenizer's own ids."""

from __future__ import annotations

from olavlm.trainer.data.text import ChatRenderer, render_pieces, to_messages, tokenize
from tests._trainer_data import tiny_text_setup

CONVERSATIONS = [
    [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A dog, naïvely drawn."}],
    [
        {"from": "human", "value": "<image>\nWhat is it?"},
        {"from": "gpt", "value": "Two   spaces\tand a tab."},
        {"from": "human", "value": "Colour? 色"},
        {"from": "gpt", "value": "Red <|im_end|> inside."},
    ],
    [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "What?\n<image>"},
        {"from": "gpt", "value": "Nothing."},
    ],
]


def test_encode_equals_the_tokenizer_call_with_and_without_the_memo():
    tokenizer, layout, _ = tiny_text_setup()
    render = ChatRenderer(tokenizer)
    assert render._backend is not None  # the fast path is the one under test
    for conv in CONVERSATIONS * 2:  # the second pass reads prompt pieces from the memo
        pieces = render_pieces(to_messages(conv, True), render)
        want = tokenizer([text for text, _ in pieces], add_special_tokens=False)["input_ids"]
        assert render.encode(pieces) == want
    assert 0 < len(render._memo) <= len(CONVERSATIONS) * 2  # prompt pieces only
    assert all(text in render._memo for text, assistant in pieces if not assistant)
    assert not any(text in render._memo for text, assistant in pieces if assistant)
    # tokenize() itself: the same ids through the fast path and through the public API
    slow = ChatRenderer(tokenizer)
    slow._backend = None
    for conv in CONVERSATIONS:
        fast_out = tokenize(conv, tokenizer, layout, has_image=True, max_length=4096, render=render)
        slow_out = tokenize(conv, tokenizer, layout, has_image=True, max_length=4096, render=slow)
        assert (
            fast_out == slow_out
            and fast_out.input_ids.count(layout.image_token_id) == layout.num_image_tokens
        )


def test_memo_is_bounded():
    tokenizer, _, _ = tiny_text_setup()
    render = ChatRenderer(tokenizer)
    render.MEMO_SIZE = 3
    for i in range(10):
        text = f"prompt {i}"
        assert render.encode([(text, False)]) == [tokenizer(text, add_special_tokens=False)["input_ids"]]
        assert len(render._memo) <= 3
