"""Layer-wise probing: scores per (checkpoint, teacher, layer), the plot, per-layer resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from olavlm.schemas.cache import TargetCache
from olavlm.schemas.config import ModelConfig
from olavlm.trainer.eval.probe import ProbeConfig, is_heldout, run_probe
from olavlm.trainer.student.build import build_student, load_student, save_student
from olavlm.trainer.student.presets import build_tiny_student

from .conftest import corpus_keys, write_random_teacher


@pytest.fixture(scope="module")
def probe_setup(tmp_path_factory, demo_corpus):
    root = tmp_path_factory.mktemp("probe")
    shards, hashes = corpus_keys(demo_corpus)
    cache = TargetCache(root / "cache")
    write_random_teacher(cache, "depth", shards, shape=(16, 8), sha256s=hashes)
    write_random_teacher(cache, "gen", shards, shape=(1, 8), sha256s=hashes, seed=5)
    tiny = build_tiny_student(root / "student")
    config = ModelConfig(
        vision_model=tiny.vision_model,
        llm=tiny.llm,
        tasks=("depth", "gen"),
        head_width=32,
        head_num_heads=4,
        layers={"depth": (1,), "gen": (2,)},
    )
    checkpoints = []
    for seed in (0, 1):
        import torch

        torch.manual_seed(seed)
        model = build_student(config, cache.specs())
        checkpoints.append(str(save_student(model, root / f"ckpt{seed}")))
    return root, str(cache.root.path), checkpoints


@pytest.mark.timeout(300)
def test_probe_scores_plot_and_resume(probe_setup, demo_corpus):
    root, cache, checkpoints = probe_setup
    out = root / "probe-out"
    config = ProbeConfig(layers=(1, 2), steps=3, batch_size=4, width=16, heldout_percent=30)
    rows = run_probe(checkpoints, data=demo_corpus, cache=cache, out=str(out), config=config, device="cpu")
    assert {(r["checkpoint"], r["teacher"], r["layer"], r["seed"]) for r in rows} == {
        (c, t, layer, 0) for c in ("ckpt0", "ckpt1") for t in ("depth", "gen") for layer in (1, 2)
    }
    heldout = sum(is_heldout(f"demo-{i:06d}", 30) for i in range(24))
    assert all(-1.0 <= r["score"] <= 1.0 and r["heldout_images"] == heldout for r in rows)
    assert [r["distilled"] for r in rows if r["checkpoint"] == "ckpt0" and r["teacher"] == "gen"] == [
        False,
        True,
    ]
    assert Image.open(out / "probe.png").format == "PNG"
    assert (out / "probe.csv").read_text().count("\n") == 1 + 8
    # Resume per layer: a wider layer set trains only the new layer, keeps the old scores.
    before = {(r["checkpoint"], r["teacher"], r["layer"]): r["score"] for r in rows}
    wider = ProbeConfig(layers=(1, 2, 3), steps=3, batch_size=4, width=16, heldout_percent=30)
    rows2 = run_probe(checkpoints, data=demo_corpus, cache=cache, out=str(out), config=wider, device="cpu")
    after = {(r["checkpoint"], r["teacher"], r["layer"]): r["score"] for r in rows2}
    assert len(after) == 12 and all(after[k] == v for k, v in before.items())
    assert len(json.loads((out / "probe.json").read_text())["rows"]) == 12
    # Other weights under the same name: its scores are stale and recomputed, the other checkpoint's kept.
    swapped = run_probe(
        [checkpoints[1], checkpoints[0]],
        names=["ckpt0", "ckpt1"],
        data=demo_corpus,
        cache=cache,
        out=str(out),
        config=wider,
        device="cpu",
    )
    models = {r["checkpoint"]: r["identity"]["model"] for r in swapped}
    assert models == {
        "ckpt0": str(Path(checkpoints[1]).resolve()),
        "ckpt1": str(Path(checkpoints[0]).resolve()),
    }
    assert len(swapped) == 12
    # A different probe budget: nothing is reused.
    other_budget = ProbeConfig(layers=(1,), steps=2, batch_size=4, width=16, heldout_percent=30)
    rerun = run_probe(
        checkpoints[:1], data=demo_corpus, cache=cache, out=str(out), config=other_budget, device="cpu"
    )
    assert all(r["identity"]["budget"]["steps"] == 2 for r in rerun) and len(rerun) == 2


def test_probe_refuses_unknown_teacher_and_layer(probe_setup, demo_corpus):
    root, cache, checkpoints = probe_setup
    with pytest.raises(ValueError, match="no targets for teachers"):
        run_probe(
            checkpoints[:1],
            data=demo_corpus,
            cache=cache,
            out=str(root / "x"),
            config=ProbeConfig(teachers=("seg",), steps=1),
        )
    with pytest.raises(ValueError, match="outside"):
        run_probe(
            checkpoints[:1],
            data=demo_corpus,
            cache=cache,
            out=str(root / "y"),
            config=ProbeConfig(layers=(9,), steps=1),
        )
    with pytest.raises(ValueError, match="outside"):  # paper numbering: 0 is the embedding output
        run_probe(
            checkpoints[:1],
            data=demo_corpus,
            cache=cache,
            out=str(root / "z"),
            config=ProbeConfig(layers=(0,), steps=1),
        )


@pytest.mark.timeout(300)
def test_probe_seeds_report_spread_and_resume_per_seed(probe_setup, demo_corpus, capsys):
    from olavlm.trainer.eval.probe_report import paired_difference, print_scores, summarise

    root, cache, checkpoints = probe_setup
    out = root / "probe-seeds"
    one = ProbeConfig(layers=(2,), teachers=("depth",), steps=2, batch_size=4, width=16, heldout_percent=30)
    first = run_probe(checkpoints, data=demo_corpus, cache=cache, out=str(out), config=one, device="cpu")
    three = ProbeConfig(
        layers=(2,), teachers=("depth",), steps=2, batch_size=4, width=16, heldout_percent=30, seeds=3
    )
    rows = run_probe(checkpoints, data=demo_corpus, cache=cache, out=str(out), config=three, device="cpu")
    assert sorted((r["checkpoint"], r["seed"]) for r in rows) == [
        (c, s) for c in ("ckpt0", "ckpt1") for s in (0, 1, 2)
    ]
    kept = {(r["checkpoint"], r["seed"]): r["score"] for r in rows}
    assert all(kept[(r["checkpoint"], 0)] == r["score"] for r in first)  # seed 0 reused, not retrained
    scores = [kept[("ckpt0", s)] for s in (0, 1, 2)]
    assert len(set(scores)) == 3  # the seeds are different initialisations
    (row,) = [r for r in summarise(rows) if r["checkpoint"] == "ckpt0"]
    assert row["seeds"] == 3 and row["mean"] == pytest.approx(sum(scores) / 3)
    mean = sum(scores) / 3
    assert row["std"] == pytest.approx((sum((x - mean) ** 2 for x in scores) / 2) ** 0.5)
    diffs = [kept[("ckpt0", s)] - kept[("ckpt1", s)] for s in (0, 1, 2)]
    got = paired_difference(rows, "ckpt0", "ckpt1", "depth", distilled_only=False)
    assert got[0] == pytest.approx(sum(diffs) / 3) and got[2] == 3
    print_scores(rows, compare=("ckpt0", "ckpt1"))
    printed = capsys.readouterr().out
    assert "std over 3 probe seeds" in printed and f"{sum(diffs) / 3:+.4f}" in printed
    assert "ckpt0 - ckpt1, paired by probe seed" in printed  # the first minus the compared, as `ola eval`
    csv = (out / "probe.csv").read_text().splitlines()
    assert csv[0] == "checkpoint,teacher,layer,score,score_std,seeds,distilled" and len(csv) == 3


def test_a_no_distill_run_has_no_distilled_layers(probe_setup, demo_corpus):
    """probe.png circles, and "at distilled" averages, only layers whose heads were trained on targets."""
    import shutil

    from olavlm.trainer.eval.probe import distilled_layers

    root, cache, checkpoints = probe_setup

    def run(name: str, fingerprints: dict, init_from: str = "") -> Path:
        step = root / name / "checkpoints" / "step-00000001"
        shutil.copytree(checkpoints[0], step / "model")
        (step / "trainer.json").write_text(json.dumps({"step": 1, "fingerprints": fingerprints}))
        (step / "config.json").write_text(json.dumps({"train": {"init_from": init_from}}))
        (step.parent / "LATEST").write_text(step.name)
        return step / "model"

    layers = {"depth": (1,), "gen": (2,)}
    none, every = {"depth": set(), "gen": set()}, {"depth": {1}, "gen": {2}}
    assert distilled_layers(run("pt-base", {}), layers) == none  # --no-distill
    assert distilled_layers(run("ift-base", {}, init_from=str(root / "pt-base")), layers) == none
    assert distilled_layers(run("pt", {"depth": "f00d"}), layers) == every
    assert distilled_layers(run("ift", {}, init_from=str(root / "pt")), layers) == every
    assert distilled_layers(checkpoints[0], layers) == every  # a bare model folder: history unknown
    config = ProbeConfig(
        layers=(1, 2), teachers=("gen",), steps=1, batch_size=4, width=16, heldout_percent=30
    )
    out = root / "probe-base"
    rows = run_probe([str(root / "pt-base")], data=demo_corpus, cache=cache, out=str(out), config=config)
    assert len(rows) == 2 and not any(r["distilled"] for r in rows)


def test_probe_reads_the_prompt_not_the_answer(probe_setup):
    """The probe's text: chat template + image block + task tokens + the fixed prompt + generation prompt."""
    from olavlm.trainer.data.text import prompt_ids

    _, _, checkpoints = probe_setup
    model = load_student(checkpoints[0])
    ids = prompt_ids(model.tokenizer, model.layout, "Describe the image in two lines.")
    text = model.tokenizer.decode([i for i in ids if i != model.layout.image_token_id])
    assert "Describe the image in two lines." in text
    assert ids.count(model.layout.image_token_id) == model.layout.num_image_tokens
    start = ids.index(model.layout.image_token_id) + model.layout.num_image_tokens
    task_ids = [i for t in model.layout.tasks for i in model.layout.task_token_ids[t]]
    assert ids[start : start + len(task_ids)] == task_ids
    # ends with the generation prompt: what the template adds after an empty assistant turn begins
    messages = [{"role": "user", "content": "x"}]
    with_prompt = model.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    without = model.tokenizer.apply_chat_template(messages, tokenize=False)
    assert text.endswith(with_prompt[len(without) :])


