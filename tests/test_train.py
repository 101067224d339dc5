"""The training loop (`olavlm.trainer.train.train`, `ola train`) on the tiny preset, CPU only."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from olavlm.schemas.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from olavlm.schemas.errors import ConfigError
from olavlm.trainer import checkpoint
from olavlm.trainer.train import NonFiniteLossError, read_metrics, train
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
        data=DataConfig(
            data=str(d / "corpus"), cache=str(d / "cache"), batch_size=2, num_workers=0, max_length=256
        ),
        train=TrainConfig(
            **{"stage": "pt", "steps": 6, "out": str(out), "save_every": 3, "log_every": 1, **train}
        ),
    )


def history(summary: dict) -> list[dict]:
    """The run's per-step records, read back from OUT/metrics.jsonl (every test run logs every step)."""
    return read_metrics(summary["out"])


@pytest.fixture(scope="module")
def pt_run(data):
    d, _ = data
    return train(run_config(d, d / "pt"))


def test_pt_loss_decreases_and_checkpoints_are_complete(pt_run, data):
    d, _ = data
    losses = [h["loss"] for h in history(pt_run)]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    assert np.mean(losses[-2:]) < np.mean(losses[:2])
    terms = set(history(pt_run)[0])
    assert {
        "ntp",
        "gen",
        "depth",
        "seg",
        "gen_l2",
        "samples_per_s",
        "tokens_per_s",
        "eta_s",
        "keys_sha256",
    } <= terms
    assert [m["step"] for m in history(pt_run)] == [1, 2, 3, 4, 5, 6]
    assert pt_run["last"]["step"] == 6
    ckpt = checkpoint.find(d / "pt")
    assert ckpt.name == "step-00000006"
    assert {p.name for p in ckpt.iterdir()} == {
        "model",
        "optimizer.safetensors",
        "trainer.json",
        "config.json",
    }
    saved = json.loads((ckpt / "trainer.json").read_text())
    assert (
        saved["step"] == 6 and saved["loader"][0]["batch"] >= 1 and set(saved["fingerprints"]) == set(SHAPES)
    )
    config = json.loads((ckpt / "config.json").read_text())
    assert config["data"]["expect_fingerprints"] == saved["fingerprints"]  # a resume refuses another cache
    assert not list((d / "pt" / "checkpoints").glob(".*tmp*"))  # atomic: no temporary left


def test_resume_continues_exactly(pt_run, data):
    """The batches after a resume are those of the uninterrupted run, and on CPU the losses match."""
    d, _ = data
    resumed = train(dataclass_resume(d / "pt" / "checkpoints" / "step-00000003", d / "resumed"))
    assert [h["step"] for h in history(resumed)] == [4, 5, 6]
    for a, b in zip(history(pt_run)[3:], history(resumed)):
        assert a["keys_sha256"] == b["keys_sha256"]
        for term in ("loss", "ntp", "gen", "depth", "seg"):
            assert a[term] == pytest.approx(b[term], rel=1e-6, abs=1e-7), term


def dataclass_resume(ckpt, out) -> RunConfig:
    return RunConfig(train=TrainConfig(resume=str(ckpt), out=str(out), steps=6))


def test_ntp_only_baseline_and_ift_from_pt(pt_run, data):
    d, _ = data
    base = train(run_config(d, d / "base", distill=False, steps=2, save_every=100))
    assert set(k for k in history(base)[0] if k in ("ntp", "loss", "gen", "depth")) == {"ntp", "loss"}
    assert base["fingerprints"] == {}
    ift_cfg = RunConfig(
        data=DataConfig(
            data=str(d / "corpus"), batch_size=2, num_workers=0, max_length=256
        ),  # no cache needed
        train=TrainConfig(stage="ift", init_from=str(d / "pt"), steps=2, out=str(d / "ift"), save_every=100),
    )
    ift = train(ift_cfg)
    assert all(math.isfinite(h["loss"]) for h in history(ift)) and "depth" not in history(ift)[0]
    saved = json.loads((checkpoint.find(d / "ift") / "config.json").read_text())
    assert saved["train"]["stage"] == "ift" and saved["model"]["tasks"] == ["gen", "depth", "seg"]


