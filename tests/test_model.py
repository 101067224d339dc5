"""The student: embedding losses reach heads, task tokens and projector; masks; hooks; save/load."""

from __future__ import annotations

import json

import pytest
import torch

from olavlm.schemas.config import scaled_layers
from olavlm.schemas.errors import ConfigError
from olavlm.trainer.student.build import load_student, save_student
from olavlm.trainer.student.model import Encoded
from tests._student import SAMPLES, SPECS, make_batch, sample_ids, tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def test_layers_default_to_scaled_paper_layers(model):
    assert model.layers == {t: scaled_layers(4)[t] for t in ("gen", "depth", "seg")}
    assert set(model.heads) == {f"{t}_l{layer}" for t, ls in model.layers.items() for layer in ls}
    # Task tokens sit right after the image tokens, in gen, depth, seg order.
    ids, _ = sample_ids(model, "Hi", "Yes.")
    start = ids.index(model.layout.image_token_id) + model.layout.num_image_tokens
    expected = [i for t in ("gen", "depth", "seg") for i in model.layout.task_token_ids[t]]
    assert ids[start : start + len(expected)] == expected


def test_forward_returns_named_terms_that_sum(model):
    out = model(make_batch(model, SAMPLES))
    tasks = ("gen", "depth", "seg")
    for task in tasks:
        layer_terms = [out[f"{task}_l{layer}"] for layer in model.layers[task]]
        assert torch.allclose(out[task], 0.5 * sum(layer_terms))
    assert torch.allclose(out["loss"], out["ntp"] + sum(out[t] for t in tasks))
    assert all(v.ndim == 0 and torch.isfinite(v) for v in out.values())


def test_each_embedding_loss_alone_reaches_head_task_tokens_and_projector(model):
    """The authors' code zeroes these losses; here each one must train its parts."""
    batch = make_batch(model, SAMPLES)
    projector = model.llava.model.multi_modal_projector
    k = model.config.tokens_per_task
    for task_index, task in enumerate(model.layout.tasks):
        for layer in model.layers[task]:
            model.zero_grad(set_to_none=True)
            model(batch)[f"{task}_l{layer}"].backward()
            name = f"{task}_l{layer}"
            for pname, p in model.heads[name].named_parameters():
                assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}.{pname} got no gradient"
            for other in set(model.heads) - {name}:
                assert all(p.grad is None for p in model.heads[other].parameters()), other
            rows = model.task_embeddings.grad[task_index * k : (task_index + 1) * k]
            assert (rows.abs().sum(1) > 0).all(), f"{name}: some {task} task tokens got no gradient"
            assert projector.linear_1.weight.grad.abs().sum() > 0, f"{name}: projector got no gradient"
            assert model.logit_scales[task].grad.abs() > 0


def test_right_padding_does_not_change_predictions(model):
    model.eval()
    with torch.no_grad():
        short = model.predictions(make_batch(model, SAMPLES[:1]))
        padded = model.predictions(
            make_batch(model, SAMPLES[:1], pad_to=len(sample_ids(model, *SAMPLES[0][:2])[0]) + 9)
        )
    for name in short:
        torch.testing.assert_close(short[name], padded[name], atol=1e-5, rtol=1e-5)
    model.train()


def test_layer_i_is_hidden_states_i_for_every_layer(model):
    """Paper numbering: layer i = transformers' hidden_states[i] (0 = embeddings; the last is normed)."""
    batch = make_batch(model, SAMPLES)
    num_layers = model.llava.config.text_config.num_hidden_layers
    layers = list(range(1, num_layers + 1))
    with torch.no_grad():
        enc = model.encode(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], layers)
        embeds = model.embed(batch["input_ids"], batch["pixel_values"], enc.image_mask)
        ref = model.llava.model.language_model(
            inputs_embeds=embeds, attention_mask=batch["attention_mask"], output_hidden_states=True
        ).hidden_states
    assert len(ref) == num_layers + 1 and sorted(enc.states) == layers
    for layer in layers:
        torch.testing.assert_close(enc.states[layer], ref[layer])
    with pytest.raises(ValueError, match="outside the LLM"):
        model.encode(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], [0])


