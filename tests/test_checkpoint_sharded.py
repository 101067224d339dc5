"""Sharded checkpoints (FSDP2): every rank writes its own safetensors shards, nothing is gathered, and any
number of processes reads them back; the plain single-process layout round-trips too. Exact equality.

The 2-process run gathers a full copy of what it saved (for the test only) to compare against.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from olavlm.schemas.config import ModelConfig, RunConfig, TrainConfig
from olavlm.trainer import checkpoint
from olavlm.trainer.freeze import apply_stage
from olavlm.trainer.parallel import Dist, wrap
from olavlm.trainer.student import sharded
from olavlm.trainer.student.build import build_student, load_student
from olavlm.trainer.student.presets import TINY_HEADS
from olavlm.trainer.train import train
from tests._student import SPECS, tiny_folders
from tests._trainer_data import make_cache, make_corpus
from tests.test_losses import spawn_two
from tests.test_resume import SHAPES, assert_same_run, resume_config, run_config


def _config() -> ModelConfig:
    s = tiny_folders()
    return ModelConfig(vision_model=s.vision_model, llm=s.llm, **TINY_HEADS)


def _trained(config: ModelConfig, d: Dist, *, fsdp: bool):
    """A VPT student (LLM + projector train) after two AdamW steps on fixed gradients: moments are non-zero."""
    torch.manual_seed(0)
    model = build_student(config, SPECS)
    apply_stage(model, "vpt")
    wrapped = wrap(model, RunConfig(model=config, train=TrainConfig(fsdp=fsdp)), d)
    optimizer = torch.optim.AdamW(apply_stage(model, "vpt", lr=1e-3, weight_decay=0.1))
    for scale in (0.1, -0.3):
        for p in model.parameters():
            if p.requires_grad:
                p.grad = p.detach() * scale + 0.01
        optimizer.step()
    return model, wrapped, optimizer


def _full_copy(model, wrapped, optimizer) -> dict[str, torch.Tensor]:
    """Model and optimizer state as full CPU tensors ("model/<name>", "optim/<name>/<state>")."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from olavlm.trainer.parallel import full_optimizer_state

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(wrapped, options=options)
    optim = full_optimizer_state(wrapped, optimizer)
    if "state" not in optim:  # cpu_offload: ranks other than 0 get nothing back
        return {}
    flat, _ = checkpoint.optimizer_tensors(optim)
    out = {f"model/{k}": v.detach().cpu().clone() for k, v in state.items()}
    return {**out, **{f"optim/{k}": v.clone() for k, v in flat.items()}}


def _save(out, model, wrapped, optimizer, d: Dist) -> str:
    return checkpoint.save_state(
        out,
        1,
        model,
        wrapped,
        optimizer,
        d,
        save_frozen=True,
        keep_last=0,
        loader_state={"epoch": 0},
        config={},
        fingerprints={},
    )


