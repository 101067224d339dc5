"""Export an olavlm checkpoint to a plain transformers LLaVA checkpoint.

The export loads with `LlavaForConditionalGeneration` and `AutoProcessor` without olavlm: the
LLaVA weights with the trained task-token embeddings written into their vocabulary rows (heads
and logit scales dropped), the tokenizer (task tokens as added special tokens), a `LlavaProcessor`
whose `<image>` expands to exactly the model's image tokens, and
`generation_config.suppress_tokens` for image and task tokens. Design choice: the processor's chat
template renders an image item as `<image>` followed by the task tokens, since the processor only
expands `<image>` (with a bare text prompt, write `task_token_text()` after `<image>`). Cost: one
extra full copy of the LLaVA weights on disk.
"""

from __future__ import annotations

import json
from pathlib import Path

from olavlm.trainer.atomic import atomic_dir
from olavlm.trainer.student.build import load_student
from olavlm.trainer.student.model import OlaVlm
from olavlm.trainer.student.tokens import IMAGE_TOKEN, TokenLayout, task_token_strings


def task_token_text(layout: TokenLayout) -> str:
    """The task tokens as text, in sequence order (write them right after `<image>`)."""
    return "".join(
        t for task, ids in layout.task_token_ids.items() for t in task_token_strings(task, len(ids))
    )


def processor_chat_template(llm_template: str, layout: TokenLayout) -> str:
    """A template taking multimodal messages ({'type': 'image'|'text'} items) that flattens
    them to text, an image item becoming `<image>` + task tokens + newline, then runs the LLM's template."""
    block = (IMAGE_TOKEN + task_token_text(layout)).replace("'", "\\'")
    prefix = (
        "{%- set ola = namespace(messages=[]) -%}"
        "{%- for message in messages -%}"
        "{%- if message['content'] is string -%}"
        "{%- set ola.messages = ola.messages + [message] -%}"
        "{%- else -%}"
        "{%- set part = namespace(text='') -%}"
        "{%- for item in message['content'] -%}"
        "{%- if item['type'] == 'image' -%}{%- set part.text = part.text + '" + block + "\n' -%}"
        "{%- elif item['type'] == 'text' -%}{%- set part.text = part.text + item['text'] -%}{%- endif -%}"
        "{%- endfor -%}"
        "{%- set ola.messages = ola.messages + [{'role': message['role'], 'content': part.text}] -%}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- set messages = ola.messages -%}"
    )
    return prefix + llm_template


def build_processor(model: OlaVlm):
    """The LlavaProcessor of a student (image processor + tokenizer + chat template)."""
    from transformers import LlavaProcessor

    if model.tokenizer is None or model.image_processor is None:
        raise ValueError("the model has no tokenizer / image processor to export")
    vision = model.llava.config.vision_config
    template = model.tokenizer.chat_template
    if not isinstance(template, str):
        raise ValueError("the LLM's tokenizer has no (single) chat template to export")
    return LlavaProcessor(
        image_processor=model.image_processor,
        tokenizer=model.tokenizer,
        patch_size=vision.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=processor_chat_template(template, model.layout),
    )


def export_llava(checkpoint_dir: str | Path, out_dir: str | Path) -> Path:
    """Write a plain LLaVA checkpoint of an olavlm checkpoint to `out_dir` (atomically)."""
    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    model = load_student(checkpoint_dir)
    llava = model.merged_llava()
    special = [model.layout.image_token_id, *model.task_token_ids.tolist()]
    llava.generation_config.suppress_tokens = special
    processor = build_processor(model)

    with atomic_dir(out_dir) as tmp:
        llava.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        info = {
            "exported_from": str(checkpoint_dir),
            "task_tokens": task_token_text(model.layout),
            "num_image_tokens": model.layout.num_image_tokens,
            "usage": "put the task tokens right after <image> (the processor chat template does it)",
        }
        (tmp / "olavlm_export.json").write_text(json.dumps(info, indent=2))
    return out_dir
