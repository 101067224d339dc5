"""`ola bench gpu`: the GPU figures of docs/BENCHMARKS.md in one command; a reduced smoke test on CPU.

Sections, in order. Each prints progress lines on stderr and rewrites `--out` (one JSON
object, `"complete": false` until the end), so a partial run still tells something.

1. teachers  The three paper teachers at full size (configs as the hub checkpoints state
             them, ~1.2 B parameters), seeded random weights built on the GPU, saved with
             `save_pretrained` in the hub layouts (unCLIP's `image_encoder/` +
             `feature_extractor/`) once under `$OLAVLM_TEACHERS_DIR/paper-random-v1-p2`, and
             loaded by every later step through `from_pretrained`. `--smoke`: the tiny preset.
2. inputs    The demo corpus (`--images` photos in shards of `--shard-size`), decoded and
             preprocessed once on the host (`preprocess_batches`, as the pipeline's CPU task
             does): the host preprocessing rate of one core is timed on the first shard.
3. bare      Per compute dtype: the teachers loaded in this process, forward over the
             pre-decoded batches (pinned host memory, copied per batch as the actor does),
             one teacher at a time after a warm-up batch: images/s per teacher; all three =
             images / summed seconds (the actor runs its teachers one after the other);
             peak allocated GPU memory (all three teachers' weights resident, as in the actor).
4. levers    At the first compute dtype, in the bare loop, each a row beside the baseline:
             channels-last weights, attention eager vs sdpa (`set_attn_implementation`),
             `torch.compile` of every repeated block (regional: compile time reported apart),
             batched GPU preprocessing (decode once on the host, resize + crop on the device).
5. pipeline  Per compute dtype: `precompute` (the function `ola precompute` calls), one job
             for the three teachers together (and, at the first dtype, one per teacher: each
             job costs an actor start and a model load), in one Ray session after a warm-up
             job. busy fraction = pipeline images/s / bare images/s of the same teachers and
             dtype (as `ola bench precompute` computes it); the actor's own compute share;
             device-wide peak memory polled during the job. At the first dtype a second
             three-teacher job runs with `--device-resize` (label all_device_resize; the host
             only decodes, the actor resizes), divided by the same bare loop.
6. train     A mid-size student (CLIP-L-width vision tower at 336 px + a 16-layer 2048-wide
             Llama, ~0.9 B) in bf16 autocast, PT stage, DDP over a 1-process group (nccl on
             CUDA, gloo on CPU): step time with the streaming loader over the pipeline's
             cache, with the same batches in memory, and with the teachers run online inside
             the step one image at a time (the authors' design). Per-step times after a
             warm-up of workers + 2 steps; means (the figure) and medians.

Design choices and their cost:
- The pipeline jobs are short (1024 images: seconds each), so the ramp (the first batch is
  decoded while the actor waits) and the tail (the last shard's compression and write)
  weigh on the end-to-end rate; the actor compute share is reported beside it, and
  `--images` makes the job longer. The bare loop has a warm-up batch, the pipeline has not.
- Run time on one H200 with CUDA: the smoke run 136 s, of which 74 s compiled the tiny
  teachers' blocks (cold inductor cache); the full run is estimated at ~6 minutes, compile
  about 1.5 of them (`--no-compile` for ~5 minutes).
- The online step uses the pipeline's own teachers (the same weights as the cache), so
  cached and online targets are the same values; `ola bench train` (CPU) builds its own
  teacher-like models instead, which do not fit the smoke path's 60 s on 2 cores.
- The GPU preprocessing lever runs the pipeline's own `preprocess.device_prepare` (what
  `ola precompute --device-resize` runs), `F.interpolate(antialias=True)`, which differs from
  PIL's resize by a fraction of a uint8 level on average (reported); the pipeline records that
  choice in the teachers' spec (`resize_on`), hence another cache fingerprint.

Layout: a subpackage (listed in pyproject.toml's packages), one module per part of the run, each
under ~400 lines; this file only re-exports, so `from olavlm.bench.gpu import ...` keeps working.
  config.py    constants (TEACHERS, SECTIONS, TARGETS, MID_STUDENT), GpuBenchConfig, gpu_bench_config
  common.py    Report (the JSON written after each section), device memory helpers, Setup
  teachers.py  1. paper_configs (the one copy; tests import it), build/save of the random teachers
  bare.py      2. predecode (inputs)  3. forward_rate, bare_rates (the bare loop)
  levers.py    4. run_levers and one function per lever; compile_blocks (device_prepare: pipeline.preprocess)
  pipeline.py  5. run_job, busy_fraction, run_pipeline
  train.py     6. train_bench and its steps
  run.py       the driver: run_gpu_bench, run_sections, environment
  table.py     format_table
Cost: a patch of a lever helper in a test must target its module (`levers.compile_blocks`), not this one.
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
    "load_teachers",
    "paper_configs",
    "predecode",
    "run_gpu_bench",
    "run_job",
    "run_levers",
    "run_pipeline",
    "run_sections",
    "save_paper_teachers",
    "train_bench",
    "weights_gb",
]