def test_nonfinite_loss_stops_naming_step_and_term_and_keeps_last_checkpoint(tmp_path):
    from olavlm.trainer.data.source import epoch_units, shards_of

    samples = make_corpus(tmp_path / "corpus", shards=2, per_shard=4)
    second = epoch_units(shards_of(str(tmp_path / "corpus")), seed=0, epoch=0, world=1)[1].shard.name
    _, truth = make_cache(tmp_path / "cache", samples, shapes=SHAPES, nan_shard=second)
    with pytest.raises(NonFiniteLossError, match=r"step 3: loss term 'depth_l\d+' is not finite") as err:
        train(run_config(tmp_path, tmp_path / "run", save_every=1))
    assert "step-00000002" in str(err.value)
    assert checkpoint.find(tmp_path / "run").name == "step-00000002"
    checkpoint.load(tmp_path / "run")  # intact and loadable
    skipped = train(run_config(tmp_path, tmp_path / "skip", steps=4, save_every=100, on_nonfinite="skip"))
    assert [h["step"] for h in history(skipped)] == [1, 2]  # steps 3 and 4 skipped, run finished


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
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=280
    )
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
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "olavlm.cli.app",
        "train",
        "--data",
        str(d / "corpus"),
        "--cache",
        str(d / "cache"),
        "--preset",
        "tiny",
        "--steps",
        "2",
        "--out",
        str(out),
        "--batch-size",
        "2",
        "--num-workers",
        "0",
        "--max-length",
        "256",
        "--log-every",
        "1",
    ]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=280)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads((checkpoint.find(out) / "trainer.json").read_text())
    assert len(saved["loader"]) == 2 and len(saved["rng"]) == 2
    # Rank 0 alone reports; DDP has no unused parameters to search for (nor warns about it per rank).
    assert [line for line in result.stdout.splitlines() if line.startswith("checkpoint:")] == [
        f"checkpoint: {checkpoint.find(out)}"
    ]
    assert "find_unused_parameters" not in result.stderr
    assert result.stderr.count("The new embeddings will be initialized") <= 1
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and all(math.isfinite(m["loss"]) for m in metrics)


def test_cli_options_map_onto_config_fields(tmp_path):
    from olavlm.cli.train_cmds import load_config

    (tmp_path / "run.toml").write_text('[train]\nstage = "ift"\nlr = 1e-4\n[data]\nbatch_size = 4\n')
    config = cli_config(
        "--config",
        str(tmp_path / "run.toml"),
        "--train.lr",
        "3e-5",
        "--no-distill",
        "--tasks",
        "gen,depth",
        "--max-length",
        "512",
        "--data.seed",
        "7",
        "--train.log_every",
        "2",
    )
    assert config.train.stage == "ift" and config.train.lr == 3e-5 and config.train.distill is False
    assert config.data.batch_size == 4 and config.data.max_length == 512 and config.data.seed == 7
    assert config.model.tasks == ("gen", "depth") and config.train.log_every == 2 and config.train.seed == 0
    (tmp_path / "run.yaml").write_text("model:\n  tokens_per_task: 4\n")
    assert load_config(tmp_path / "run.yaml", {})[0].model.tokens_per_task == 4
    seeded = cli_config("--seed", "3")
    assert seeded.data.seed == 3 and seeded.train.seed == 3
    assert "No such option: --bogus" in invoke("--bogus", "1").output


def invoke(*args: str):
    from typer.testing import CliRunner

    from olavlm.cli.app import app

    return CliRunner().invoke(app, ["train", *args], env={"COLUMNS": "200"})


def cli_config(*args: str) -> RunConfig:
    """The effective config `ola train ARGS --print-config` prints."""
    from olavlm.schemas.config import from_dict

    result = invoke(*args, "--print-config")
    assert result.exit_code == 0, result.output
    return from_dict(RunConfig, json.loads(result.output))