def _save_worker(rank: int, world: int, port: int, config: ModelConfig, out: str, reference: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        d = Dist(rank, world, rank, torch.device("cpu"))
        model, wrapped, optimizer = _trained(config, d, fsdp=True)
        _save(out, model, wrapped, optimizer, d)
        copy = _full_copy(model, wrapped, optimizer)  # a collective: every rank
        if rank == 0:
            save_file(copy, reference)
        failures = _rank_0_failures(model, wrapped, optimizer, d, out + "-failing")
        Path(f"{reference}.rank{rank}.json").write_text(json.dumps(failures))
    finally:
        dist.destroy_process_group()


def _rank_0_failures(model, wrapped, optimizer, d: Dist, out: str) -> list[str]:
    """Rank 0 fails alone, before its shards (the model folder) and after them (pruning): every rank must
    raise, none may wait forever in a collective. The exception type each rank saw, then a save that works."""
    seen = []
    for step, target, name in ((2, checkpoint, "save_student"), (3, checkpoint, "prune")):
        real = getattr(target, name)

        def broken(*args, **kwargs):
            raise OSError("No space left on device")

        if d.main:
            setattr(target, name, broken)
        try:
            checkpoint.save_state(
                out,
                step,
                model,
                wrapped,
                optimizer,
                d,
                save_frozen=True,
                keep_last=1,
                loader_state={},
                config={},
                fingerprints={},
            )
            seen.append("none")
        except Exception as exc:
            seen.append(type(exc).__name__)
        finally:
            setattr(target, name, real)
    checkpoint.save_state(
        out,
        4,
        model,
        wrapped,
        optimizer,
        d,
        save_frozen=True,
        keep_last=1,
        loader_state={},
        config={},
        fingerprints={},
    )  # the group is still in step
    return seen


def _fsdp_one_process_copy(out) -> dict[str, torch.Tensor]:
    """Resume at world size 1 under FSDP2 (in this process, as tests/test_resume.py does): model from the
    shards, optimizer state re-sharded into DTensors."""
    model = load_student(checkpoint.model_dir(out))
    apply_stage(model, "vpt")
    wrapped = wrap(
        model, RunConfig(model=model.config, train=TrainConfig(fsdp=True)), Dist(0, 1, 0, torch.device("cpu"))
    )
    optimizer = torch.optim.AdamW(apply_stage(model, "vpt", lr=1e-3, weight_decay=0.1))
    checkpoint.restore_optimizer(checkpoint.load(out), wrapped, optimizer)
    return _full_copy(model, wrapped, optimizer)


def _assert_equal(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    different = [
        k for k in expected if got[k].shape != expected[k].shape or not torch.equal(got[k], expected[k])
    ]
    assert not different, different[:5]


def _loaded_copy(out, stage: str = "vpt") -> dict[str, torch.Tensor]:
    """One plain process: model through the public loading path, optimizer through restore_optimizer."""
    model = load_student(checkpoint.model_dir(out))
    optimizer = torch.optim.AdamW(apply_stage(model, stage, lr=1e-3, weight_decay=0.1))
    checkpoint.restore_optimizer(checkpoint.load(out), model, optimizer)
    return _full_copy(model, model, optimizer)


@pytest.mark.slow  # two fresh interpreters importing torch + transformers
@pytest.mark.timeout(400)
def test_two_process_fsdp2_shards_load_exactly_in_one_process_plain_and_fsdp2(tmp_path):
    config, out = _config(), tmp_path / "run"
    reference = str(tmp_path / "saved.safetensors")
    spawn_two(_save_worker, config, str(out), reference, seconds=180)
    saved = load_file(reference)
    assert any(k.endswith("/exp_avg") and v.abs().sum() > 0 for k, v in saved.items())  # teeth: real moments

    step = checkpoint.find(out)
    model_shards = sorted((step / checkpoint.MODEL / checkpoint.SHARDS).glob("*.safetensors"))
    optim_shards = sorted((step / checkpoint.OPTIMIZER_SHARDS).glob("*.safetensors"))
    assert len(model_shards) == 2 and len(optim_shards) == 2  # one file per rank, nothing gathered
    assert not (step / checkpoint.OPTIMIZER).exists() and not list(
        (step / checkpoint.MODEL / "llava").glob("*.safetensors")
    )
    assert not [
        p
        for p in step.rglob("*")
        if p.is_file() and p.suffix not in (".json", ".safetensors", ".jinja", ".txt")
    ]

    _assert_equal(_loaded_copy(out), saved)  # world size 2 -> 1 plain process

    _assert_equal(_fsdp_one_process_copy(out), saved)  # world size 2 -> 1 FSDP2 process (DTensors)

    _assert_missing_shards_refused(out, tmp_path)

    # rank 0 failing alone: it raises the cause, rank 1 a CheckpointError, nobody hangs (spawn_two's limit)
    failures = [json.loads(Path(f"{reference}.rank{rank}.json").read_text()) for rank in (0, 1)]
    assert failures == [["OSError", "OSError"], ["CheckpointError", "CheckpointError"]]
    assert checkpoint.find(f"{out}-failing").name == checkpoint.step_name(4)


def _assert_missing_shards_refused(out, tmp_path) -> None:
    """A 2-rank checkpoint with either rank's model or optimizer shard file deleted: ConfigError naming the
    folder, from the recorded world size and, without it, from the chunks' coverage (DCP alone loaded rank 1's
    loss silently with wrong values, or failed with a raw ValueError on rank 2's)."""
    import shutil

    from olavlm.schemas.errors import ConfigError

    for rank in (0, 1):
        for part in (checkpoint.MODEL + "/" + checkpoint.SHARDS, checkpoint.OPTIMIZER_SHARDS):
            broken = tmp_path / f"broken-{rank}-{part.replace('/', '-')}"
            shutil.copytree(checkpoint.find(out), broken)
            folder = broken / part
            sharded.shard_file(folder, rank).unlink()
            with pytest.raises(
                ConfigError, match=rf"{folder}: incomplete sharded checkpoint.*ranks \[{rank}\]"
            ):
                _loaded_copy(broken)  # the model, then the optimizer state
            complete = checkpoint.find(out) / part
            state = load_file(sharded.shard_file(complete, rank))  # a tensor only this rank's file held
            name = next(n for n in state if state[n].numel() > 0)
            shape = _global_shape(complete, name)
            with pytest.raises(
                ConfigError, match=rf"{folder}: incomplete sharded checkpoint: tensor {name} "
            ):
                sharded.load_sharded(folder, {name: torch.zeros(shape)})  # no recorded count: coverage


def _global_shape(folder, name: str) -> tuple[int, ...]:
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    return tuple(HuggingFaceStorageReader(str(folder)).read_metadata().state_dict_metadata[name].size)


def test_a_shard_file_rank_0_does_not_see_is_refused_on_save(tmp_path, monkeypatch):
    """A staging folder that is not shared: rank 0 finds no file of another rank, refuses before publishing."""
    import torch.distributed as dist

    from olavlm.schemas.errors import ConfigError

    created = not dist.is_initialized()  # (an FSDP2 test of this process may have left one)
    if created:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        sharded.save_sharded(tmp_path / "good", {"w": torch.ones(3)})
        assert sharded.shard_file(tmp_path / "good", 0) is not None
        monkeypatch.setattr(sharded, "shard_file", lambda folder, rank: None)  # as on another machine's disk
        with pytest.raises(
            ConfigError, match=r"sees no shard file of ranks \[0\].*filesystem every rank shares"
        ):
            sharded.save_sharded(tmp_path / "lost", {"w": torch.ones(3)})
    finally:
        if created:
            dist.destroy_process_group()


def _tied_config(folder) -> ModelConfig:
    """The tiny student with its LLM's lm_head tied to embed_tokens, saved as Qwen2-0.5B / Llama-3.2-1B ship
    (no lm_head.weight in the file)."""
    import shutil

    llm = folder / "tied-llm"
    shutil.copytree(tiny_folders().llm, llm)
    llm_config = json.loads((llm / "config.json").read_text())
    (llm / "config.json").write_text(json.dumps({**llm_config, "tie_word_embeddings": True}))
    weights = load_file(llm / "model.safetensors")
    save_file(
        {k: v for k, v in weights.items() if k != "lm_head.weight"},
        llm / "model.safetensors",
        metadata={"format": "pt"},
    )
    return ModelConfig(vision_model=tiny_folders().vision_model, llm=str(llm), **TINY_HEADS)


def _tied(model) -> bool:
    return model.llava.lm_head.weight is model.llava.get_input_embeddings().weight


@pytest.mark.slow  # two fresh interpreters importing torch + transformers
@pytest.mark.timeout(400)
def test_two_process_fsdp2_shards_of_a_tied_llm_load_tied_and_exact(tmp_path):
    config, out = _tied_config(tmp_path), tmp_path / "run"
    assert _tied(build_student(config, SPECS))  # teeth: the test model is tied
    reference = str(tmp_path / "saved.safetensors")
    spawn_two(_save_worker, config, str(out), reference, seconds=180)  # safetensors refused shared storage
    saved = load_file(reference)
    assert any(k.endswith("/exp_avg") and v.abs().sum() > 0 for k, v in saved.items())

    loaded = load_student(checkpoint.model_dir(out))
    assert _tied(loaded)  # the skeleton ties as from_pretrained does
    assert len(list(loaded.parameters())) == len(list(build_student(config, SPECS).parameters()))
    _assert_equal(_loaded_copy(out), saved)  # weights and AdamW state, both names of the tied tensor
    _assert_equal(_fsdp_one_process_copy(out), saved)


def test_single_process_layout_round_trips_exactly(tmp_path):
    model, wrapped, optimizer = _trained(_config(), Dist(0, 1, 0, torch.device("cpu")), fsdp=False)
    path = _save(tmp_path, model, wrapped, optimizer, Dist(0, 1, 0, torch.device("cpu")))
    assert (checkpoint.find(tmp_path) / checkpoint.OPTIMIZER).exists() and path
    assert list((checkpoint.model_dir(tmp_path) / "llava").glob("*.safetensors"))
    saved = _full_copy(model, wrapped, optimizer)
    assert any(k.endswith("/exp_avg_sq") and v.abs().sum() > 0 for k, v in saved.items())
    _assert_equal(_loaded_copy(tmp_path), saved)


def _run_data(folder):
    """(folder, tiny student) with a corpus and a cache in `folder`: what tests/test_resume.run_config takes."""
    from olavlm.trainer.student.presets import build_tiny_student

    samples = make_corpus(folder / "corpus", shards=2, per_shard=6, text_only_every=5)
    make_cache(folder / "cache", samples, shapes=SHAPES)
    return folder, build_tiny_student(folder / "student", seed=0)


@pytest.mark.timeout(300)
def test_fsdp2_training_resumes_exactly_from_sharded_checkpoints(tmp_path, one_thread):
    """The loop end to end: FSDP2 with the frozen weights saved (sharded layout), resumed at step 2."""
    data = _run_data(tmp_path)
    full, resumed = tmp_path / "sharded", tmp_path / "sharded-resumed"
    train(run_config(data, full, fsdp=True, save_frozen=True))
    assert (checkpoint.find(full) / checkpoint.OPTIMIZER_SHARDS).is_dir()
    train(resume_config(full, resumed, fsdp=True))
    assert_same_run(full, resumed)

    # ola export of a sharded checkpoint: a plain LLaVA with the trained weights
    from transformers import LlavaForConditionalGeneration

    from olavlm.trainer.student.export import export_llava

    trained = load_student(checkpoint.model_dir(resumed))
    exported = LlavaForConditionalGeneration.from_pretrained(
        export_llava(checkpoint.model_dir(resumed), tmp_path / "export")
    )
    got, expected = exported.state_dict(), trained.merged_llava().state_dict()
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)


TRAIN_SCRIPT = """
import json, os, sys
sys.path.insert(0, os.getcwd())  # the repository root, for tests.test_checkpoint_sharded
import torch.distributed as dist
from safetensors.torch import save_file
import olavlm.trainer.train as loop
from olavlm.schemas.config import RunConfig, from_dict
from tests.test_checkpoint_sharded import _full_copy

config, reference, keys_dir = sys.argv[1:4]
real_save, real_accumulate = loop._save, loop._accumulate

def save(run, model, wrapped, optimizer, loader_state, step, d):  # and a full copy gathered in this run
    path = real_save(run, model, wrapped, optimizer, loader_state, step, d)
    copy = _full_copy(wrapped, wrapped, optimizer)  # a collective: every rank
    if d.main:
        save_file(copy, reference)
    return path

def accumulate(*args, **kwargs):  # each rank's sample keys, one line per step
    out = real_accumulate(*args, **kwargs)
    with open(os.path.join(keys_dir, f"rank{dist.get_rank()}.jsonl"), "a") as f:
        f.write(json.dumps(out[1]) + "\\n")
    return out

loop._save, loop._accumulate = save, accumulate
loop.train(from_dict(RunConfig, json.loads(open(config).read())))
"""


def _keys_sha256(keys: list[str]) -> str:
    import hashlib

    return hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]  # as the loop's metrics record them


