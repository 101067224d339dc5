"""Layer-wise probing: scores per (checkpoint, teacher, layer), the plot, per-layer resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from olavlm.schemas.cache import TargetCache
from olavlm.schemas.config import ModelConfig
from olavlm.trainer.model import OlaVlm
from olavlm.trainer.presets import build_tiny_student
from olavlm.trainer.probe import ProbeConfig, is_heldout, run_probe

from .conftest import corpus_keys, write_random_teacher


@pytest.fixture(scope="module")
def probe_setup(tmp_path_factory, demo_corpus):
    root = tmp_path_factory.mktemp("probe")
    shards, hashes = corpus_keys(demo_corpus)
    cache = TargetCache(root / "cache")
    write_random_teacher(cache, "depth", shards, shape=(16, 8), sha256s=hashes)
    write_random_teacher(cache, "gen", shards, shape=(1, 8), sha256s=hashes, seed=5)
    tiny = build_tiny_student(root / "student")
    config = ModelConfig(vision_model=tiny.vision_model, llm=tiny.llm, tasks=("depth", "gen"), head_width=32,
                         head_num_heads=4, layers={"depth": (1,), "gen": (2,)})
    checkpoints = []
    for seed in (0, 1):
        import torch

        torch.manual_seed(seed)
        model = OlaVlm.from_config(config, cache.specs())
        checkpoints.append(str(model.save_pretrained(root / f"ckpt{seed}")))
    return root, str(cache.root.path), checkpoints


@pytest.mark.timeout(300)
def test_probe_scores_plot_and_resume(probe_setup, demo_corpus):
    root, cache, checkpoints = probe_setup
    out = root / "probe-out"
    config = ProbeConfig(layers=(0, 2), steps=3, batch_size=4, width=16, heldout_percent=30)
    rows = run_probe(checkpoints, data=demo_corpus, cache=cache, out=str(out), config=config, device="cpu")
    assert {(r["checkpoint"], r["teacher"], r["layer"]) for r in rows} == {
        (c, t, layer) for c in ("ckpt0", "ckpt1") for t in ("depth", "gen") for layer in (0, 2)}
    heldout = sum(is_heldout(f"demo-{i:06d}", 30) for i in range(24))
    assert all(-1.0 <= r["score"] <= 1.0 and r["heldout_images"] == heldout for r in rows)
    assert [r["distilled"] for r in rows if r["checkpoint"] == "ckpt0" and r["teacher"] == "gen"] == [False, True]
    assert Image.open(out / "probe.png").format == "PNG"
    assert (out / "probe.csv").read_text().count("\n") == 1 + 8
    # Resume per layer: a wider layer set trains only the new layer, keeps the old scores.
    before = {(r["checkpoint"], r["teacher"], r["layer"]): r["score"] for r in rows}
    wider = ProbeConfig(layers=(0, 1, 2), steps=3, batch_size=4, width=16, heldout_percent=30)
    rows2 = run_probe(checkpoints, data=demo_corpus, cache=cache, out=str(out), config=wider, device="cpu")
    after = {(r["checkpoint"], r["teacher"], r["layer"]): r["score"] for r in rows2}
    assert len(after) == 12 and all(after[k] == v for k, v in before.items())
    assert len(json.loads((out / "probe.json").read_text())["rows"]) == 12
    # Other weights under the same name: its scores are stale and recomputed, the other checkpoint's kept.
    swapped = run_probe([checkpoints[1], checkpoints[0]], names=["ckpt0", "ckpt1"], data=demo_corpus, cache=cache,
                        out=str(out), config=wider, device="cpu")
    models = {r["checkpoint"]: r["identity"]["model"] for r in swapped}
    assert models == {"ckpt0": str(Path(checkpoints[1]).resolve()), "ckpt1": str(Path(checkpoints[0]).resolve())}
    assert len(swapped) == 12
    # A different probe budget: nothing is reused.
    other_budget = ProbeConfig(layers=(0,), steps=2, batch_size=4, width=16, heldout_percent=30)
    rerun = run_probe(checkpoints[:1], data=demo_corpus, cache=cache, out=str(out), config=other_budget, device="cpu")
    assert all(r["identity"]["budget"]["steps"] == 2 for r in rerun) and len(rerun) == 2


def test_probe_refuses_unknown_teacher_and_layer(probe_setup, demo_corpus):
    root, cache, checkpoints = probe_setup
    with pytest.raises(ValueError, match="no targets for teachers"):
        run_probe(checkpoints[:1], data=demo_corpus, cache=cache, out=str(root / "x"),
                  config=ProbeConfig(teachers=("seg",), steps=1))
    with pytest.raises(ValueError, match="outside"):
        run_probe(checkpoints[:1], data=demo_corpus, cache=cache, out=str(root / "y"),
                  config=ProbeConfig(layers=(9,), steps=1))