def test_probe_user_errors_are_one_red_line(probe_setup, demo_corpus, tmp_path):
    """A bad option or a teacher the cache lacks: exit 2 and the message, never a traceback."""
    from typer.testing import CliRunner

    from olavlm.cli.app import app

    _, cache, checkpoints = probe_setup
    for extra, message in (
        (["--seeds", "0"], "seeds must be >= 1"),
        (["--teachers", "seg"], "no targets for teachers"),
    ):
        result = CliRunner().invoke(
            app,
            [
                "probe",
                checkpoints[0],
                "--data",
                demo_corpus,
                "--cache",
                cache,
                "--out",
                str(tmp_path / "p"),
                "--steps",
                "1",
                *extra,
            ],
        )
        assert result.exit_code == 2, result.output
        assert message in result.output and "Traceback" not in result.output


@pytest.mark.timeout(300)
def test_probe_with_loader_workers_scores_every_heldout_image_once(probe_setup, demo_corpus):
    """Loader workers drift apart by epochs; the held-out pass must still cover exactly epoch 0's images."""
    root, cache, checkpoints = probe_setup
    config = ProbeConfig(
        layers=(2,), teachers=("depth",), steps=2, batch_size=4, width=16, heldout_percent=30, num_workers=2
    )
    rows = run_probe(
        checkpoints[:1],
        data=demo_corpus,
        cache=cache,
        out=str(root / "probe-workers"),
        config=config,
        device="cpu",
    )
    assert [r["heldout_images"] for r in rows] == [sum(is_heldout(f"demo-{i:06d}", 30) for i in range(24))]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("num_workers", [0, 2])