@pytest.mark.slow  # torchrun with 2 fresh interpreters importing torch + transformers
@pytest.mark.timeout(400)
def test_fsdp2_run_of_two_processes_resumes_in_one(tmp_path, one_thread, monkeypatch):
    """train() end to end at another world size: the resumed weights and AdamW state are those the two
    processes had when they saved, and the resumed steps read only samples not read before the checkpoint."""
    import dataclasses
    import os
    import subprocess
    import sys

    import olavlm.trainer.train as loop
    from olavlm.schemas.config import to_dict
    from olavlm.trainer.train import read_metrics
    from tests.test_resume import ROOT

    data = _run_data(tmp_path)
    two, one = tmp_path / "two", tmp_path / "one"
    config, reference, keys_dir = tmp_path / "two.json", tmp_path / "saved.safetensors", tmp_path / "keys"
    keys_dir.mkdir()
    first = run_config(data, two, fsdp=True, save_frozen=True)
    first = dataclasses.replace(first, train=dataclasses.replace(first.train, steps=2))  # saves step 2
    config.write_text(json.dumps(to_dict(first)))
    script = tmp_path / "train.py"
    script.write_text(TRAIN_SCRIPT)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        str(script),
        str(config),
        str(reference),
        str(keys_dir),
    ]
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    saved = checkpoint.find(two)
    assert len(json.loads((saved / checkpoint.TRAINER).read_text())["rng"]) == 2
    expected = load_file(reference)  # gathered by the two processes, not read back through the shards
    assert any(k.endswith("/exp_avg") and v.abs().sum() > 0 for k, v in expected.items())
    read_before = {
        rank: [json.loads(line) for line in (keys_dir / f"rank{rank}.jsonl").read_text().splitlines()]
        for rank in (0, 1)
    }
    assert [_keys_sha256(keys) for keys in read_before[0]] == [m["keys_sha256"] for m in read_metrics(two)]

    # one process resumes: what it restored is exactly what the two had (checked before its first step)
    restored, read_after = {}, []
    real_restore, real_accumulate = loop._restore, loop._accumulate

    def restore(run, wrapped, optimizer, d):
        out = real_restore(run, wrapped, optimizer, d)
        restored.update(_full_copy(wrapped, wrapped, optimizer))
        return out

    def accumulate(*args, **kwargs):
        out = real_accumulate(*args, **kwargs)
        read_after.append(out[1])
        return out

    monkeypatch.setattr(loop, "_restore", restore)
    monkeypatch.setattr(loop, "_accumulate", accumulate)
    train(resume_config(two, one, fsdp=True))
    _assert_equal(restored, expected)
    metrics = read_metrics(one)
    assert [m["step"] for m in metrics] == [3, 4]
    assert len(json.loads((checkpoint.find(one) / checkpoint.TRAINER).read_text())["rng"]) == 1

    # the loader re-dealt what the two ranks had left (loader_state.rank_state, other_world): no sample again
    assert [_keys_sha256(keys) for keys in read_after] == [m["keys_sha256"] for m in metrics]
    before = [k for steps in read_before.values() for keys in steps for k in keys]
    after = [k for keys in read_after for k in keys]
    assert len(before) == len(set(before)) == 8 and len(after) == len(set(after)) == 4
    assert not set(before) & set(after)
