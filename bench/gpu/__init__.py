"""`ola bench gpu`: the GPU figures of docs/BENCHMARKS.md in one command; a reduced smoke run on CPU.

Sections, in order, a module each (docs/BENCHMARKS.md, "GPU", says what each measures): teachers.py
(the three paper teachers at full size, seeded random weights saved once in the hub layouts), bare.py
(inputs decoded once on the host, then the bare forward loop), levers.py (lever rows of all three),
seg.py (the seg teacher's levers: attention, compile, dtype, batch size), pipeline.py (`precompute`
jobs, busy fraction), train.py (the training step: cached vs in memory vs online teachers). run.py
drives them, config.py holds the defaults, common.py the report (rewritten to `--out` after every
section, with summary.py's summary), table.py the text table.

Design choice: a failing lever is a row with its error and every section is saved as it ends, so a
partial run still tells something. Cost: the pipeline jobs are short, so their ramp and tail weigh on
the end-to-end rate (the actor's compute share is reported beside it). This file only re-exports: a
test's patch of a helper targets its module (`levers.compile_blocks`).
"""

from olavlm.bench.gpu.bare import bare_rates, forward_rate, predecode, weights_gb
from olavlm.bench.gpu.common import DevicePeak, Report, Setup, load_teachers
from olavlm.bench.gpu.config import (
    MID_STUDENT,
    PAPER_RANDOM_VERSION,
    SECTIONS,
    TARGETS,
    TEACHERS,
    GpuBenchConfig,
    gpu_bench_config,
)
from olavlm.bench.gpu.levers import compile_blocks, decoded_batches, device_prepare, run_levers
from olavlm.bench.gpu.pipeline import busy_fraction, run_job, run_pipeline
from olavlm.bench.gpu.run import environment, run_gpu_bench, run_sections
from olavlm.bench.gpu.seg import run_seg_levers, seg_rows_wanted
from olavlm.bench.gpu.summary import junit_counts, summary
from olavlm.bench.gpu.table import format_table
from olavlm.bench.gpu.teachers import build_paper_teachers, paper_configs, save_paper_teachers
from olavlm.bench.gpu.train import train_bench

__all__ = [
    "MID_STUDENT",
    "PAPER_RANDOM_VERSION",
    "SECTIONS",
    "TARGETS",
    "TEACHERS",
    "DevicePeak",
    "GpuBenchConfig",
    "Report",
    "Setup",
    "bare_rates",
    "build_paper_teachers",
    "busy_fraction",
    "compile_blocks",
    "decoded_batches",
    "device_prepare",
    "environment",
    "format_table",
    "forward_rate",
    "gpu_bench_config",
    "junit_counts",
    "load_teachers",
    "paper_configs",
    "predecode",
    "run_gpu_bench",
    "run_job",
    "run_levers",
    "run_pipeline",
    "run_sections",
    "run_seg_levers",
    "save_paper_teachers",
    "seg_rows_wanted",
    "summary",
    "train_bench",
    "weights_gb",
]
