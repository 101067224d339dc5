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
    """Ray cluster to join (host:port of `ray start --head`, or auto); default: a fresh local Ray, whatever RAY_ADDRESS or `ray start` registered (a Ray this process already runs is reused)."""
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
    """Shards preprocessed at once; default 2 x actors + 1."""
    dry_run: bool = False
    """Print the plan and exit."""
    overwrite: bool = False
    """Replace a teacher whose stored spec differs (deletes its committed shards)."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    """fsspec options of the cache root (e.g. {'client_kwargs': {'endpoint_url': ...}})."""
    corpus_storage_options: dict[str, Any] = field(default_factory=dict)
    """fsspec options of the corpus."""
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