def test_cli_type_errors_name_the_option_and_help_lists_every_field():
    result = invoke("--steps", "abc")
    assert result.exit_code == 2 and "--steps" in result.output and "'abc'" in result.output
    help_text = invoke("--help").output
    for cls, section in ((ModelConfig, "model"), (DataConfig, "data"), (TrainConfig, "train")):
        for f in dataclasses.fields(cls):
            assert f"--{section}.{f.name.replace('_', '-')}" in help_text, f.name
    assert "--lr" in help_text and "Peak learning rate" in help_text


def test_yaml_values_are_typed_like_options(tmp_path):
    """PyYAML reads `lr: 1e-3` as a string: the typed path makes it a float before AdamW sees it."""
    from olavlm.cli.train_cmds import load_config

    (tmp_path / "run.yaml").write_text("train:\n  lr: 1e-3\n  steps: 2\n")
    config, given = load_config(tmp_path / "run.yaml", {})
    assert (
        config.train.lr == 1e-3
        and isinstance(config.train.lr, float)
        and given == {"train.lr", "train.steps"}
    )
    (tmp_path / "bad.yaml").write_text("train:\n  steps: many\n")
    with pytest.raises(ValueError, match="train.steps: expected an integer"):
        load_config(tmp_path / "bad.yaml", {})


def test_yaml_lr_trains(data, tmp_path):
    d, _ = data
    (tmp_path / "run.yaml").write_text(
        f"model:\n  preset: tiny\ndata:\n  data: {d / 'corpus'}\n  cache: {d / 'cache'}\n  batch_size: 2\n"
        f"  num_workers: 0\n  max_length: 256\ntrain:\n  lr: 1e-3\n  steps: 1\n  out: {tmp_path / 'run'}\n"
    )
    result = invoke("--config", str(tmp_path / "run.yaml"))
    assert result.exit_code == 0, result.output
    assert read_metrics(tmp_path / "run")[0]["lr"] == pytest.approx(1e-3)


def test_resume_keeps_explicit_options_equal_to_their_default(pt_run, data, tmp_path):
    """`--steps 1000` on resume is an option the user gave, even though 1000 is TrainConfig's default."""
    from olavlm.trainer.run import resolve_run

    d, _ = data
    ckpt = str(d / "pt" / "checkpoints" / "step-00000003")
    given = resolve_run(
        RunConfig(train=TrainConfig(resume=ckpt, steps=1000)), given={"train.resume", "train.steps"}
    )
    assert given.config.train.steps == 1000
    inferred = resolve_run(RunConfig(train=TrainConfig(resume=ckpt, steps=1000)))
    assert inferred.config.train.steps == 6  # built in code: only values that differ from the default count
    with pytest.raises(ValueError, match="the saved run defines train.lr"):
        resolve_run(RunConfig(train=TrainConfig(resume=ckpt, lr=0.5)), given={"train.resume", "train.lr"})
    # Retention and logging sinks are not part of the recipe: a resume may change them.
    changed = resolve_run(
        RunConfig(train=TrainConfig(resume=ckpt, keep_last=2, wandb=True)),
        given={"train.resume", "train.keep_last", "train.wandb"},
    )
    assert (changed.config.train.keep_last, changed.config.train.wandb) == (2, True)