def test_each_head_reads_hidden_states_of_its_paper_layer(model):
    """Every head's prediction equals the head applied to hidden_states[layer] from output_hidden_states=True."""
    batch = make_batch(model, SAMPLES)
    model.eval()
    with torch.no_grad():
        got = model.predictions(batch)
        embeds = model.embed(
            batch["input_ids"], batch["pixel_values"], model.layout.locate(batch["input_ids"])[0]
        )
        hidden_states = model.llava.model.language_model(
            inputs_embeds=embeds, attention_mask=batch["attention_mask"], output_hidden_states=True
        ).hidden_states
        for name, pred in got.items():
            task, layer = name.rsplit("_l", 1)
            # Corrupt every other layer's state: only hidden_states[layer] may matter to this head.
            states = {i: torch.full_like(h, float("nan")) for i, h in enumerate(hidden_states)}
            states[int(layer)] = hidden_states[int(layer)]
            enc = Encoded(hidden_states[-1], states, *model.layout.locate(batch["input_ids"]))
            torch.testing.assert_close(model.predict(enc, batch["attention_mask"])[name], pred)
    model.train()


def test_text_only_samples_contribute_no_embedding_loss(model):
    mixed = SAMPLES[:2] + [("Say hello.", "Hello.", False)]
    batch = make_batch(model, mixed)
    out = model(batch)
    assert torch.isfinite(out["loss"])
    # Changing the text-only sample's targets changes nothing.
    other = dict(batch, targets={t: v.clone() for t, v in batch["targets"].items()})
    for v in other["targets"].values():
        v[2] = torch.randn_like(v[2]) * 10
    out2 = model(other)
    for name in model.heads:
        torch.testing.assert_close(out[name], out2[name])
    # A batch of text only: NTP alone, every embedding term exactly 0.
    text = make_batch(model, [("Say hello.", "Hello.", False), ("Count.", "One two.", False)])
    model.zero_grad(set_to_none=True)
    out3 = model(text)
    assert all(out3[name].item() == 0.0 for name in model.heads)
    assert out3["loss"].item() == pytest.approx(out3["ntp"].item())
    out3["loss"].backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    # The NTP parts learn: every LLM block and the LM head get a non-zero gradient.
    for prefix in (
        "llava.model.language_model.layers.0.",
        "llava.model.language_model.layers.3.",
        "llava.lm_head.",
    ):
        part = [g for name, g in grads.items() if name.startswith(prefix)]
        assert part and all(g is not None for g in part), prefix
        assert sum(float(g.abs().sum()) for g in part) > 0, prefix
    # The heads and temperatures get exactly nothing (None or zeros), so AdamW cannot move them.
    for name, g in grads.items():
        if name.startswith(("heads.", "logit_scales.")):
            assert g is None or not g.any(), name
    # With images the projector learns from NTP too: a mixed batch without targets reaches it.
    mixed_ntp = make_batch(model, mixed)
    mixed_ntp.pop("targets")
    model(mixed_ntp)["loss"].backward()
    projector = [
        p.grad
        for name, p in model.named_parameters()
        if name.startswith("llava.model.multi_modal_projector.")
    ]
    assert projector and all(g is not None and g.abs().sum() > 0 for g in projector)
    model.zero_grad(set_to_none=True)


def test_image_flag_without_image_tokens_fails_loudly(model):
    batch = make_batch(model, [("Say hello.", "Hello.", False)])
    batch["has_image"] = torch.tensor([True])
    with pytest.raises(ValueError, match="no image tokens"):
        model(batch)


def test_ntp_only_without_targets(model):
    batch = make_batch(model, SAMPLES)
    batch.pop("targets")
    assert set(model(batch)) == {"ntp", "loss"}
    assert set(model(make_batch(model, SAMPLES), distill=False)) == {"ntp", "loss"}


def test_labels_on_image_and_task_tokens_are_ignored(model):
    batch = make_batch(model, SAMPLES)
    noisy = dict(batch, labels=batch["input_ids"].clone())  # labels everywhere, image/task tokens included
    image_mask, task_masks = model.layout.locate(batch["input_ids"])
    special = image_mask | torch.stack(list(task_masks.values())).any(0)
    reference = dict(batch, labels=batch["input_ids"].masked_fill(special, -100))
    with torch.no_grad():
        torch.testing.assert_close(model(noisy, distill=False)["ntp"], model(reference, distill=False)["ntp"])


