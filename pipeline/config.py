"""`PrecomputeConfig`: one precompute job, validated when it is built.

A frozen, keyword-only dataclass with a docstring under each field; `ola precompute` generates one
option per field from it (cli/options.py). Invalid values fail here, with the option's name, before
Ray starts. Cost: a teacher name is checked against the preset only in `sources()`, when the job asks.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from olavlm.schemas.errors import ConfigError
from olavlm.schemas.spec import STORAGE_DTYPES

from .presets import PRESETS, TEACHER_NAMES, TeacherSource, preset_sources, with_overrides

COMPUTE_DTYPES = ("auto", "float32", "float16", "bfloat16")
SWIN_ATTENTION = ("auto", "fused", "transformers")
"""Seg attention: fused = one SDPA call per Swin block (swin_attention.py); auto = fused where supported."""
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
"""`torch.compile` modes of the teachers' forward ("off": eager)."""


@dataclass(frozen=True, kw_only=True)
class PrecomputeConfig:
    """One precompute job; the CLI options map onto these fields."""

    corpus: str
    """Folder, brace pattern or fsspec URL of WebDataset tar shards."""
    cache: str
    """Target cache root: local folder or fsspec URL (s3://...)."""
    teachers: tuple[str, ...] = TEACHER_NAMES
    """Which teachers to run (and to resume): any of depth, seg, gen."""
    preset: str = "paper"
    """Teacher weights: paper (hub checkpoints), tiny or small (seeded random, offline)."""
    overrides: dict[str, str] = field(default_factory=dict)
    """Teacher name -> hub id or folder replacing the preset's weights (same recipe)."""
    dtype: str = "float16"
    """Storage dtype: float16, bfloat16 or int8 (lossy, fidelity recorded per shard)."""
    compute_dtype: str = "auto"
    """Teacher compute dtype: auto = float16 on GPU, float32 on CPU."""
    batch_size: int = 16
    """Images per teacher forward (batches never cross shard boundaries)."""
    address: str | None = None
    """Ray cluster to join: HOST:PORT of `ray start --head`, or auto (RAY_ADDRESS, else the cluster `ray start` registered on this machine). Default: a fresh local Ray that ignores RAY_ADDRESS and any `ray start` cluster (a Ray this process already runs is reused)."""
    runtime_env: dict[str, Any] = field(default_factory=dict)
    """Ray runtime_env of the job as JSON (working_dir, pip, env_vars, ...), passed to ray.init: what the cluster's nodes lack."""
    max_restarts: int = 3
    """Restarts of a teacher actor whose process or node dies (it reloads its teachers; its batches are retried)."""
    max_retries: int = 3
    """Retries of a preprocess, teacher or write call lost with its worker or node (safe: every write is idempotent)."""
    actors: int | None = None
    """Teacher actors; default: one per GPU, or 1 without GPUs."""
    num_gpus: int | None = None
    """GPUs to use; default: all GPUs Ray sees (0 = CPU only)."""
    cpu_threads: int | None = None
    """torch threads per CPU actor; default: the cluster's CPUs divided among the actors."""
    shards_in_flight: int | None = None
    """Shards preprocessed at once; default: with GPUs one per CPU the actors leave (capped by Ray's object
    store), without GPUs 2 x actors + 1 (the tasks share the cores with torch)."""
    swin_attention: str = "auto"
    """Seg teacher's window attention: fused (one SDPA call per block, bias and shift mask in the kernel),
    transformers (its own), auto (fused where the transformers version has the layout it needs)."""
    compile: str = "off"
    """torch.compile the teachers' forward at their one input shape: off, default, reduce-overhead (CUDA
    graphs), max-autotune, max-autotune-no-cudagraphs. Costs compile time at each actor start."""
    actor_concurrency: int = 1
    """Batches an actor works on at once (threads, each on its own CUDA stream): 2 overlaps a batch's copy
    back and hand-off to the object store with the next one's forward (overlapping calls both count in
    the summary's teacher busy share, which can then pass 1)."""
    dry_run: bool = False
    """Print the plan and exit."""
    overwrite: bool = False
    """Replace a teacher whose stored spec differs (deletes its committed shards)."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    """fsspec options of the cache root and, unless --corpus-storage-options is given, of the corpus (e.g. {'client_kwargs': {'endpoint_url': ...}})."""
    corpus_storage_options: dict[str, Any] = field(default_factory=dict)
    """fsspec options of the corpus when they differ from the cache's; default: --storage-options."""
    progress: bool = True
    """Show a progress bar (images/s, ETA) on stderr."""
    jpeg_draft: bool = False
    """Decode JPEGs at a reduced DCT scale per teacher (faster on large photos; the targets then differ
    from the authors' full decode, docs/FIDELITY.md item 7; recorded in each teacher's spec)."""
    device_resize: bool = False
    """Resize and crop on the teachers' device: the host only decodes and ships uint8 images (its cost per
    image falls to the decode); antialiased torch filters instead of PIL's, a fraction of a grey level apart
    (docs/FIDELITY.md item 9; recorded in each teacher's spec as resize_on device, so never mixed with a host cache)."""

    def __post_init__(self) -> None:
        if self.dtype not in STORAGE_DTYPES:
            raise ConfigError(f"--dtype {self.dtype!r} is not one of {', '.join(STORAGE_DTYPES)}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ConfigError(
                f"compute dtype {self.compute_dtype!r} is not one of {', '.join(COMPUTE_DTYPES)}"
            )
        if self.preset not in PRESETS:
            raise ConfigError(f"--preset {self.preset!r} is not one of {', '.join(PRESETS)}")
        if not self.teachers or len(set(self.teachers)) != len(self.teachers):
            raise ConfigError(f"--teachers {','.join(self.teachers)!r}: give each teacher once, at least one")
        if self.batch_size < 1 or (self.actors is not None and self.actors < 1):
            raise ConfigError("--batch-size and --actors must be >= 1")
        if self.max_restarts < 0 or self.max_retries < 0:
            raise ConfigError("--max-restarts and --max-retries must be >= 0")
        if self.swin_attention not in SWIN_ATTENTION:
            raise ConfigError(
                f"--swin-attention {self.swin_attention!r} is not one of {', '.join(SWIN_ATTENTION)}"
            )
        if self.compile not in COMPILE_MODES:
            raise ConfigError(f"--compile {self.compile!r} is not one of {', '.join(COMPILE_MODES)}")
        if self.actor_concurrency < 1 or (self.shards_in_flight is not None and self.shards_in_flight < 1):
            raise ConfigError("--actor-concurrency and --shards-in-flight must be >= 1")

    @property
    def corpus_options(self) -> dict[str, Any]:
        """The corpus's fsspec options: its own if given, else the cache's (one endpoint for both)."""
        return self.corpus_storage_options or self.storage_options

    def sources(self) -> dict[str, TeacherSource]:
        sources = with_overrides(
            preset_sources(self.preset, tuple(t for t in self.teachers if t in TEACHER_NAMES)), self.overrides
        )
        missing = [t for t in self.teachers if t not in sources]
        if missing:
            raise ConfigError(
                f"unknown teacher(s) {missing}: neither preset teachers ({', '.join(TEACHER_NAMES)}) "
                "nor added with --teacher NAME=KIND:PATH_OR_ID"
            )
        return {
            t: dataclasses.replace(sources[t], jpeg_draft=self.jpeg_draft, device_resize=self.device_resize)
            for t in self.teachers
        }
