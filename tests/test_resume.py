"""Resume restores every state: weights, optimizer, loader and RNG, plain, DDP (2 gloo processes) and FSDP2.

The loader state (a position per DataLoader worker) also goes through a real checkpoint with two
workers here; its other guarantees are tested without training in tests/test_worker_loader.py.

The student here has attention dropout, so the losses after a resume depend on the RNG
state too; each test compares several steps after the resume (optimizer updates included)
and the final weights with an uninterrupted run.

Two RNG bugs these tests found are fixed: the loader's `DataLoader` drew its workers' base
seed from the global RNG at the first batch after the restore (it has its own generator now),
and FSDP2's `_save` built its full-weight copy from the global RNG after recording it (the
copy is built under `torch.random.fork_rng`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from olavlm.schemas.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from olavlm.trainer import checkpoint
from olavlm.trainer.student.presets import TINY_HEADS, build_tiny_student
from olavlm.trainer.train import read_metrics, train
from tests._trainer_data import make_cache, make_corpus

SHAPES = {"gen": (1, 24), "depth": (64, 32), "seg": (64, 48)}
ROOT = Path(__file__).resolve().parents[1]
TERMS = ("loss", "ntp", "gen", "depth", "seg", "grad_norm")
DROPOUT = 0.3


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Corpus + cache + a tiny student whose LLM has attention dropout (an RNG consumer in every step)."""
    d = tmp_path_factory.mktemp("resume")
    samples = make_corpus(d / "corpus", shards=2, per_shard=6, text_only_every=5)
    make_cache(d / "cache", samples, shapes=SHAPES)
    student = build_tiny_student(d / "student", seed=0)
    config = Path(student.llm) / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "attention_dropout": DROPOUT}))
    return d, student


def without_dropout(data):
    """The same student with attention_dropout 0 (another folder)."""
    d, student = data
    plain = d / "student-no-dropout"
    if not plain.exists():
        shutil.copytree(d / "student", plain)
        config = plain / "llm" / "config.json"
        config.write_text(json.dumps({**json.loads(config.read_text()), "attention_dropout": 0.0}))
    return d, dataclasses.replace(student, vision_model=str(plain / "vision"), llm=str(plain / "llm"))


def run_config(data, out, num_workers: int = 0, **train_options) -> RunConfig:
    d, student = data
    return RunConfig(
        model=ModelConfig(vision_model=student.vision_model, llm=student.llm, **TINY_HEADS),
        data=DataConfig(
            data=str(d / "corpus"),
            cache=str(d / "cache"),
            batch_size=2,
            num_workers=num_workers,
            max_length=256,
        ),
        train=TrainConfig(stage="pt", steps=4, out=str(out), save_every=2, log_every=1, **train_options),
    )


def assert_same_run(full: Path, resumed: Path) -> None:
    """Steps 3 and 4 of the resumed run equal the uninterrupted run's, and so do the final weights."""
    from safetensors.torch import load_file

    after = read_metrics(full)[2:]
    again = read_metrics(resumed)
    assert [m["step"] for m in after] == [m["step"] for m in again] == [3, 4]
    for a, b in zip(after, again):
        assert a["keys_sha256"] == b["keys_sha256"]
        for term in TERMS:
            assert b[term] == pytest.approx(a[term], rel=1e-6, abs=1e-7), (b["step"], term)
    model_a, model_b = checkpoint.find(full) / "model", checkpoint.find(resumed) / "model"
    assert checkpoint.find(full).name == checkpoint.find(resumed).name == "step-00000004"
    files = sorted(p.relative_to(model_a) for p in model_a.rglob("*.safetensors"))
    assert files and files == sorted(p.relative_to(model_b) for p in model_b.rglob("*.safetensors"))
    for name in files:
        a, b = load_file(model_a / name), load_file(model_b / name)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-6, atol=1e-7, msg=f"{name}:{key}")


def resume_config(full: Path, out: Path, **train_options) -> RunConfig:
    return RunConfig(
        train=TrainConfig(
            resume=str(full / "checkpoints" / "step-00000002"), out=str(out), steps=4, **train_options
        )
    )


@pytest.mark.timeout(300)
def test_resume_restores_rng_optimizer_and_weights(data, one_thread):
    d, _ = data
    assert json.loads((Path(data[1].llm) / "config.json").read_text())["attention_dropout"] == DROPOUT
    train(run_config(data, d / "full"))
    train(resume_config(d / "full", d / "resumed"))
    assert_same_run(d / "full", d / "resumed")


@pytest.mark.timeout(300)
def test_resume_with_two_loader_workers(data, one_thread):
    """Each worker reads its own shard; the checkpoint holds a position per worker, and the resume
    continues with the very batches the uninterrupted run read next (workers had prefetched more)."""
    d, _ = data
    train(run_config(data, d / "workers", num_workers=2))
    saved = json.loads((checkpoint.find(d / "workers") / "trainer.json").read_text())["loader"][0]
    assert len(saved["workers"]) == 2 and saved["batch"] == 4
    train(resume_config(d / "workers", d / "workers-resumed"))
    assert_same_run(d / "workers", d / "workers-resumed")


@pytest.mark.timeout(300)
def test_fsdp2_resume_matches_the_uninterrupted_run(data, one_thread):
    d, _ = data
    train(run_config(without_dropout(data), d / "fsdp", fsdp=True))
    train(resume_config(d / "fsdp", d / "fsdp-resumed", fsdp=True))
    assert_same_run(d / "fsdp", d / "fsdp-resumed")


@pytest.mark.timeout(300)
def test_fsdp2_resume_with_dropout(data, one_thread):
    d, _ = data
    train(run_config(data, d / "fsdp-dropout", fsdp=True))
    train(resume_config(d / "fsdp-dropout", d / "fsdp-dropout-resumed", fsdp=True))
    assert_same_run(d / "fsdp-dropout", d / "fsdp-dropout-resumed")


DDP_SCRIPT = """
import json, sys
from olavlm.schemas.config import RunConfig, from_dict
from olavlm.trainer.train import train

for path in sys.argv[1:]:  # the uninterrupted run, then the resume (one process group, one launch)
    train(from_dict(RunConfig, json.loads(open(path).read())))
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ddp_two_processes_resume_matches_the_uninterrupted_run(data, tmp_path):
    from olavlm.schemas.config import to_dict

    d, _ = data
    full, resumed = d / "ddp", d / "ddp-resumed"
    paths = []
    for name, config in (("full", run_config(data, full)), ("resumed", resume_config(full, resumed))):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(to_dict(config)))
    script = tmp_path / "ddp_resume.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        str(script),
        *map(str, paths),
    ]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=280)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads((checkpoint.find(resumed) / "trainer.json").read_text())
    assert len(saved["loader"]) == 2 and len(saved["rng"]) == 2
    assert_same_run(full, resumed)
