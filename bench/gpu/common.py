"""What every section shares: the JSON report, device memory helpers, and `Setup` (device, teachers, corpus)."""

from __future__ import annotations

import contextlib
import gc
import json
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from olavlm.bench.gpu.config import TEACHERS, GpuBenchConfig


# -- progress and the report ---------------------------------------------------------------------
class Report:
    """The JSON object of every figure; rewritten to `out` after each section (partial runs keep theirs)."""

    def __init__(self, out: str | None, log: Callable[[str], None], cuda_tests: str = ""):
        self.data: dict = {"complete": False}
        self.out = out
        self.cuda_tests = cuda_tests
        """`make test-gpu`'s JUnit file, counted into the summary."""
        self.start = time.perf_counter()
        self._log = log

    def log(self, message: str) -> None:
        self._log(f"[{time.perf_counter() - self.start:7.1f}s] {message}")

    def save(self) -> None:
        from olavlm.bench.gpu.summary import summary

        self.data["summary"] = summary(self.data, self.cuda_tests)
        if not self.out:
            return
        folder = os.path.dirname(os.path.abspath(self.out))
        os.makedirs(folder, exist_ok=True)
        staging = f"{self.out}.{uuid.uuid4().hex[:8]}.tmp"
        with open(staging, "w") as f:
            json.dump(self.data, f, indent=2)
        os.replace(staging, self.out)  # a reader never sees half a file

    @contextlib.contextmanager
    def section(self, name: str):
        self.log(f"== {name}")
        start = time.perf_counter()
        try:
            yield
        finally:
            self.data.setdefault("section_seconds", {})[name] = round(time.perf_counter() - start, 1)
            self.save()


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def reset_peak(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_gb(device: str) -> float | None:
    """Peak memory allocated by torch in this process since the last reset (None on CPU)."""
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.startswith("cuda") else None


def free(device: str) -> None:
    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


class DevicePeak:
    """Device-wide memory in use (all processes: the Ray actor's too), polled every 50 ms on CUDA."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.peak = self.baseline = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _used(self) -> int:
        import torch

        free, total = torch.cuda.mem_get_info()
        return total - free

    def _poll(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self._used())

    def __enter__(self) -> DevicePeak:
        if self.cuda:
            self.baseline = self.peak = self._used()
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            self._stop.set()
            self._thread.join()

    def figures(self) -> dict:
        if not self.cuda:
            return {"peak_device_memory_gb": None, "device_memory_before_gb": None}
        return {
            "peak_device_memory_gb": round(self.peak / 2**30, 2),
            "device_memory_before_gb": round(self.baseline / 2**30, 2),
        }


# -- the precompute jobs' configuration (also the bare loop's sources) -----------------------------
@dataclass(frozen=True)
class Setup:
    """What every section shares: device, teacher folder, corpus."""

    config: GpuBenchConfig
    device: str
    tmp: str
    teacher_folder: str | None
    """Folder of the full-size random teachers (None: the smoke run's tiny preset)."""
    log: Callable[[str], None]
    """Progress lines (the report's, with the elapsed time)."""

    @property
    def corpus(self) -> str:
        return os.path.join(self.tmp, "corpus")

    def job(self, names: tuple[str, ...], dtype: str, corpus: str, cache: str, **options):
        """The PrecomputeConfig of one job; `options`: other PrecomputeConfig fields (device_resize, ...)."""
        from olavlm.pipeline.precompute import PrecomputeConfig

        if self.teacher_folder is None:
            preset, overrides = "tiny", {}
        else:  # the paper recipe (input sizes, grid) with the random weights
            preset, overrides = "paper", {n: os.path.join(self.teacher_folder, n) for n in names}
        return PrecomputeConfig(
            corpus=corpus,
            cache=cache,
            teachers=names,
            preset=preset,
            overrides=overrides,
            dtype=self.config.storage_dtype,
            compute_dtype=dtype,
            batch_size=self.config.batch_size,
            shards_in_flight=self.config.shards_in_flight,
            progress=False,
            **{"compile": self.config.pipeline_compile, **options},
        )

    def sources(self, dtype: str = "float32"):
        return self.job(TEACHERS, dtype, self.corpus, os.path.join(self.tmp, "unused")).sources()


def load_teachers(setup: Setup, dtype: str) -> dict:
    import torch

    from olavlm.pipeline.teachers import load_teacher

    return {
        n: load_teacher(s, device=setup.device, dtype=getattr(torch, dtype))
        for n, s in setup.sources().items()
    }
