"""The run's configuration: what `ola bench gpu` measures, the defaults of the full and the smoke run."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

TEACHERS = ("depth", "seg", "gen")
PAPER_RANDOM_VERSION = 1
"""Bump when `paper_configs` changes, so that an old folder of random teachers is not reused."""
TARGETS = {
    "pipeline_images_per_s": 200.0,
    "busy_fraction": 0.90,
    "seg_images_per_s": 400.0,
    "cached_over_in_memory": 1.02,
}
"""docs/ARCHITECTURE.md's performance targets on one H200 (the summary says which are met;
cached_over_in_memory: at most, the others: at least)."""
SECTIONS = ("teachers", "inputs", "bare", "levers", "seg", "pipeline", "train")

MID_STUDENT = dict(
    image_size=336,
    patch_size=14,
    vision_hidden=1024,
    vision_layers=24,
    llm_hidden=2048,
    llm_layers=16,
    llm_heads=16,
)
"""`build_tiny_student` sizes of the mid-size student (576 image tokens, ~0.9 B parameters)."""


@dataclass(frozen=True, kw_only=True)
class GpuBenchConfig:
    """What `ola bench gpu` runs; `gpu_bench_config` fills the defaults of the full and the smoke run."""

    smoke: bool
    """Tiny preset teachers, a few images, the tiny student: the CPU smoke test of every code path."""
    images: int
    """Images in the benchmark corpus (built on the fly from the bundled demo photos)."""
    shard_size: int
    """Images per corpus shard (a multiple of batch_size keeps every batch full)."""
    batch_size: int
    """Images per teacher forward, in the bare loop and in the pipeline."""
    compute_dtypes: tuple[str, ...]
    """Teacher compute dtypes: float16 and bfloat16 on CUDA, float32 on CPU."""
    storage_dtype: str = "float16"
    """Cache storage dtype of the pipeline jobs."""
    per_teacher: bool = True
    """Also run one pipeline job per teacher at the first compute dtype (else only the three together)."""
    shards_in_flight: int | None = None
    """Shards preprocessed at once in the pipeline (None: precompute's default, 2 x actors + 1)."""
    channels_last: bool = True
    """Lever row: channels-last weights."""
    sdpa: bool = True
    """Lever rows: attention eager vs sdpa."""
    compile: bool = True
    """Lever row: torch.compile of the repeated blocks."""
    compile_backend: str = "inductor"
    """torch.compile backend (the smoke run uses 'eager': tracing without code generation)."""
    gpu_preprocess: bool = True
    """Lever row: resize and crop on the device from host-decoded uint8 images."""
    seg_images: int = 512
    """Seg section: images per row (the first of the corpus, in full batches); 0 skips the section."""
    seg_batch_sizes: tuple[int, ...] = (32, 128)
    """Seg section: batch sizes of the extra rows (fused attention, first compute dtype)."""
    seg_compile_modes: tuple[str, ...] = ("default", "reduce-overhead")
    """Seg section: torch.compile modes of the fused path, one row each (when `compile` is on)."""
    pipeline_overlap: bool = True
    """Pipeline: an arm of the three-teacher job at the first compute dtype with actor_concurrency 2 (a batch's
    copy back and hand-off overlap the next forward): its busy fraction beside the default job's."""
    pipeline_compile: str = "off"
    """Pipeline jobs: the actors' torch.compile mode (precompute's --compile)."""
    cuda_tests: str = ""
    """JUnit XML of `make test-gpu`: its counts go into the summary (cuda_tests_passed)."""
    pipeline_device_resize: bool = True
    """Pipeline: a second arm of the three-teacher job at the first compute dtype with `--device-resize`
    (the host only decodes, the actor resizes): its busy fraction beside the host-resize job's."""
    train: bool = True
    """Run the training-step section."""
    train_steps: int = 20
    """Timed steps with the loader and with the same batches in memory."""
    train_batch_size: int = 16
    """Samples per training step."""
    train_workers: int = 8
    """DataLoader workers of the training loader (capped at cores - 1)."""
    online_steps: int = 2
    """Timed steps with the teachers online (0 skips them)."""
    student: dict = dataclasses.field(default_factory=lambda: dict(MID_STUDENT))
    """`build_tiny_student` sizes of the student ({} = the tiny student)."""
    sections: tuple[str, ...] = SECTIONS
    """Sections to run (the train section runs its own precompute job when pipeline is left out)."""
    teachers_dir: str = ""
    """Where the full-size random teachers are saved ('' = $OLAVLM_TEACHERS_DIR or ~/.cache/olavlm/teachers)."""
    seed: int = 0

    def __post_init__(self) -> None:
        from olavlm.pipeline.precompute import COMPUTE_DTYPES
        from olavlm.schemas.errors import ConfigError
        from olavlm.schemas.spec import STORAGE_DTYPES

        bad = [d for d in self.compute_dtypes if d not in COMPUTE_DTYPES or d == "auto"]
        if not self.compute_dtypes or bad:
            raise ConfigError(
                f"--dtypes {','.join(self.compute_dtypes)!r}: give float32, float16 and/or bfloat16"
            )
        if self.storage_dtype not in STORAGE_DTYPES:
            raise ConfigError(
                f"--storage-dtype {self.storage_dtype!r} is not one of {', '.join(STORAGE_DTYPES)}"
            )
        if min(self.images, self.shard_size, self.batch_size, self.train_batch_size, self.train_steps) < 1:
            raise ConfigError(
                "--images, --shard-size, --batch-size, --train-batch-size, --train-steps must be >= 1"
            )
        if self.images < self.batch_size or self.shard_size < self.batch_size:
            raise ConfigError(
                f"--images ({self.images}) and --shard-size ({self.shard_size}) must be at least "
                f"--batch-size ({self.batch_size}): only full batches are timed"
            )
        from olavlm.pipeline.config import COMPILE_MODES

        bad_modes = [m for m in (*self.seg_compile_modes, self.pipeline_compile) if m not in COMPILE_MODES]
        if bad_modes:
            raise ConfigError(f"compile mode(s) {bad_modes}: choose from {', '.join(COMPILE_MODES)}")
        if self.seg_images < 0 or min(self.seg_batch_sizes, default=1) < 1:
            raise ConfigError("--seg-images must be >= 0 (0 skips the seg section), --seg-batch-sizes >= 1")
        unknown = [s for s in self.sections if s not in SECTIONS]
        if unknown:
            raise ConfigError(f"--sections: unknown {unknown} (choose from {', '.join(SECTIONS)})")


def gpu_bench_config(*, smoke: bool | None = None, cuda: bool | None = None, **given) -> GpuBenchConfig:
    """Defaults of the full GPU run (~5 minutes on one H100) or of the smoke run (< 60 s on 2 CPU cores)."""
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    smoke = not cuda if smoke is None else smoke
    dtypes = ("float16", "bfloat16") if cuda else ("float32",)
    if smoke:
        # one pipeline job and no compilation: each actor start and each dynamo trace costs
        # seconds on 2 cores (--per-teacher / --compile turn them back on); two shards of one
        # batch each: the fewest images that still run every path (several shards in flight)
        defaults = dict(
            images=8,
            shard_size=4,
            batch_size=4,
            train_steps=2,
            train_batch_size=2,
            train_workers=1,
            online_steps=1,
            student={},
            per_teacher=False,
            seg_images=8,
            seg_batch_sizes=(),
            compile=False,
            compile_backend="inductor" if cuda else "eager",
        )
    else:
        defaults = dict(images=1024, shard_size=128, batch_size=64)
    defaults["compute_dtypes"] = dtypes
    defaults.update({k: v for k, v in given.items() if v is not None})
    return GpuBenchConfig(smoke=smoke, **defaults)
