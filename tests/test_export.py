"""Export to plain LLaVA: loads with transformers alone, same logits, same prompt ids; generation runs."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from olavlm.trainer.eval.generate import generate, load_for_generation
from olavlm.trainer.student.build import build_student, load_student, save_student
from olavlm.trainer.student.export import export_llava
from tests._student import tiny_model

# Runs with olavlm made unimportable: the export must be a standard LLaVA checkpoint.
STANDALONE = textwrap.dedent(
    """
    import sys, importlib.abc
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "olavlm" or name.startswith("olavlm."):
                raise ImportError("olavlm is blocked in this check")
    sys.meta_path.insert(0, Block())
    import numpy as np, torch
    from PIL import Image
    from safetensors.torch import save_file
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    out, result = sys.argv[1], sys.argv[2]
    model = LlavaForConditionalGeneration.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    image = Image.fromarray(np.arange(40 * 48 * 3, dtype=np.uint8).reshape(40, 48, 3))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(images=image, text=text, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    save_file({"input_ids": inputs["input_ids"], "pixel_values": inputs["pixel_values"], "logits": logits}, result)
    """
)


def _image() -> Image.Image:
    return Image.fromarray(np.arange(40 * 48 * 3, dtype=np.uint8).reshape(40, 48, 3))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    model = tiny_model()
    with torch.no_grad():  # trained task tokens differ from their initial vocabulary rows
        model.task_embeddings.add_(torch.randn_like(model.task_embeddings))
    ckpt = save_student(model, root / "ckpt")
    out = export_llava(ckpt, root / "llava")
    return ckpt, out


def test_export_matches_logits_and_prompt_ids(exported):
    """In-process (fast): transformers' own classes on the export vs the olavlm model."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    ckpt, out = exported
    llava = LlavaForConditionalGeneration.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]}
    ]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(images=_image(), text=text, return_tensors="pt")
    model = load_student(ckpt).eval()
    _, prepare, _, _ = load_for_generation(ckpt)
    assert inputs["input_ids"].tolist() == prepare(_image(), "What is in the image?")["input_ids"].tolist()
    with torch.no_grad():
        got = llava(**inputs).logits
        expected = model.logits(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"])
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.slow  # a fresh interpreter importing torch + transformers: ~10-20 s
def test_export_loads_without_olavlm_and_matches_logits(exported, tmp_path):
    ckpt, out = exported
    result = tmp_path / "standalone.safetensors"
    proc = subprocess.run(
        [sys.executable, "-c", STANDALONE, str(out), str(result)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    from safetensors.torch import load_file

    got = load_file(result)
    model = load_student(ckpt).eval()
    # The processor's prompt equals the one olavlm builds (chat template + image block with task tokens).
    _, prepare, _, _ = load_for_generation(ckpt)
    ours = prepare(_image(), "What is in the image?")
    assert got["input_ids"].tolist() == ours["input_ids"].tolist()
    torch.testing.assert_close(got["pixel_values"], ours["pixel_values"])
    n_task = len(model.task_token_ids)
    assert torch.isin(got["input_ids"], model.task_token_ids).sum() == n_task
    with torch.no_grad():
        expected = model.logits(got["input_ids"], torch.ones_like(got["input_ids"]), got["pixel_values"])
    torch.testing.assert_close(got["logits"], expected, atol=1e-4, rtol=1e-4)


def test_export_from_a_trainable_only_checkpoint_equals_the_full_one(exported, tmp_path):
    """A PT checkpoint without the frozen weights exports the same plain LLaVA (rebuilt from its base)."""
    from safetensors.torch import load_file
    from transformers import LlavaForConditionalGeneration

    from olavlm.trainer.freeze import apply_stage
    from olavlm.trainer.student.build import TRAINABLE_FILE, save_student

    ckpt, out = exported
    model = load_student(ckpt)
    apply_stage(model, "pt")
    slim = save_student(model, tmp_path / "slim", trainable_only=True)
    assert (slim / TRAINABLE_FILE).exists() and not (slim / "llava").exists()
    again = export_llava(slim, tmp_path / "llava")
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert files and files == sorted(p.name for p in again.glob("*.safetensors"))
    for name in files:
        a, b = load_file(out / name), load_file(again / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    LlavaForConditionalGeneration.from_pretrained(again)  # transformers alone loads it


def test_export_has_no_heads_and_only_safe_files(exported):
    _, out = exported
    from safetensors import safe_open

    names = set()
    for f in out.glob("*.safetensors"):
        with safe_open(f, "pt") as s:
            names |= set(s.keys())
    assert names and not any("heads" in n or "logit_scales" in n or "task_embeddings" in n for n in names)
    assert not list(out.rglob("*.bin")) and not list(out.rglob("*.pt")) and not list(out.rglob("*.pkl"))


def test_generation_runs_with_export_and_checkpoint(exported):
    ckpt, out = exported
    a = generate(out, _image(), "What is in the image?", max_new_tokens=6)
    b = generate(ckpt, _image(), "What is in the image?", max_new_tokens=6)
    assert isinstance(a, str) and a == b  # greedy, same weights, same prompt ids


def test_student_from_plain_llava_checkpoint(exported):
    """An exported (or any transformers) LLaVA starts a new student; its task tokens come from the vocabulary."""
    from tests._student import SPECS, tiny_config

    ckpt, out = exported
    trained = load_student(ckpt).eval()
    fresh = build_student(tiny_config(llava_checkpoint=str(out)), SPECS).eval()
    assert fresh.layout == trained.layout
    torch.testing.assert_close(fresh.task_embeddings, trained.task_embeddings)
    ids = torch.tensor([trained.layout.expand([5, trained.layout.image_token_id, 7, 9])])
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            fresh.logits(ids, torch.ones_like(ids), pixels), trained.logits(ids, torch.ones_like(ids), pixels)
        )


def test_pad_trained_model_gets_the_same_pixels_in_training_generate_and_export(tmp_path):
    """A model trained with image_aspect_ratio 'pad': the data path, `ola generate` and the exported
    processor all give it the padded image (LLaVA-1.5's expand2square with the mean colour)."""
    import io

    from olavlm.trainer.data.images import ImageTransform, with_aspect_ratio

    model = tiny_model(seed=3)
    crop_transform = ImageTransform.from_processor(model.image_processor)
    model.image_processor = with_aspect_ratio(model.image_processor, "pad")  # what train() does for VPT/IFT
    checkpoint = save_student(model, tmp_path / "ckpt")
    export_llava(checkpoint, tmp_path / "export")
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (30, 60, 3), dtype=np.uint8))  # wide: pad adds bands
    png = io.BytesIO()
    image.save(png, format="PNG")

    loaded = load_student(checkpoint)
    transform = ImageTransform.from_processor(loaded.image_processor)
    assert transform.pad and not crop_transform.pad

    def normalised(raw):
        mean = torch.tensor(transform.mean).view(3, 1, 1) * 255
        std = torch.tensor(transform.std).view(3, 1, 1) * 255
        return (torch.from_numpy(raw).float() - mean) / std

    training = normalised(transform(png.getvalue()))
    generated = load_for_generation(checkpoint)[1](image, "Hi")["pixel_values"][0]
    exported = load_for_generation(tmp_path / "export")[1](image, "Hi")["pixel_values"][0]
    torch.testing.assert_close(generated, exported)
    assert (training - generated).abs().max() < 0.05  # uint8 rounding of the resized image
    # Independent route: pad by hand as LLaVA's expand2square does, then the plain CLIP processor.
    background = tuple(int(m * 255) for m in transform.mean)
    square = Image.new("RGB", (60, 60), background)
    square.paste(image, (0, 15))
    from transformers import CLIPImageProcessor

    clip = CLIPImageProcessor(
        size={"shortest_edge": transform.shortest_edge},
        crop_size={"height": transform.crop[0], "width": transform.crop[1]},
    )
    torch.testing.assert_close(generated, clip(images=square, return_tensors="pt")["pixel_values"][0])
    # and the padded input really differs from the centre crop of the same image
    assert (normalised(crop_transform(png.getvalue())) - training).abs().max() > 0.5
