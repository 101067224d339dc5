"""Student presets: the paper's checkpoints by name, and a tiny seeded student built offline.

`tiny` writes a seeded random CLIP vision tower, a Llama-style causal LM and a
byte-level BPE tokenizer (trained here, from an embedded English text) to a
folder with `save_pretrained`; everything is then loaded back through
`from_pretrained`, exactly like a hub checkpoint. Tests and the demo use it, so
nothing here touches the network. Cost: the tiny LM's weights are random, so
its text is gibberish; only shapes, plumbing and gradients are meaningful.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

PAPER = {
    "vision_model": "openai/clip-vit-large-patch14-336",
    "llm": "meta-llama/Meta-Llama-3-8B-Instruct",
    "llm_phi3": "microsoft/Phi-3-mini-4k-instruct",
}
"""The paper's students (docs/METHOD.md), used by name only: never downloaded by tests."""
TINY_HEADS = {"head_width": 32, "head_num_heads": 4, "head_ffn_mult": 2}
"""Head sizes of the tiny preset (the tests' student)."""
TINY_STUDENT_DIR = "tiny-student"
"""Folder under the run's output where `model.preset = 'tiny'` builds its student."""
TINY_MARKER = "tiny_student.json"
"""Written last by `build_tiny_student`: the student under the folder is complete."""

# ChatML. `{% generation %}` marks assistant content, so that
# `apply_chat_template(..., return_assistant_tokens_mask=True)` yields the
# mask that puts labels on assistant turns only.
CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\n' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}{{- message['content'] + '<|im_end|>' -}}{%- endgeneration -%}"
    "{%- else -%}{{- message['content'] + '<|im_end|>' -}}{%- endif -%}"
    "{{- '\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>")

# A few hundred words of plain English: enough merges for short words to be
# single tokens; anything else falls back to bytes (byte-level BPE has all 256).
_TEXT = """
A photo of a small dog sitting on a wooden table next to a red cup. The dog looks at the camera.
Two people are walking along the beach at sunset, and the sky is orange and purple above the water.
What is in the image? The image shows a kitchen with a white sink, a window and green plants.
How many cars are parked on the street? There are three cars parked near the tall building.
Which object is closer to the camera, the chair or the lamp? The chair is closer than the lamp.
Describe the scene in detail. A man in a blue shirt is riding a bicycle down a busy city road,
past shops, trees and a bus stop. The weather is sunny and the road is dry.
Is the cat on the left or on the right of the sofa? The cat is on the left, sleeping on a pillow.
Estimate the distance between the two trees. They are about ten meters apart in the park.
The picture contains a plate of food with rice, vegetables and chicken, a fork and a glass of water.
A group of children play football on a green field while their parents watch from the side.
The bedroom has a large bed, a desk with a computer, books on a shelf and a lamp in the corner.
Answer the question using a single word or phrase. Yes. No. Red. Blue. Green. Two. Four. Left. Right.
The mountain is covered with snow and the lake below reflects the clouds in the bright blue sky.
An airplane is flying over the city; below it, boats move slowly on the river under the bridge.
Please look at the image carefully and tell me what the person is holding in their hand.
She is holding an umbrella because it is raining, and the street behind her is wet and shiny.
The train station is crowded with travelers carrying bags, and a clock on the wall shows noon.
"""


@dataclass(frozen=True, kw_only=True)
class TinyStudent:
    """Folders of a tiny student, ready for `ModelConfig(vision_model=..., llm=...)`."""

    vision_model: str
    """Folder of the CLIP vision tower (config + safetensors + image processor)."""
    llm: str
    """Folder of the causal LM (config + safetensors + tokenizer with chat template)."""
    num_image_tokens: int
    """Image tokens per image: (image_size / patch_size)^2, CLS dropped."""


def build_tokenizer(*, vocab_size: int = 512):
    """Byte-level BPE trained on `_TEXT`, wrapped as a PreTrainedTokenizerFast with a ChatML template.

    Byte-level: any text (unknown words, emoji, other scripts) encodes losslessly.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([line for line in _TEXT.splitlines() if line.strip()], trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        unk_token=None,
        additional_special_tokens=["<|im_start|>", "<|endoftext|>"],
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def build_tiny_student(
    folder: str | Path,
    *,
    seed: int = 0,
    image_size: int = 32,
    patch_size: int = 4,
    vision_hidden: int = 64,
    vision_layers: int = 2,
    llm_hidden: int = 64,
    llm_layers: int = 4,
    llm_heads: int = 4,
    vocab_size: int = 512,
) -> TinyStudent:
    """Write a seeded tiny CLIP vision tower and Llama-style LM (+ tokenizer, processor) under `folder`."""
    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        CLIPVisionModel,
        LlamaConfig,
        LlamaForCausalLM,
    )

    folder = Path(folder)
    vision_dir, llm_dir = folder / "vision", folder / "llm"
    torch.manual_seed(seed)

    vision = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=vision_hidden,
            intermediate_size=2 * vision_hidden,
            num_hidden_layers=vision_layers,
            num_attention_heads=4,
            image_size=image_size,
            patch_size=patch_size,
        )
    )
    vision.save_pretrained(vision_dir)
    # CLIP normalisation constants, resize + centre crop to image_size.
    CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    ).save_pretrained(vision_dir)

    tokenizer = build_tokenizer(vocab_size=vocab_size)
    llm = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=llm_hidden,
            intermediate_size=2 * llm_hidden,
            num_hidden_layers=llm_layers,
            num_attention_heads=llm_heads,
            num_key_value_heads=llm_heads,
            max_position_embeddings=1024,
            tie_word_embeddings=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=None,
        )
    )
    llm.generation_config.eos_token_id = tokenizer.eos_token_id
    llm.generation_config.pad_token_id = tokenizer.pad_token_id
    llm.save_pretrained(llm_dir)
    tokenizer.save_pretrained(llm_dir)
    num_image_tokens = (image_size // patch_size) ** 2
    (folder / TINY_MARKER).write_text(
        json.dumps({"seed": seed, "image_size": image_size, "num_image_tokens": num_image_tokens})
    )
    return TinyStudent(vision_model=str(vision_dir), llm=str(llm_dir), num_image_tokens=num_image_tokens)