def test_rerunning_the_command_with_resume_is_accepted_and_a_real_change_named(pt_run, data, tmp_path):
    """`ola train --config pt.toml --resume runs/pt --steps 10`: the file's values equal the saved run's."""
    from olavlm.cli.train_cmds import load_config
    from olavlm.schemas.config import merge

    d, _ = data
    (tmp_path / "pt.toml").write_text(
        f'[model]\npreset = "tiny"\n[data]\ndata = "{d / "corpus"}"\ncache = "{d / "cache"}"\nbatch_size = 2\n'
        f'num_workers = 0\nmax_length = 256\n[train]\nstage = "pt"\nsteps = 6\nout = "{d / "pt"}"\n'
        "save_every = 3\nlog_every = 1\n"
    )
    resume = {"train": {"resume": str(d / "pt"), "steps": 10}}
    run = _resolve(load_config(tmp_path / "pt.toml", resume))
    assert run.config.train.steps == 10 and run.config.train.out == str(d / "pt")
    assert run.resume == str(d / "pt" / "checkpoints" / "step-00000006")
    for change, message in (
        ({"train": {"lr": 0.5}}, "train.lr (saved 0.0, given 0.5)"),
        ({"model": {"preset": ""}}, "model.preset (saved 'tiny', given '')"),
        ({"data": {"batch_size": 4}}, "data.batch_size (saved 2, given 4)"),
    ):
        with pytest.raises(ConfigError, match=re.escape(message)):
            _resolve(load_config(tmp_path / "pt.toml", merge(resume, change)))


def _resolve(loaded):
    """resolve_run as `ola train` calls it: the config and the options the user gave."""
    from olavlm.trainer.run import resolve_run

    config, given = loaded
    return resolve_run(config, given=given)


def test_resuming_a_copied_run_writes_into_the_copy_and_prunes_only_there(pt_run, data, tmp_path):
    """`cp -r runs/pt runs/pt-copy; ola train --resume runs/pt-copy`: the copy continues, the original is untouched."""
    from olavlm.trainer.run import resolve_run

    d, _ = data
    copy = tmp_path / "pt-copy"
    shutil.copytree(d / "pt", copy)
    original = {p.name: p.stat().st_mtime_ns for p in (d / "pt" / "checkpoints").iterdir()}
    metrics = (d / "pt" / "metrics.jsonl").read_text()
    given = {"train.resume", "train.steps", "train.keep_last"}
    summary = train(RunConfig(train=TrainConfig(resume=str(copy), steps=7, keep_last=1)), given=given)
    assert summary["out"] == str(copy)
    assert summary["checkpoint"] == str(copy / "checkpoints" / "step-00000007")
    assert (copy / "checkpoints" / "LATEST").read_text().strip() == "step-00000007"
    assert not (copy / "checkpoints" / "step-00000003").exists()  # keep_last pruned the copy ...
    assert {
        p.name: p.stat().st_mtime_ns for p in (d / "pt" / "checkpoints").iterdir()
    } == original  # ... only
    assert (d / "pt" / "metrics.jsonl").read_text() == metrics
    with pytest.raises(ConfigError, match=r"holds another run's checkpoints \(step-00000006\)"):
        resolve_run(
            RunConfig(train=TrainConfig(resume=str(copy), out=str(d / "pt"))),
            given={"train.resume", "train.out"},
        )


def test_fsdp2_single_process_trains_saves_and_resumes(data):
    d, _ = data
    first = train(run_config(d, d / "fsdp", steps=3, save_every=2, fsdp=True))
    resumed = train(
        RunConfig(
            train=TrainConfig(
                resume=str(d / "fsdp" / "checkpoints" / "step-00000002"),
                out=str(d / "fsdp-resumed"),
                steps=3,
                fsdp=True,
            )
        )
    )
    assert history(resumed)[0]["keys_sha256"] == history(first)[2]["keys_sha256"]
    assert history(resumed)[0]["loss"] == pytest.approx(history(first)[2]["loss"], rel=1e-6)


def test_int8_cache_trains_like_the_16_bit_one(data, pt_run, tmp_path):
    """int8 targets cross the loader as int8 + per-token scale and are dequantised on the device: the first
    step's embedding terms equal the float16 cache's to within the quantisation error (a missing scale would
    put the targets in int8 units, ~100x off)."""
    d, samples = data
    make_cache(tmp_path / "cache", samples, shapes=SHAPES, dtype="int8")
    (tmp_path / "corpus").symlink_to(d / "corpus")
    summary = train(run_config(tmp_path, tmp_path / "pt-int8", steps=1, save_every=1))
    first, reference = history(summary)[0], history(pt_run)[0]
    for term in ("depth", "seg", "gen"):
        assert first[term] == pytest.approx(reference[term], rel=2e-2), term