def test_save_load_round_trip(model, tmp_path):
    model.eval()
    batch = make_batch(model, SAMPLES)
    path = save_student(model, tmp_path / "ckpt")
    assert not list(tmp_path.glob(".ckpt.tmp-*"))

    loaded = load_student(path).eval()
    with torch.no_grad():
        a, b = model(batch), loaded(batch)
    for name in a:
        torch.testing.assert_close(a[name], b[name])
    meta = json.loads((path / "olavlm.json").read_text())
    assert meta["target_shapes"] == {t: list(s) for t, s in SPECS.items()}
    assert not list(path.rglob("*.bin")) and not list(path.rglob("*.pt"))  # safetensors + JSON only
    # Overwriting an existing checkpoint is atomic too.
    save_student(model, path)
    assert (path / "olavlm.safetensors").exists()
    model.train()


def test_gradient_checkpointing_gives_the_same_losses_and_grads():
    from tests._student import tiny_model as build

    plain, ckpt = build(seed=1), build(seed=1, gradient_checkpointing=True)
    batch = make_batch(plain, SAMPLES)
    a, b = plain(batch), ckpt(batch)
    a["loss"].backward()
    b["loss"].backward()
    for name in a:
        torch.testing.assert_close(a[name], b[name])
    torch.testing.assert_close(plain.task_embeddings.grad, ckpt.task_embeddings.grad)
    head = "depth_l1"
    torch.testing.assert_close(plain.heads[head].out_proj.weight.grad, ckpt.heads[head].out_proj.weight.grad)


@pytest.mark.parametrize("stage", ["pt", "vpt", "ift"])
def test_every_trainable_parameter_gets_a_gradient_even_without_images(stage):
    """What DDP without find_unused_parameters needs of every backward (parallel.py): a batch of text only
    reaches the projector too (times 0, as LLaVA's training does)."""
    from olavlm.trainer.freeze import apply_stage, uses_embedding_losses
    from tests._student import tiny_model as build

    model = build(seed=2)
    apply_stage(model, stage)
    text_only = [("Say hello.", "Hello.", False), ("Count.", "One two.", False)]
    for samples in (text_only, SAMPLES):
        model.zero_grad(set_to_none=True)
        model(make_batch(model, samples), distill=uses_embedding_losses(stage))["loss"].backward()
        missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert not missing, f"{stage}, images={samples[0][2]}: no gradient for {missing[:5]}"
    projector = model.llava.model.multi_modal_projector.linear_1.weight
    model.zero_grad(set_to_none=True)
    model(make_batch(model, text_only))["loss"].backward()
    assert not projector.grad.any()  # a zero gradient: the text moves nothing


def test_bf16_targets_are_accepted(model):
    batch = make_batch(model, SAMPLES)
    as_bf16 = dict(batch, targets={t: v.bfloat16() for t, v in batch["targets"].items()})
    with torch.no_grad():
        a, b = model(batch), model(as_bf16)
    torch.testing.assert_close(a["loss"], b["loss"], atol=2e-2, rtol=1e-2)


def test_paper_layers_and_the_scaling_rule():
    from olavlm.schemas.config import PAPER_LAYERS_32

    assert scaled_layers(32) == PAPER_LAYERS_32 == {"depth": (8, 20), "seg": (10, 18), "gen": (12, 20)}
    # round(i * n / 32), kept in 1..n: Phi-3 and Llama-3 have 32; a 16- and a 4-layer LLM by hand.
    assert scaled_layers(16) == {"depth": (4, 10), "seg": (5, 9), "gen": (6, 10)}
    assert scaled_layers(4) == {"depth": (1, 2), "seg": (1, 2), "gen": (2,)}
    assert scaled_layers(1) == {"depth": (1,), "seg": (1,), "gen": (1,)}


def test_another_checkpoint_format_is_refused_in_one_line(model, tmp_path):
    """Only the current olavlm.json format loads; another names the file, both versions and what to do."""
    save_student(model, tmp_path / "old")
    meta = json.loads((tmp_path / "old" / "olavlm.json").read_text())
    (tmp_path / "old" / "olavlm.json").write_text(json.dumps({**meta, "format": 1}))
    with pytest.raises(
        ConfigError, match=r"olavlm\.json: checkpoint format 1; this olavlm reads format 2 only"
    ):
        load_student(tmp_path / "old")
