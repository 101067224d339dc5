"""The probe finds a known signal: a linear image of the target at one layer, noise at the others.

Synthetic hidden states drive `train_probes` / `score_probes` (the loops `probe_checkpoint`
runs on the frozen model's states), so a probe that learns nothing, steps the wrong
probe, or reads the wrong layer cannot pass.
"""

from __future__ import annotations

import torch

from olavlm.schemas.spec import TeacherSpec
from olavlm.trainer.eval.probe import ProbeConfig, _build_probes, score_probes, train_probes

LAYERS = (1, 2, 3, 4)
SIGNAL = 3
T, D = 2, 6  # target shape
L, WIDTH = 5, 24  # hidden tokens, LLM width


def synthetic(n: int, seed: int):
    """Batches of 16 with targets and their hidden states {layer: [B, L, WIDTH]}."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(T * D, WIDTH, generator=torch.Generator().manual_seed(99))  # fixed across splits
    batches = []
    for start in range(0, n, 16):
        target = torch.randn(16, T, D, generator=gen)
        states = {layer: torch.randn(16, L, WIDTH, generator=gen) for layer in LAYERS}
        # Every token of the signal layer carries the same linear image of the flattened target.
        states[SIGNAL] = (target.flatten(1) @ mix)[:, None, :] + 0.05 * torch.randn(
            16, L, WIDTH, generator=gen
        )
        keys = [f"k{seed}-{start + i}" for i in range(16)]
        batches.append({"keys": keys, "targets": {"depth": target}, "states": states})
    return batches


def test_probe_ranks_the_signal_layer_first_by_a_clear_margin(one_thread):
    torch.manual_seed(0)
    spec = TeacherSpec(name="depth", kind="synthetic", model="m", shape=(T, D))
    config = ProbeConfig(width=32, num_heads=4, lr=1e-2)
    todo = [("depth", layer, 0) for layer in LAYERS]
    probes = _build_probes(todo, {"depth": spec}, WIDTH, config, "cpu")
    train, heldout = synthetic(16 * 40, seed=1), synthetic(64, seed=2)
    steps = train_probes(probes, todo, iter(train), lambda b: b["states"], steps=40, lr=config.lr)
    assert steps == 40
    scores, count = score_probes(probes, todo, iter(heldout), lambda b: b["states"])
    assert count == 64
    by_layer = {layer: scores[("depth", layer, 0)] for layer in LAYERS}
    best = max(by_layer, key=by_layer.get)
    others = max(v for layer, v in by_layer.items() if layer != SIGNAL)
    assert best == SIGNAL, by_layer
    assert by_layer[SIGNAL] > 0.6 and by_layer[SIGNAL] - others > 0.4, by_layer
