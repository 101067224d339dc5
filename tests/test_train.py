"""The training loop (`olavlm.trainer.train.train`, `ola train`) on the tiny preset, CPU only."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from olavlm.schemas.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from olavlm.trainer import checkpoint
from olavlm.trainer.train import NonFiniteLossError, train
from tests._trainer_data import make_cache, make_corpus

SHAPES = {"gen": (1, 24), "depth": (64, 32), "seg": (64, 48)}
"""The tiny student has 64 image tokens; depth/seg predict one target token per image token."""
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("train")
    samples = make_corpus(d / "corpus", shards=2, per_shard=6, text_only_every=5)
    make_cache(d / "cache", samples, shapes=SHAPES)
    return d, samples


def run_config(d, out, **train) -> RunConfig:
    return RunConfig(
        model=ModelConfig(preset="tiny"),
        data=DataConfig(data=str(d / "corpus"), cache=str(d / "cache"), batch_size=2, num_workers=0, max_length=256),
        train=TrainConfig(**{"stage": "pt", "steps": 6, "out": str(out), "save_every": 3, "log_every": 1, **train}),
    )


@pytest.fixture(scope="module")
def pt_run(data):
    d, _ = data
    return train(run_config(d, d / "pt"))


def test_pt_loss_decreases_and_checkpoints_are_complete(pt_run, data):
    d, _ = data
    losses = [h["loss"] for h in pt_run["history"]]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    assert np.mean(losses[-2:]) < np.mean(losses[:2])
    terms = set(pt_run["history"][0])
    assert {"ntp", "gen", "depth", "seg", "gen_l2", "samples_per_s", "tokens_per_s", "eta_s"} <= terms
    metrics = [json.loads(line) for line in (d / "pt" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    ckpt = checkpoint.find(d / "pt")
    assert ckpt.name == "step-00000006"
    assert {p.name for p in ckpt.iterdir()} == {"model", "optimizer.safetensors", "trainer.json", "config.json"}
    saved = json.loads((ckpt / "trainer.json").read_text())
    assert saved["step"] == 6 and saved["loader"][0]["batch"] >= 1 and set(saved["fingerprints"]) == set(SHAPES)
    config = json.loads((ckpt / "config.json").read_text())
    assert config["data"]["expect_fingerprints"] == saved["fingerprints"]  # a resume refuses another cache
    assert not list((d / "pt" / "checkpoints").glob(".*tmp*"))  # atomic: no temporary left


def test_resume_continues_exactly(pt_run, data):
    """The batches after a resume are those of the uninterrupted run, and on CPU the losses match."""
    d, _ = data
    resumed = train(dataclass_resume(d / "pt" / "checkpoints" / "step-00000003", d / "resumed"))
    assert [h["step"] for h in resumed["history"]] == [4, 5, 6]
    for a, b in zip(pt_run["history"][3:], resumed["history"]):
        assert a["keys"] == b["keys"]
        for term in ("loss", "ntp", "gen", "depth", "seg"):
            assert a[term] == pytest.approx(b[term], rel=1e-6, abs=1e-7), term


def dataclass_resume(ckpt, out) -> RunConfig:
    return RunConfig(train=TrainConfig(resume=str(ckpt), out=str(out), steps=6))


def test_ntp_only_baseline_and_ift_from_pt(pt_run, data):
    d, _ = data
    base = train(run_config(d, d / "base", distill=False, steps=2, save_every=100))
    assert set(k for k in base["history"][0] if k in ("ntp", "loss", "gen", "depth")) == {"ntp", "loss"}
    assert base["fingerprints"] == {}
    ift_cfg = RunConfig(
        data=DataConfig(data=str(d / "corpus"), batch_size=2, num_workers=0, max_length=256),  # no cache needed
        train=TrainConfig(stage="ift", init_from=str(d / "pt"), steps=2, out=str(d / "ift"), save_every=100),
    )
    ift = train(ift_cfg)
    assert all(math.isfinite(h["loss"]) for h in ift["history"]) and "depth" not in ift["history"][0]
    saved = json.loads((checkpoint.find(d / "ift") / "config.json").read_text())
    assert saved["train"]["stage"] == "ift" and saved["model"]["tasks"] == ["gen", "depth", "seg"]


def test_nonfinite_loss_stops_naming_step_and_term_and_keeps_last_checkpoint(tmp_path):
    from olavlm.trainer.source import epoch_units, shards_of

    samples = make_corpus(tmp_path / "corpus", shards=2, per_shard=4)
    second = epoch_units(shards_of(str(tmp_path / "corpus")), seed=0, epoch=0, world=1)[1].shard.name
    _, truth = make_cache(tmp_path / "cache", samples, shapes=SHAPES, nan_shard=second)
    with pytest.raises(NonFiniteLossError, match=r"step 3: loss term 'depth_l\d+' is not finite") as err:
        train(run_config(tmp_path, tmp_path / "run", save_every=1))
    assert "step-00000002" in str(err.value)
    assert checkpoint.find(tmp_path / "run").name == "step-00000002"
    checkpoint.load(tmp_path / "run")  # intact and loadable
    skipped = train(run_config(tmp_path, tmp_path / "skip", steps=4, save_every=100, on_nonfinite="skip"))
    assert [h["step"] for h in skipped["history"]] == [1, 2]  # steps 3 and 4 skipped, run finished


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_cli_train_in_a_fresh_process_imports_no_teacher(data):
    """`ola train` demo form; afterwards no pipeline/teacher module is loaded in that process."""
    d, _ = data
    out = d / "cli"
    script = (
        "import sys, json\n"
        "from olavlm.cli.app import app\n"
        "try:\n"
        f"    app(['train', '--data', {str(d / 'corpus')!r}, '--cache', {str(d / 'cache')!r}, '--stage', 'pt',\n"
        f"         '--preset', 'tiny', '--steps', '2', '--out', {str(out)!r}, '--batch-size', '2',\n"
        "         '--num-workers', '0', '--train.log-every', '1'])\n"
        "except SystemExit as e:\n"
        "    assert not e.code, e.code\n"
        "bad = [m for m in sys.modules if m.startswith('olavlm.pipeline') or m.startswith('ray') or any(\n"
        "       t in m for t in ('depth_anything', 'oneformer', 'dinov2', 'swin', 'diffusers'))]\n"
        "print('BAD=' + json.dumps(bad))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=280)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "BAD=[]" in result.stdout, result.stdout[-2000:]
    assert checkpoint.find(out).name == "step-00000002"
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ddp_two_processes_on_cpu(data):
    d, _ = data
    out = d / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "olavlm.cli.app", "train", "--data", str(d / "corpus"), "--cache", str(d / "cache"),
               "--preset", "tiny", "--steps", "2", "--out", str(out), "--batch-size", "2", "--num-workers", "0",
               "--max-length", "256", "--log-every", "1"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=280)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads((checkpoint.find(out) / "trainer.json").read_text())
    assert len(saved["loader"]) == 2 and len(saved["rng"]) == 2
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and all(math.isfinite(m["loss"]) for m in metrics)


def test_cli_options_map_onto_config_fields(tmp_path):
    from olavlm.cli.train_cmds import load_config

    (tmp_path / "run.toml").write_text('[train]\nstage = "ift"\nlr = 1e-4\n[data]\nbatch_size = 4\n')
    config = load_config(tmp_path / "run.toml", ["--train.lr", "3e-5", "--no-distill", "--tasks", "gen,depth",
                                                 "--max-length", "512", "--data.seed", "7"])
    assert config.train.stage == "ift" and config.train.lr == 3e-5 and config.train.distill is False
    assert config.data.batch_size == 4 and config.data.max_length == 512 and config.data.seed == 7
    assert config.model.tasks == ("gen", "depth")
    (tmp_path / "run.yaml").write_text("model:\n  tokens_per_task: 4\n")
    assert load_config(tmp_path / "run.yaml", []).model.tokens_per_task == 4
    with pytest.raises(ValueError, match="ambiguous"):
        load_config(None, ["--seed", "1"])
    with pytest.raises(ValueError, match="unknown option --bogus"):
        load_config(None, ["--bogus", "1"])


def test_fsdp2_single_process_trains_saves_and_resumes(data):
    d, _ = data
    first = train(run_config(d, d / "fsdp", steps=3, save_every=2, fsdp=True))
    resumed = train(RunConfig(train=TrainConfig(resume=str(d / "fsdp" / "checkpoints" / "step-00000002"),
                                                out=str(d / "fsdp-resumed"), steps=3, fsdp=True)))
    assert resumed["history"][0]["keys"] == first["history"][2]["keys"]
    assert resumed["history"][0]["loss"] == pytest.approx(first["history"][2]["loss"], rel=1e-6)
