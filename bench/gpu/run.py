"""The driver: the sections in order, each rewriting the JSON report as it ends (see the package docstring)."""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from olavlm.bench.gpu.bare import bare_rates, predecode, weights_gb
from olavlm.bench.gpu.common import Report, Setup, free, load_teachers
from olavlm.bench.gpu.config import TARGETS, TEACHERS, GpuBenchConfig
from olavlm.bench.gpu.levers import run_levers
from olavlm.bench.gpu.pipeline import run_job, run_pipeline
from olavlm.bench.gpu.seg import run_seg_levers
from olavlm.bench.gpu.teachers import build_paper_teachers
from olavlm.bench.gpu.train import train_bench


def environment(device: str) -> dict:
    import ray
    import torch
    import transformers

    cuda = device.startswith("cuda")
    return {
        "device": torch.cuda.get_device_name() if cuda else f"cpu ({os.cpu_count()} cores)",
        "device_memory_gb": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        if cuda
        else None,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "ray": ray.__version__,
        "python": sys.version.split()[0],
    }


def run_gpu_bench(
    config: GpuBenchConfig,
    *,
    out: str | None = None,
    log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True),
) -> dict:
    """Run the sections (see the package docstring); -> every figure in one dict (also written to `out`)."""
    import torch
    import transformers

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    transformers.utils.logging.disable_progress_bar()  # save_pretrained's bars: noise in the progress lines
    report = Report(out, log, config.cuda_tests)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not config.smoke:
        report.log(
            "warning: no CUDA device; the full-size run on a CPU takes hours (the smoke run is --smoke)"
        )
    report.data.update(
        environment(device), smoke=config.smoke, config=dataclasses.asdict(config), targets=TARGETS
    )
    report.log(
        f"device {report.data['device']}, torch {report.data['torch']}, "
        f"transformers {report.data['transformers']}, smoke={config.smoke}"
    )
    report.save()
    with tempfile.TemporaryDirectory(prefix="ola-bench-gpu-") as tmp:
        with report.section("teachers"):
            teacher_folder = None
            if not config.smoke:
                from olavlm.pipeline.presets import teachers_dir

                start = time.perf_counter()
                root = Path(config.teachers_dir) if config.teachers_dir else teachers_dir()
                folder, params, reused = build_paper_teachers(root, device)
                teacher_folder = str(folder)
                report.data["teachers"] = {
                    "folder": teacher_folder,
                    "reused": reused,
                    "params": params,
                    "total_params": sum(params.values()),
                    "build_s": round(time.perf_counter() - start, 1),
                }
            else:
                report.data["teachers"] = {
                    "folder": "tiny preset",
                    "reused": None,
                    "params": None,
                    "total_params": None,
                    "build_s": 0.0,
                }
            report.log(
                f"teachers: {report.data['teachers']['folder']} "
                f"({report.data['teachers']['total_params'] or 'tiny'} parameters)"
            )
        setup = Setup(config=config, device=device, tmp=tmp, teacher_folder=teacher_folder, log=report.log)
        from olavlm.schemas.corpus_build import build_demo_corpus

        build_demo_corpus(setup.corpus, samples=config.images, shard_size=config.shard_size)
        train_cache = run_sections(setup, report)
        if config.train and "train" in config.sections:
            with report.section("train"):
                if train_cache is None:  # the pipeline section did not run: one job for the cache
                    from olavlm.pipeline.precompute import ray_session

                    train_cache = os.path.join(tmp, "cache-train")
                    with ray_session(None):
                        run_job(setup, TEACHERS, config.compute_dtypes[-1], train_cache)
                report.data["train"] = train_bench(setup, train_cache)
    report.data["complete"] = True
    report.data["total_s"] = round(time.perf_counter() - report.start, 1)
    report.save()
    report.log(f"done in {report.data['total_s']} s")
    return report.data


def run_sections(setup: Setup, report: Report) -> str | None:
    """inputs, bare, levers, seg, pipeline; -> the cache kept for the train section (None if no job ran)."""
    config, device = setup.config, setup.device
    wanted = set(config.sections)
    batches: list[dict] = []
    with report.section("inputs"):
        start = time.perf_counter()
        teachers = load_teachers(setup, config.compute_dtypes[0])
        load_s = time.perf_counter() - start
        recipes = {n: t.spec.preprocess for n, t in teachers.items()}
        report.data["teachers"].update(
            target_shapes={n: list(t.spec.shape) for n, t in teachers.items()},
            weights_gb={n: weights_gb(t) for n, t in teachers.items()},
            recipes=recipes,
            spec_fingerprints={n: t.spec.fingerprint for n, t in teachers.items()},
        )
        batches, host = predecode(setup, recipes)
        report.data["inputs"] = host
        report.log(
            f"inputs: {host['images']} images in {host['batches']} batches of {host['batch_size']}; host "
            f"preprocessing {host['host_preprocess_images_per_s_per_core']} images/s per core"
        )
    report.data.setdefault("bare", {})
    for index, dtype in enumerate(config.compute_dtypes):
        if "bare" not in wanted and not (index == 0 and "levers" in wanted):
            break
        with report.section(f"bare {dtype}"):
            if index:
                del teachers
                free(device)
                start = time.perf_counter()
                teachers = load_teachers(setup, dtype)
                load_s = time.perf_counter() - start
            rates = bare_rates(teachers, batches, device)
            report.data["bare"][dtype] = {
                **rates,
                "load_s": round(load_s, 1),
                "weights_gb": {n: weights_gb(t) for n, t in teachers.items()},
            }
            report.log(
                f"bare {dtype}: "
                + ", ".join(f"{n} {v['images_per_s']:.1f}" for n, v in rates["per_teacher"].items())
                + f"; all three {rates['all_images_per_s']:.1f} images/s, peak {rates['peak_memory_gb']} GB"
            )
        if index == 0 and "levers" in wanted:
            with report.section("levers"):
                report.data["levers"] = {
                    "dtype": dtype,
                    "images": report.data["inputs"]["images"],
                    "rows": run_levers(setup, teachers, batches, rates, report.data["inputs"]),
                }
    del teachers
    free(device)
    if "seg" in wanted and config.seg_images:
        with report.section("seg"):
            report.data["seg"] = run_seg_levers(setup, batches)
    del batches
    free(device)
    if "pipeline" not in wanted:
        return None
    return run_pipeline(setup, report)
