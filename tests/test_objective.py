"""The training objective, recomputed by hand from the formula of docs/METHOD.md (plain torch, no project loss code).

Per (task, layer): smoothL1(p, t) + 0.3 x InfoNCE(p, t), InfoNCE = cross-entropy of each valid
L2-normalised flattened prediction against the valid normalised targets, logits scaled by
exp(s) clamped at 100; each task = 0.5 x the sum over its layers; total = NTP + the task totals.
Text-only samples count neither as rows nor as negatives.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tests._student import SAMPLES, make_batch, tiny_model

INFO_NCE_WEIGHT = 0.3  # docs/METHOD.md, not read from the config: a changed default must fail here
TASK_WEIGHT = 0.5


def hand_term(p: torch.Tensor, t: torch.Tensor, valid: torch.Tensor, s: float) -> torch.Tensor:
    """smooth-L1 + 0.3 x InfoNCE for one (task, layer), written from the paper's formula."""
    p, t = p[valid].double(), t[valid].double()  # [n, T, D]: text-only rows dropped
    l1 = torch.stack([F.smooth_l1_loss(pi, ti) for pi, ti in zip(p, t)]).mean()
    pn = F.normalize(p.flatten(1), dim=-1)
    tn = F.normalize(t.flatten(1), dim=-1)
    logits = min(math.exp(s), 100.0) * pn @ tn.T  # [n, n]
    nce = F.cross_entropy(logits, torch.arange(len(p)))
    return l1 + INFO_NCE_WEIGHT * nce


def test_forward_equals_the_hand_computed_objective():
    model = tiny_model(seed=3)
    with torch.no_grad():
        model.logit_scales["seg"].fill_(5.0)  # exp(5) = 148: the clamp at 100 applies to seg only
        model.logit_scales["depth"].fill_(1.3)
    # A text-only sample in the middle: it must count neither as a row nor as a negative.
    samples = [SAMPLES[0], ("Say hello.", "Hello there.", False), SAMPLES[1], SAMPLES[2]]
    batch = make_batch(model, samples, seed=4)
    valid = batch["has_image"].bool()
    out = model(batch)
    with torch.no_grad():
        preds = model.predictions(batch)
        logits = model.logits(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])

    # NTP: next-token cross-entropy over the assistant tokens (make_batch labels nothing else).
    ntp = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).double(), batch["labels"][:, 1:].flatten(), ignore_index=-100
    )
    torch.testing.assert_close(out["ntp"].double(), ntp, rtol=1e-5, atol=1e-6)

    total = ntp
    for task, layers in model.layers.items():
        s = model.logit_scales[task].item()
        terms = []
        for layer in layers:
            name = f"{task}_l{layer}"
            term = hand_term(preds[name], batch["targets"][task], valid, s)
            torch.testing.assert_close(out[name].double(), term, rtol=1e-5, atol=1e-6, msg=name)
            terms.append(term)
        task_total = TASK_WEIGHT * sum(terms)
        torch.testing.assert_close(out[task].double(), task_total, rtol=1e-5, atol=1e-6, msg=task)
        total = total + task_total
    assert set(model.layers) == {"gen", "depth", "seg"}
    torch.testing.assert_close(out["loss"].double(), total, rtol=1e-5, atol=1e-6)

    # The text-only row is masked: any target there changes no embedding term.
    noisy = dict(batch, targets={t: v.clone() for t, v in batch["targets"].items()})
    for v in noisy["targets"].values():
        v[1] = torch.randn_like(v[1]) * 100
    with torch.no_grad():
        again = model(noisy)
    torch.testing.assert_close(again["loss"], out["loss"])
