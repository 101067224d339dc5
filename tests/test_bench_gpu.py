"""`ola bench gpu`: the smoke run through the CLI gives every figure with sane values; its helpers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from olavlm.bench import gpu
from olavlm.bench.gpu import levers


def positive(value) -> bool:
    return isinstance(value, (int, float)) and value > 0 and np.isfinite(value)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_smoke_run_through_the_cli_reports_every_figure(tmp_path):
    out = tmp_path / "out" / "bench-gpu.json"
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "CUDA_VISIBLE_DEVICES": "",
    }  # the CPU path, on any machine
    run = subprocess.run(
        [sys.executable, "-m", "olavlm.cli.app", "bench", "gpu", "--json", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=540,
        env=env,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    data = json.loads(run.stdout)
    assert json.loads(out.read_text()) == data  # --out holds the same object
    assert "== pipeline" in run.stderr and "busy" in run.stderr  # progress as it goes, and the table
    assert data["complete"] is True and data["smoke"] is True
    assert data["device"].startswith("cpu") and data["torch"] == torch.__version__ and data["transformers"]
    assert set(gpu.SECTIONS) - {"bare"} <= set(data["section_seconds"])
    config = data["config"]
    assert config["batch_size"] == 4 and config["images"] == 8 and config["compute_dtypes"] == ["float32"]

    inputs = data["inputs"]
    assert inputs["images"] == 8 and inputs["batches"] == 2 and inputs["batch_size"] == 4
    assert positive(inputs["host_preprocess_images_per_s_per_core"])
    assert set(inputs["input_sizes"]) == set(gpu.TEACHERS)

    bare = data["bare"]["float32"]
    assert all(
        positive(bare["per_teacher"][n]["images_per_s"]) and bare["per_teacher"][n]["finite"]
        for n in gpu.TEACHERS
    )
    assert positive(bare["all_images_per_s"])
    # all three = images / summed seconds: slower than the slowest teacher alone
    assert bare["all_images_per_s"] < min(bare["per_teacher"][n]["images_per_s"] for n in gpu.TEACHERS)
    assert bare["peak_memory_gb"] is None  # torch.cuda's figure; none on CPU

    rows = {r["lever"]: r for r in data["levers"]["rows"]}
    assert set(rows) == {
        "baseline",
        "channels_last",
        "attn_eager",
        "attn_sdpa",
        "gpu_preprocess",
    }  # compile: off in smoke
    for row in rows.values():
        assert positive(row["all_images_per_s"]) and positive(row["speedup_vs_baseline"])
        assert all(positive(row["per_teacher"][n]["images_per_s"]) for n in gpu.TEACHERS)
    assert set(rows["attn_eager"]["attn_implementation"].values()) == {"eager"}
    assert all(0 <= d < 8 for d in rows["gpu_preprocess"]["mean_abs_diff_uint8_vs_host"].values())
    assert positive(rows["gpu_preprocess"]["host_decode_only_ms_per_image"])

    job = data["pipeline"]["float32"]["all"]
    assert job["images"] == 8 and job["errors"] == 0 and positive(job["images_per_s"])
    assert 0 < job["busy_fraction"] < 1.5 and 0 < job["actor_compute_share"] <= 1.0
    assert job["bare_images_per_s"] == bare["all_images_per_s"] and job["peak_device_memory_gb"] is None
    moved = data["pipeline"]["float32"][
        "all_device_resize"
    ]  # the --device-resize arm, against the same bare loop
    assert moved["images"] == 8 and moved["errors"] == 0 and positive(moved["images_per_s"])
    assert 0 < moved["busy_fraction"] < 1.5 and moved["bare_images_per_s"] == bare["all_images_per_s"]
    overlap = data["pipeline"]["float32"]["all_overlap"]  # actor_concurrency 2, against the same bare loop
    assert (
        overlap["images"] == 8 and overlap["errors"] == 0 and overlap["options"] == {"actor_concurrency": 2}
    )
    assert job["shards_in_flight"] == 3  # CPU-only: 2 x actors + 1

    seg = data["seg"]  # smoke: the three attention rows at float32, batch 4
    assert [(r["attention"], r["compile"], r["batch_size"]) for r in seg["rows"]] == [
        ("fused", "off", 4),
        ("sdpa", "off", 4),
        ("eager", "off", 4),
    ]
    for row in seg["rows"]:
        assert positive(row["images_per_s"]) and row["finite"] and row["cosine_min_vs_float32"] >= 0.999999

    train = data["train"]
    assert train["backend"] == "gloo" and train["world_size"] == 1 and train["batch_size"] == 2
    for key in (
        "step_s_loader",
        "step_s_in_memory",
        "cached_over_in_memory",
        "step_s_online_teachers",
        "online_over_cached",
        "samples_per_s_loader",
        "step_s_loader_median",
        "cached_over_in_memory_median",
    ):
        assert positive(train[key]), key
    assert train["student_params"] > train["trainable_params_pt"] > 0

    summary = data["summary"]
    assert (
        summary["pipeline_images_per_s"] == job["images_per_s"]
        and summary["busy_fraction"] == job["busy_fraction"]
    )
    assert summary["seg_images_per_s"] == bare["per_teacher"]["seg"]["images_per_s"]
    assert summary["cached_over_in_memory"] == train["cached_over_in_memory"]
    assert (
        summary["cuda_tests_passed"] is None and summary["met"]["cuda_tests_passed"] is None
    )  # no --cuda-tests

    table = gpu.format_table(data)
    assert "all three" in table and "gpu_preprocess" in table and "cached / in-memory" in table
    assert "all three, device resize" in table and "actor concurrency 2" in table
    assert "seg levers" in table and "goals met" in table


def test_defaults_of_the_full_and_the_smoke_run():
    full = gpu.gpu_bench_config(cuda=True)
    assert not full.smoke and full.compute_dtypes == ("float16", "bfloat16") and full.images == 1024
    assert full.per_teacher and full.compile and full.student == gpu.MID_STUDENT
    smoke = gpu.gpu_bench_config(cuda=False)
    assert smoke.smoke and smoke.compute_dtypes == ("float32",) and smoke.student == {}
    assert not smoke.per_teacher and not smoke.compile
    assert gpu.gpu_bench_config(cuda=False, images=32, compile=True).compile  # given values win
    from olavlm.schemas.errors import ConfigError

    for bad in ({"compute_dtypes": ("float8",)}, {"images": 2}, {"sections": ("nope",)}):
        with pytest.raises(ConfigError):
            gpu.gpu_bench_config(cuda=False, **bad)


def test_device_prepare_matches_the_host_geometry():
    from PIL import Image

    from olavlm.pipeline.preprocess import prepare

    rng = np.random.default_rng(0)
    smooth = np.kron(rng.integers(0, 255, (30, 40, 3)), np.ones((10, 10, 1))).astype(np.uint8)  # 300 x 400
    recipes = {
        "squash": {"resize": [112, 112], "resample": "bicubic"},
        "processor": {
            "resize": [160, 160],
            "resample": "bicubic",
            "processor_resize": [167, 167],
            "processor_resample": "bilinear",
        },
        "clip": {"resize_shortest": 64, "center_crop": [64, 64], "resample": "bicubic"},
    }
    for name, recipe in recipes.items():
        ours = gpu.device_prepare([smooth, smooth[:, ::-1].copy()], recipe, "cpu")
        host = np.stack([prepare(Image.fromarray(a), recipe) for a in (smooth, smooth[:, ::-1].copy())])
        assert ours.dtype == torch.uint8 and tuple(ours.shape) == host.shape, name
        assert np.abs(ours.numpy().astype(int) - host.astype(int)).mean() < 3, name


def test_compile_blocks_compiles_the_innermost_repeated_blocks():
    from torch import nn

    class Stage(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))

        def forward(self, x):
            for block in self.blocks:
                x = block(x)
            return x

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Linear(8, 8)
            self.stages = nn.ModuleList(Stage() for _ in range(2))  # holds ModuleLists: not compiled itself

        def forward(self, x):
            x = self.stem(x)
            for stage in self.stages:
                x = stage(x)
            return x

    torch.manual_seed(0)
    model = Model()
    x = torch.randn(2, 8)
    expected = model(x)
    assert gpu.compile_blocks(model, "eager") == 6
    torch.testing.assert_close(model(x), expected)


def test_busy_fraction_and_a_partial_table():
    bare = {
        "all_images_per_s": 100.0,
        "per_teacher": {n: {"images_per_s": 400.0, "peak_memory_gb": None} for n in gpu.TEACHERS},
        "peak_memory_gb": None,
    }
    assert gpu.busy_fraction(bare, "all", 90.0) == {"bare_images_per_s": 100.0, "busy_fraction": 0.9}
    assert gpu.busy_fraction(bare, "seg", 200.0)["busy_fraction"] == 0.5
    assert gpu.busy_fraction(None, "all", 90.0) == {}
    partial = {
        "complete": False,
        "device": "cpu",
        "bare": {"float16": bare},
    }  # a run stopped after the bare loop
    table = gpu.format_table(partial)
    assert "complete=False" in table and "100.0" in table and "pipeline img/s" in table


def test_a_failing_lever_is_a_row_with_its_error(monkeypatch, tmp_path):
    from olavlm.pipeline.preprocess import input_shape
    from olavlm.pipeline.presets import preset_sources
    from olavlm.pipeline.teachers import load_teacher

    teachers = {n: load_teacher(s) for n, s in preset_sources("tiny").items()}
    batches = [
        {
            n: torch.zeros((2, *input_shape(t.spec.preprocess), 3), dtype=torch.uint8)
            for n, t in teachers.items()
        }
    ]
    config = gpu.gpu_bench_config(
        cuda=False,
        images=2,
        shard_size=2,
        batch_size=2,
        channels_last=False,
        sdpa=True,
        gpu_preprocess=False,
        compile=True,
    )
    setup = gpu.Setup(config=config, device="cpu", tmp=str(tmp_path), teacher_folder=None, log=lambda m: None)

    def broken(module, backend):
        raise RuntimeError("inductor failed")

    monkeypatch.setattr(levers, "compile_blocks", broken)  # where run_levers looks it up
    rows = gpu.run_levers(setup, teachers, batches, gpu.bare_rates(teachers, batches, "cpu"), host={})
    assert [r["lever"] for r in rows] == ["baseline", "attn_eager", "attn_sdpa", "compile"]
    assert rows[-1] == {"lever": "compile", "error": "RuntimeError: inductor failed"}
    assert {t.module.config._attn_implementation for t in teachers.values()} == {"sdpa"}  # restored
    assert "inductor failed" in gpu.format_table({"levers": {"dtype": "float32", "rows": rows}})


def test_summary_reads_the_goal_figures_and_the_junit_counts(tmp_path):
    junit = tmp_path / "test-gpu.xml"
    junit.write_text(
        '<?xml version="1.0"?><testsuites><testsuite name="pytest" tests="7" failures="1" errors="0" '
        'skipped="2"></testsuite></testsuites>'
    )
    assert gpu.junit_counts(str(junit)) == {"passed": 4, "failed": 1, "skipped": 2}
    assert gpu.junit_counts(str(tmp_path / "absent.xml")) == {}
    bare = {"all_images_per_s": 230.0, "per_teacher": {"seg": {"images_per_s": 410.0}}}
    data = {
        "device": "NVIDIA H200",
        "config": {"compute_dtypes": ["float16", "bfloat16"]},
        "bare": {"float16": bare, "bfloat16": {"all_images_per_s": 1.0}},
        "pipeline": {"float16": {"all": {"images_per_s": 210.0, "busy_fraction": 0.91}}},
        "seg": {
            "rows": [
                {
                    "attention": "fused",
                    "compile": "off",
                    "dtype": "float16",
                    "batch_size": 64,
                    "images_per_s": 300.0,
                },
                {
                    "attention": "fused",
                    "compile": "default",
                    "dtype": "float16",
                    "batch_size": 64,
                    "images_per_s": 420.0,
                },
                {"attention": "fused", "compile": "reduce-overhead", "error": "RuntimeError: x"},
            ]
        },
        "train": {"cached_over_in_memory": 1.05},
    }
    summary = gpu.summary(data, str(junit))
    assert summary["pipeline_images_per_s"] == 210.0 and summary["bare_images_per_s"] == 230.0
    assert summary["seg_images_per_s"] == 410.0 and summary["seg_best_images_per_s"] == 420.0
    assert summary["seg_best_lever"]["compile"] == "default"
    assert summary["cuda_tests_passed"] == 4 and summary["cuda_tests_failed"] == 1
    assert summary["met"] == {
        "pipeline_images_per_s": True,
        "busy_fraction": True,
        "seg_images_per_s": True,
        "cached_over_in_memory": False,  # at most 1.02
        "cuda_tests_passed": False,  # one failed
    }
    partial = gpu.summary({"device": "cpu"})  # a run stopped before anything was measured
    assert partial["pipeline_images_per_s"] is None and partial["met"]["busy_fraction"] is None


@pytest.mark.slow  # five loads of the tiny seg teacher and a dynamo trace: 8 s idle, 32 s under load
def test_seg_rows_cover_each_lever_and_compiled_rows_match_the_reference(tmp_path):
    """The full run's rows, then the section itself at tiny size with a compiled row (dynamo's eager backend)."""
    full = gpu.gpu_bench_config(cuda=True)
    wanted = [(r["attention"], r["compile"], r["dtype"], r["batch_size"]) for r in gpu.seg_rows_wanted(full)]
    assert wanted == [
        ("fused", "off", "float16", 64),
        ("sdpa", "off", "float16", 64),
        ("eager", "off", "float16", 64),
        ("fused", "default", "float16", 64),
        ("fused", "reduce-overhead", "float16", 64),
        ("fused", "off", "bfloat16", 64),
        ("fused", "off", "float16", 32),
        ("fused", "off", "float16", 128),
    ]
    config = gpu.gpu_bench_config(
        cuda=False,
        images=4,
        shard_size=4,
        batch_size=2,
        seg_images=4,
        compile=True,
        seg_compile_modes=("default",),
    )
    setup = gpu.Setup(config=config, device="cpu", tmp=str(tmp_path), teacher_folder=None, log=lambda m: None)
    rng = np.random.default_rng(0)
    batches = [
        {"seg": torch.from_numpy(rng.integers(0, 256, (2, 167, 167, 3), dtype=np.uint8))} for _ in range(2)
    ]
    seg = gpu.run_seg_levers(setup, batches)
    assert [(r["attention"], r["compile"]) for r in seg["rows"]] == [
        ("fused", "off"),
        ("sdpa", "off"),
        ("eager", "off"),
        ("fused", "default"),
    ]
    for row in seg["rows"]:
        assert "error" not in row, row
        assert positive(row["images_per_s"]) and row["cosine_min_vs_float32"] >= 0.999999
    assert seg["images"] == 4 and positive(seg["tflop_per_image"])