def test_probes_train_on_no_heldout_key_and_score_every_heldout_key_once(
    probe_setup, demo_corpus, monkeypatch, num_workers
):
    """The keys each pass hands the probes, recorded on their way in: training never sees a held-out key
    (else a score is measured on its own training images), and scoring sees each held-out key once."""
    import olavlm.trainer.eval.probe as probe

    _, cache, checkpoints = probe_setup
    seen: dict[str, list[str]] = {"train": [], "score": []}

    def recording(real, name):
        def wrapper(probes, todo, batches, *args, **kwargs):
            def consumed():
                for batch in batches:
                    seen[name].extend(batch["keys"])
                    yield batch

            return real(probes, todo, consumed(), *args, **kwargs)

        return wrapper

    monkeypatch.setattr(probe, "train_probes", recording(probe.train_probes, "train"))
    monkeypatch.setattr(probe, "score_probes", recording(probe.score_probes, "score"))
    # 6 steps of 4 images: were no key left out, training would read all 24, the held-out ones too
    config = ProbeConfig(
        layers=(1,),
        teachers=("gen",),
        steps=6,
        batch_size=4,
        width=16,
        heldout_percent=30,
        num_workers=num_workers,
    )
    probe.probe_checkpoint(
        load_student(checkpoints[0]), name="c", data=demo_corpus, cache=cache, config=config, device="cpu"
    )
    keys = [k for shard in corpus_keys(demo_corpus)[0].values() for k in shard]
    heldout = sorted(k for k in keys if is_heldout(k, 30))
    assert 0 < len(heldout) < len(keys)
    assert seen["train"] and set(seen["train"]) <= set(keys) - set(heldout)
    assert sorted(seen["score"]) == heldout
