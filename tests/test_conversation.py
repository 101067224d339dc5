"""One conversation check for conversion and training (schemas/conversation.py)."""

from __future__ import annotations

import json

import pytest

from olavlm.schemas.conversation import ConversationError, caption_conversation, validate_conversation
from tests._trainer_data import jpeg, tiny_text_setup

OK = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A dog."}]

BAD = {  # name -> (conversations, has_image, words of the reason)
    "robot role": (
        [{"from": "robot", "value": "<image>\nHi"}, {"from": "gpt", "value": "Yo."}],
        True,
        "'robot'",
    ),
    "not a list": ({"from": "human", "value": "x"}, True, "non-empty list"),
    "empty list": ([], True, "non-empty list"),
    "turn not an object": (["hi", {"from": "gpt", "value": "x"}], True, "not an object"),
    "value not a string": (
        [{"from": "human", "value": 3}, {"from": "gpt", "value": "x"}],
        True,
        "not a string",
    ),
    "empty value": (
        [{"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "  "}],
        True,
        "empty",
    ),
    "no assistant": ([{"from": "human", "value": "<image>\nHi"}], True, "no assistant"),
    "two placeholders": (
        [{"from": "human", "value": "<image><image>\nHi"}, {"from": "gpt", "value": "x"}],
        True,
        "2 <image>",
    ),
    "placeholder without image": (OK, False, "no image"),
    "placeholder in the answer": (
        [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "<image>"}],
        True,
        "assistant turn",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_refused_with_a_reason(case):
    conversations, has_image, words = BAD[case]
    with pytest.raises(ConversationError) as info:
        validate_conversation(conversations, has_image)
    assert info.value.reason == "bad_json" and words in str(info.value)


def test_accepted_conversations_become_messages():
    assert validate_conversation(OK, True) == [
        {"role": "user", "content": "<image>\nWhat?"},
        {"role": "assistant", "content": "A dog."},
    ]
    # an image without a placeholder gets one in the first user turn, as LLaVA does
    messages = validate_conversation(
        [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello."},
        ],
        True,
    )
    assert messages[1]["content"] == "<image>\nHi" and messages[0]["content"] == "Be brief."
    assert caption_conversation(" a cat ", "Describe.") == [
        {"from": "human", "value": "<image>\nDescribe."},
        {"from": "gpt", "value": "a cat"},
    ]


def test_trainer_refuses_exactly_what_conversion_refuses():
    """The text stage raises TextError with the validator's reason and message for every bad case."""
    from olavlm.trainer.data.text import TextError, tokenize

    tokenizer, layout, _ = tiny_text_setup()
    for case, (conversations, has_image, words) in BAD.items():
        with pytest.raises(TextError) as info:
            tokenize(conversations, tokenizer, layout, has_image=has_image, max_length=256)
        assert info.value.reason == "bad_json" and words in str(info.value), case


def test_from_llava_refuses_what_training_would_and_counts_reconcile(tmp_path):
    from olavlm.schemas.corpus import iter_samples
    from olavlm.schemas.corpus_build import LLAVA_REPORT, convert_llava
    from olavlm.trainer.data.text import tokenize

    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.jpg").write_bytes(jpeg(1))
    entries = [
        {"id": "ok", "image": "a.jpg", "conversations": OK},
        {"id": "robot", "image": "a.jpg", "conversations": BAD["robot role"][0]},
        {"id": "text", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hey."}]},
        {"id": "noimg", "conversations": OK},  # <image> but no image
        {"id": "missing", "image": "nope.jpg", "conversations": OK},
        {"id": "empty", "image": "a.jpg", "conversations": BAD["empty value"][0]},
        7,
    ]
    (tmp_path / "l.json").write_text(json.dumps(entries))
    report = convert_llava(
        str(tmp_path / "l.json"), str(tmp_path / "img"), str(tmp_path / "out"), shard_size=2
    )
    refused = {p["id"]: p["reason"] for p in report.problems}
    assert sorted(refused, key=str) == sorted(["robot", "noimg", "missing", "empty", None], key=str)
    assert "'robot'" in refused["robot"] and "no image" in refused["noimg"] and "empty" in refused["empty"]
    assert report.entries == len(entries) == report.samples + len(report.problems)
    saved = json.loads((tmp_path / "out" / LLAVA_REPORT).read_text())
    assert (saved["entries"], saved["samples"], saved["refused"]) == (7, 2, 5)
    # everything written tokenizes
    tokenizer, layout, _ = tiny_text_setup()
    for shard in report.shards:
        for sample in iter_samples(str(tmp_path / "out" / shard)):
            conversations = json.loads(sample.files["json"])["conversations"]
            tokenize(conversations, tokenizer, layout, has_image="jpg" in sample.files, max_length=256)


def test_skipped_samples_are_summarised_per_reason_not_logged_one_by_one(tmp_path, caplog):
    """on_missing='skip': one line at a reason's first sample, then per-reason counts with the first keys."""
    import logging

    from olavlm.schemas.config import DataConfig
    from olavlm.schemas.corpus import TarShardWriter
    from olavlm.trainer.data.loader import build_loader

    with TarShardWriter(str(tmp_path / "s-000.tar")) as writer:
        for i in range(12):
            turns = OK if i % 4 == 0 else BAD["robot role"][0]
            writer.write(f"k{i:02d}", {"jpg": jpeg(i), "json": json.dumps({"conversations": turns}).encode()})
    tokenizer, layout, transform = tiny_text_setup()
    loader = build_loader(
        DataConfig(data=str(tmp_path), batch_size=4, num_workers=0, on_missing="skip"),
        tokenizer=tokenizer,
        layout=layout,
        transform=transform,
    )
    with caplog.at_level(logging.WARNING, logger="olavlm.trainer.data.loader"):
        for _batch, state in loader:  # 3 kept samples per epoch, up to the first batch of epoch 1
            if state["epoch"] >= 1 and state["batch"] > 0:
                break
    assert state["skipped"]["bad_json"] >= 9
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines  # not one per skipped sample
    assert "'robot'" in lines[0] and "key 'k" in lines[0]
    assert "end of epoch 0" in lines[1] and "bad_json: 9 (first: s-000/k" in lines[1]
