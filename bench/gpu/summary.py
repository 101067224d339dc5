"""The run's `"summary"`: the few figures the GPU goals are stated in (TARGETS), read off the report, and
the CUDA tests' counts from `make test-gpu`'s JUnit file. Rewritten with the report after every section,
so a partial run's summary holds what it measured and None for the rest.
"""

from __future__ import annotations

import os

from olavlm.bench.gpu.config import TARGETS


def junit_counts(path: str) -> dict[str, int]:
    """{"passed", "failed", "skipped"} of a pytest JUnit XML file; {} when there is none."""
    import xml.etree.ElementTree as ElementTree

    if not path or not os.path.exists(path):
        return {}
    root = ElementTree.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    count = {
        key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")
    }
    failed = count["failures"] + count["errors"]
    return {
        "passed": count["tests"] - failed - count["skipped"],
        "failed": failed,
        "skipped": count["skipped"],
    }


def summary(data: dict, cuda_tests: str = "") -> dict:
    """The goal figures at the pipeline's defaults (first compute dtype: what `auto` picks on CUDA), the best
    seg lever row, the tests' counts, and which TARGETS are met (None: not measured)."""
    dtypes = data.get("config", {}).get("compute_dtypes") or [None]
    pipeline = data.get("pipeline", {}).get(dtypes[0], {}).get("all", {})
    bare = data.get("bare", {}).get(dtypes[0], {})
    seg_rows = [r for r in data.get("seg", {}).get("rows", []) if "error" not in r]
    best = max(seg_rows, key=lambda r: r["images_per_s"], default=None)
    tests = junit_counts(cuda_tests)
    figures = {
        "device": data.get("device"),
        "compute_dtype": dtypes[0],
        "pipeline_images_per_s": pipeline.get("images_per_s"),
        "busy_fraction": pipeline.get("busy_fraction"),
        "bare_images_per_s": bare.get("all_images_per_s"),
        "seg_images_per_s": bare.get("per_teacher", {}).get("seg", {}).get("images_per_s"),
        "cached_over_in_memory": data.get("train", {}).get("cached_over_in_memory"),
        "cuda_tests_passed": tests.get("passed"),
        "cuda_tests_failed": tests.get("failed"),
        "seg_best_images_per_s": best["images_per_s"] if best else None,
        "seg_best_lever": {k: best[k] for k in ("attention", "compile", "dtype", "batch_size")}
        if best
        else None,
    }
    met = {}
    for key, goal in TARGETS.items():
        value = figures.get(key)
        lower_is_better = key == "cached_over_in_memory"
        met[key] = None if value is None else (value <= goal if lower_is_better else value >= goal)
    met["cuda_tests_passed"] = None if not tests else tests["passed"] > 0 and tests["failed"] == 0
    return {**figures, "met": met}
