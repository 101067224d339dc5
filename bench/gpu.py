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
             device-wide peak memory polled during the job.
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
- The GPU preprocessing lever resizes each image with `F.interpolate(antialias=True)`, which
  differs from PIL's resize by a few uint8 levels (reported): adopting it changes the
  teachers' spec (a different recipe), hence the cache fingerprint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import os
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TEACHERS = ("depth", "seg", "gen")
PAPER_RANDOM_VERSION = 1
"""Bump when `paper_configs` changes, so that an old folder of random teachers is not reused."""
TARGETS = {"pipeline_images_per_s": 150.0, "busy_fraction": 0.90, "cached_over_in_memory": 1.02}
"""design.md's targets for one H100."""
SECTIONS = ("teachers", "inputs", "bare", "levers", "pipeline", "train")

MID_STUDENT = dict(image_size=336, patch_size=14, vision_hidden=1024, vision_layers=24,
                   llm_hidden=2048, llm_layers=16, llm_heads=16)
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
            raise ConfigError(f"--dtypes {','.join(self.compute_dtypes)!r}: give float32, float16 and/or bfloat16")
        if self.storage_dtype not in STORAGE_DTYPES:
            raise ConfigError(f"--storage-dtype {self.storage_dtype!r} is not one of {', '.join(STORAGE_DTYPES)}")
        if min(self.images, self.shard_size, self.batch_size, self.train_batch_size, self.train_steps) < 1:
            raise ConfigError("--images, --shard-size, --batch-size, --train-batch-size, --train-steps must be >= 1")
        if self.images < self.batch_size or self.shard_size < self.batch_size:
            raise ConfigError(f"--images ({self.images}) and --shard-size ({self.shard_size}) must be at least "
                             f"--batch-size ({self.batch_size}): only full batches are timed")
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
        # seconds on 2 cores (--per-teacher / --compile turn them back on)
        defaults = dict(images=16, shard_size=8, batch_size=4, train_steps=2, train_batch_size=2, train_workers=1,
                        online_steps=1, student={}, per_teacher=False, compile=False,
                        compile_backend="inductor" if cuda else "eager")
    else:
        defaults = dict(images=1024, shard_size=128, batch_size=64)
    defaults["compute_dtypes"] = dtypes
    defaults.update({k: v for k, v in given.items() if v is not None})
    return GpuBenchConfig(smoke=smoke, **defaults)


# -- progress and the report ---------------------------------------------------------------------
class Report:
    """The JSON object of every figure; rewritten to `out` after each section (partial runs keep theirs)."""

    def __init__(self, out: str | None, log: Callable[[str], None]):
        self.data: dict = {"complete": False}
        self.out = out
        self.start = time.perf_counter()
        self._log = log

    def log(self, message: str) -> None:
        self._log(f"[{time.perf_counter() - self.start:7.1f}s] {message}")

    def save(self) -> None:
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


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _reset_peak(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak_gb(device: str) -> float | None:
    """Peak memory allocated by torch in this process since the last reset (None on CPU)."""
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.startswith("cuda") else None


def _free(device: str) -> None:
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
        return {"peak_device_memory_gb": round(self.peak / 2**30, 2),
                "device_memory_before_gb": round(self.baseline / 2**30, 2)}


# -- 1. full-size random teachers ----------------------------------------------------------------
def paper_configs():
    """(DepthAnythingConfig, OneFormerConfig, CLIPVisionConfig) as the three paper checkpoints' config.json state them."""
    from transformers import CLIPVisionConfig, DepthAnythingConfig, Dinov2Config, OneFormerConfig, SwinConfig

    depth = DepthAnythingConfig(  # depth-anything/Depth-Anything-V2-Large-hf
        backbone_config=Dinov2Config(
            hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096, patch_size=14,
            image_size=518, out_indices=[5, 12, 18, 24], reshape_hidden_states=False, layerscale_value=1.0,
        ),
        reassemble_hidden_size=1024, patch_size=14, neck_hidden_sizes=[256, 512, 1024, 1024],
        fusion_hidden_size=256, head_hidden_size=32,
    )
    seg = OneFormerConfig(  # shi-labs/oneformer_coco_swin_large
        backbone_config=SwinConfig(
            image_size=384, patch_size=4, embed_dim=192, depths=[2, 2, 18, 2], num_heads=[6, 12, 24, 48],
            window_size=12, drop_path_rate=0.3, out_features=["stage1", "stage2", "stage3", "stage4"],
        ),
        num_labels=133,
    )
    gen = CLIPVisionConfig(  # stabilityai/stable-diffusion-2-1-unclip, image_encoder (OpenCLIP ViT-H/14)
        hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16, patch_size=14,
        image_size=224, projection_dim=1024, hidden_act="gelu", layer_norm_eps=1e-5,
    )
    return depth, seg, gen


def save_paper_teachers(folder: Path, device: str) -> dict[str, int]:
    """Seeded random full-size teachers -> folder/{depth,seg,gen} in the hub layouts; -> parameters per teacher.

    Built directly on `device` (on a GPU the random init of ~1.2 B parameters takes seconds,
    on a CPU minutes), saved as float32 safetensors like the hub checkpoints.
    """
    import torch
    import transformers
    from transformers import (
        CLIPVisionModelWithProjection,
        DepthAnythingForDepthEstimation,
        OneFormerForUniversalSegmentation,
    )

    transformers.utils.logging.disable_progress_bar()
    params = {}
    for seed, (name, cls, config, path) in enumerate(zip(
        TEACHERS,
        (DepthAnythingForDepthEstimation, OneFormerForUniversalSegmentation, CLIPVisionModelWithProjection),
        paper_configs(),
        (folder / "depth", folder / "seg", folder / "gen" / "image_encoder"),
    )):
        torch.manual_seed(seed)
        with torch.device(device):
            model = cls(config).eval()
        params[name] = sum(p.numel() for p in model.parameters())
        model.save_pretrained(path, safe_serialization=True)
        del model
        _free(device)
    copy_processor_configs(folder)
    (folder / "params.json").write_text(json.dumps(params))
    return params


def copy_processor_configs(folder: Path) -> None:
    """The processor configs of the paper teachers, as `save_random_teachers` writes them for a preset whose
    input sizes are the paper's (seg squash 768, CLIP 224): built tiny in a scratch folder, only its JSON copied."""
    from olavlm.pipeline.presets import RANDOM_PRESETS, save_random_teachers

    sizes = dataclasses.replace(RANDOM_PRESETS["tiny"], seg_image=768, clip_image=224, seg_grid=24)
    with tempfile.TemporaryDirectory(prefix="ola-processors-") as scratch:
        save_random_teachers(sizes, Path(scratch))
        for part in ("seg/preprocessor_config.json", "gen/feature_extractor/preprocessor_config.json"):
            (folder / part).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(scratch) / part, folder / part)


def build_paper_teachers(root: Path, device: str) -> tuple[Path, dict[str, int], bool]:
    """The folder of full-size random teachers under `root` (built once, in a staging folder renamed into place).

    -> (folder, parameters per teacher, whether it was reused).
    """
    from olavlm.pipeline.presets import PRESET_VERSION  # the processor configs come from the presets' code

    folder = root / f"paper-random-v{PAPER_RANDOM_VERSION}-p{PRESET_VERSION}"
    if (folder / "DONE").exists():
        return folder, json.loads((folder / "params.json").read_text()), True
    staging = folder.with_name(f".{folder.name}.{uuid.uuid4().hex[:8]}")
    try:
        params = save_paper_teachers(staging, device)
        (staging / "DONE").write_text("complete\n")
        folder.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(staging, folder)
        except OSError:  # another process finished first; its folder is identical
            if not (folder / "DONE").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder, params, False


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

    def job(self, names: tuple[str, ...], dtype: str, corpus: str, cache: str):
        from olavlm.pipeline.precompute import PrecomputeConfig

        if self.teacher_folder is None:
            preset, overrides = "tiny", {}
        else:  # the paper recipe (input sizes, grid) with the random weights
            preset, overrides = "paper", {n: os.path.join(self.teacher_folder, n) for n in names}
        return PrecomputeConfig(
            corpus=corpus, cache=cache, teachers=names, preset=preset, overrides=overrides,
            dtype=self.config.storage_dtype, compute_dtype=dtype, batch_size=self.config.batch_size,
            shards_in_flight=self.config.shards_in_flight, progress=False,
        )

    def sources(self, dtype: str = "float32"):
        return self.job(TEACHERS, dtype, self.corpus, os.path.join(self.tmp, "unused")).sources()


def _load(setup: Setup, dtype: str) -> dict:
    import torch

    from olavlm.pipeline.teachers import load_teacher

    return {n: load_teacher(s, device=setup.device, dtype=getattr(torch, dtype)) for n, s in setup.sources().items()}


# -- 2. inputs ------------------------------------------------------------------------------------
def predecode(setup: Setup, recipes: dict) -> tuple[list[dict], dict]:
    """The corpus' full batches as {teacher: uint8 (B, H, W, 3)} (pinned on CUDA) and the host figures."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from olavlm.pipeline.precompute import preprocess_batches
    from olavlm.schemas.corpus import list_shards

    batch_size = setup.config.batch_size
    shards = list_shards(setup.corpus)

    def decode(shard) -> list[dict]:
        return [b for b in preprocess_batches(shard.url, recipes, batch_size) if b["keys"]]

    start = time.perf_counter()
    first = decode(shards[0])  # one core: the work of one preprocess task of the pipeline
    per_core = sum(len(b["keys"]) for b in first) / (time.perf_counter() - start)
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:  # PIL releases the GIL in decode and resize
        rest = [b for part in pool.map(decode, shards[1:]) for b in part]
    seconds = time.perf_counter() - start
    pin = setup.device.startswith("cuda")
    batches = []
    for b in first + rest:
        if len(b["keys"]) == batch_size:  # full batches only: torch.compile sees one shape
            arrays = {n: torch.from_numpy(a) for n, a in b["inputs"].items()}
            batches.append({n: t.pin_memory() if pin else t for n, t in arrays.items()})
    if not batches:
        from olavlm.schemas.errors import ConfigError

        raise ConfigError(f"no full batch of {batch_size} images in {setup.config.images} images "
                         f"(shards of {setup.config.shard_size}): raise --images or lower --batch-size")
    in_flight = setup.config.shards_in_flight or 3  # precompute's default with one actor: 2 x 1 + 1
    figures = {
        "images": sum(len(next(iter(b.values()))) for b in batches), "batches": len(batches),
        "batch_size": batch_size, "shards": len(shards), "shard_size": setup.config.shard_size,
        "input_sizes": {n: list(t.shape[1:3]) for n, t in batches[0].items()},
        "host_preprocess_ms_per_image": round(1e3 / per_core, 2),
        "host_preprocess_images_per_s_per_core": round(per_core, 1),
        "pipeline_shards_in_flight": in_flight,
        "pipeline_host_ceiling_images_per_s": round(per_core * min(in_flight, os.cpu_count() or 1), 1),
        "predecode_s": round(seconds, 1),
    }
    return batches, figures


# -- 3. the bare loop -----------------------------------------------------------------------------
def forward_rate(teacher, batches: list[dict], name: str, device: str,
                 prepare: Callable | None = None) -> tuple[float, float, bool]:
    """(images/s, seconds, warm-up output finite) of `teacher` over `batches[*][name]`, after one warm-up batch.

    `prepare` turns the batch entry into the teacher's uint8 input (the GPU preprocessing lever).
    Random full-size weights in float16 could overflow: the warm-up batch's targets say whether they do.
    """
    get = (lambda batch: prepare(batch[name])) if prepare else (lambda batch: batch[name])
    finite = bool(teacher(get(batches[0])).isfinite().all())  # warm-up: first kernels, cuBLAS handles, compilation
    start = time.perf_counter()
    for batch in batches:
        teacher(get(batch))
    _sync(device)
    seconds = time.perf_counter() - start
    return sum(len(b[name]) for b in batches) / seconds, seconds, finite


def bare_rates(teachers: dict, batches: list[dict], device: str, prepare: dict | None = None) -> dict:
    """Per teacher images/s and peak memory; all three = images / summed seconds."""
    per_teacher, total = {}, 0.0
    for name, teacher in teachers.items():
        _reset_peak(device)
        rate, seconds, finite = forward_rate(teacher, batches, name, device, (prepare or {}).get(name))
        total += seconds
        per_teacher[name] = {"images_per_s": round(rate, 2), "peak_memory_gb": _peak_gb(device), "finite": finite}
    images = sum(len(b[next(iter(teachers))]) for b in batches)
    peaks = [v["peak_memory_gb"] for v in per_teacher.values() if v["peak_memory_gb"] is not None]
    return {"per_teacher": per_teacher, "all_images_per_s": round(images / total, 2),
            "peak_memory_gb": max(peaks) if peaks else None}


def _weights_gb(teacher) -> float:
    return round(sum(p.numel() * p.element_size() for p in teacher.module.parameters()) / 2**30, 3)


# -- 4. levers ------------------------------------------------------------------------------------
def compile_blocks(module, backend: str) -> int:
    """Regional torch.compile: every innermost repeated block (children of a ModuleList holding no ModuleList).

    Blocks of one class and shape share one compiled graph, so compile time grows with the
    distinct block shapes, not the depth. -> number of blocks compiled.
    """
    import torch
    from torch import nn

    for option in ("cache_size_limit", "recompile_limit"):  # Swin: 4 stages x 2 shift sizes of one class
        if hasattr(torch._dynamo.config, option):
            setattr(torch._dynamo.config, option, max(64, getattr(torch._dynamo.config, option)))
    blocks = [child for m in module.modules() if isinstance(m, nn.ModuleList) for child in m
              if not any(isinstance(c, nn.ModuleList) for c in child.modules())]
    for block in blocks:
        block.compile(backend=backend)
    return len(blocks)


INTERPOLATE_MODES = {"bilinear": "bilinear", "bicubic": "bicubic", "nearest": "nearest"}
"""PIL filter names -> F.interpolate modes; other filters (lanczos, box, hamming) fall back to bicubic."""


def _resize(x, size: tuple[int, int], resample: str):
    import torch.nn.functional as F

    mode = INTERPOLATE_MODES.get(resample, "bicubic")
    if mode == "nearest":
        return F.interpolate(x, size=size, mode=mode)
    return F.interpolate(x, size=size, mode=mode, antialias=True, align_corners=False)


def device_prepare(images: list[np.ndarray], recipe: dict, device: str):
    """uint8 (H, W, 3) images of any size -> uint8 (B, h, w, 3) on `device`: the geometry of
    `preprocess.prepare` (squash [+ the processor's second resize], or shortest side + centre crop) run there.

    Antialiased `F.interpolate` in float32, rounded back to uint8 after each resize as PIL's
    uint8 path does, so that the teacher's own normalisation runs unchanged.
    Cost: a few uint8 levels away from PIL's filters (reported by the lever).
    """
    import torch

    from olavlm.pipeline.preprocess import shortest_side_size

    def resize(x, size, resample):
        return _resize(x, size, resample).round_().clamp_(0, 255)

    out = []
    for array in images:
        x = torch.from_numpy(array).to(device, non_blocking=True).permute(2, 0, 1)[None].float()  # [1, 3, H, W]
        if "resize" in recipe:
            x = resize(x, tuple(recipe["resize"]), recipe["resample"])
            if "processor_resize" in recipe and tuple(recipe["processor_resize"]) != tuple(recipe["resize"]):
                x = resize(x, tuple(recipe["processor_resize"]), recipe["processor_resample"])
        else:
            new_w, new_h = shortest_side_size(array.shape[1], array.shape[0], recipe["resize_shortest"])
            x = resize(x, (new_h, new_w), recipe["resample"])
            crop_h, crop_w = recipe["center_crop"]
            top, left = (new_h - crop_h) // 2, (new_w - crop_w) // 2  # as preprocess.prepare
            x = x[:, :, top:top + crop_h, left:left + crop_w]
        out.append(x.to(torch.uint8))
    return torch.cat(out).permute(0, 2, 3, 1)  # [B, h, w, 3]


def decoded_batches(setup: Setup, recipes: dict, count: int) -> tuple[list[list[np.ndarray]], float]:
    """The first `count` images of the corpus decoded once (largest draft size of the recipes), in batches;
    -> (batches, host ms per image of that decode alone, one core)."""
    from olavlm.schemas.corpus import RawSample, decode_image, iter_samples, list_shards

    draft = max(int(r.get("jpeg_draft", 0)) for r in recipes.values()) or None
    images, seconds = [], 0.0
    for shard in list_shards(setup.corpus):
        for item in iter_samples(shard.url):
            if len(images) == count:
                break
            if isinstance(item, RawSample) and item.image_bytes is not None:
                start = time.perf_counter()
                images.append(np.array(decode_image(item.image_bytes, draft_size=draft)))  # writable: from_numpy
                seconds += time.perf_counter() - start
    size = setup.config.batch_size
    return [images[i:i + size] for i in range(0, len(images), size)], seconds / max(1, len(images)) * 1e3


def run_levers(setup: Setup, teachers: dict, batches: list[dict], baseline: dict, host: dict) -> list[dict]:
    """Lever rows at one compute dtype, each against `baseline` (the bare loop of the same teachers).

    A lever that fails (an unsupported kernel, a compiler error) gives a row with its error and
    the run goes on: the pipeline and training figures matter more than any one lever.
    """
    import torch

    config, device = setup.config, setup.device
    rows = [{"lever": "baseline", **baseline, "speedup_vs_baseline": 1.0,
             "attn_implementation": {n: t.module.config._attn_implementation for n, t in teachers.items()}}]

    def lever(name: str, measure: Callable[[], tuple[dict, dict]]) -> None:
        try:
            rates, extra = measure()
        except Exception as exc:  # noqa: BLE001 - reported in the row and on stderr, the run goes on
            setup.log(f"lever {name}: failed: {type(exc).__name__}: {exc}")
            rows.append({"lever": name, "error": f"{type(exc).__name__}: {exc}"[:500]})
            return
        speedup = rates["all_images_per_s"] / baseline["all_images_per_s"]
        rows.append({"lever": name, **rates, "speedup_vs_baseline": round(speedup, 3), **extra})
        setup.log(f"lever {name}: {rates['all_images_per_s']:.1f} images/s all three ({speedup:.2f}x)")

    def channels_last() -> tuple[dict, dict]:
        for t in teachers.values():
            t.module.to(memory_format=torch.channels_last)
        try:
            return bare_rates(teachers, batches, device), {}
        finally:
            for t in teachers.values():
                t.module.to(memory_format=torch.contiguous_format)

    def attention(impl: str) -> tuple[dict, dict]:
        default = {n: t.module.config._attn_implementation for n, t in teachers.items()}
        used = {}
        try:
            for name, t in teachers.items():
                try:
                    t.module.set_attn_implementation(impl)
                except (ValueError, ImportError) as exc:  # the class does not support it: stays as it was
                    setup.log(f"lever attn {impl}: {name} keeps {t.module.config._attn_implementation} ({exc})")
                used[name] = t.module.config._attn_implementation
            return bare_rates(teachers, batches, device), {"attn_implementation": used}
        finally:
            for name, t in teachers.items():
                t.module.set_attn_implementation(default[name])

    def gpu_preprocess() -> tuple[dict, dict]:
        recipes = {n: t.spec.preprocess for n, t in teachers.items()}
        raw, decode_ms = decoded_batches(setup, recipes, len(batches) * config.batch_size)
        raw = [b for b in raw if len(b) == config.batch_size]
        entries = [{n: images for n in teachers} for images in raw]  # each teacher resizes the same images
        prepare = {n: (lambda images, n=n: device_prepare(images, recipes[n], device)) for n in teachers}
        diffs = {}
        for name in teachers:  # against the host path on the same first images
            ours = device_prepare(raw[0], recipes[name], device).cpu().numpy().astype(np.int16)
            diffs[name] = round(float(np.abs(ours - batches[0][name].numpy().astype(np.int16)).mean()), 3)
        return bare_rates(teachers, entries, device, prepare), {
            "host_decode_only_ms_per_image": round(decode_ms, 2),
            "host_cpu_path_ms_per_image": host["host_preprocess_ms_per_image"],
            "mean_abs_diff_uint8_vs_host": diffs}

    def compiled() -> tuple[dict, dict]:  # last: the blocks stay compiled (the teachers are dropped after)
        start = time.perf_counter()
        blocks = {n: compile_blocks(t.module, config.compile_backend) for n, t in teachers.items()}
        for name, t in teachers.items():  # compilation happens in the first call: timed apart
            t(batches[0][name])
        _sync(device)
        extra = {"compile_s": round(time.perf_counter() - start, 1), "compile_backend": config.compile_backend,
                 "blocks_compiled": blocks}
        setup.log(f"lever compile: compiled in {extra['compile_s']} s")
        return bare_rates(teachers, batches, device), extra

    if config.channels_last:
        lever("channels_last", channels_last)
    if config.sdpa:
        for impl in ("eager", "sdpa"):
            lever(f"attn_{impl}", lambda impl=impl: attention(impl))
    if config.gpu_preprocess:
        lever("gpu_preprocess", gpu_preprocess)
    if config.compile:
        lever("compile", compiled)
    return rows


# -- 5. the pipeline ------------------------------------------------------------------------------
def run_job(setup: Setup, names: tuple[str, ...], dtype: str, cache: str) -> dict:
    """One `precompute` job over the benchmark corpus -> its figures."""
    from olavlm.pipeline.precompute import precompute

    with DevicePeak(setup.device) as peak:
        summary = precompute(setup.job(names, dtype, setup.corpus, cache))
    return {
        "images": summary.images, "errors": summary.errors, "seconds": round(summary.seconds, 2),
        "images_per_s": round(summary.images_per_second, 2), "actor_compute_share": round(summary.teacher_busy, 3),
        "mb_written": round(summary.bytes / 1e6, 1), **peak.figures(),
    }


def busy_fraction(bare: dict | None, label: str, pipeline_rate: float) -> dict:
    """Pipeline images/s over the bare loop's for the same teachers ('all' or one name); {} without a bare run."""
    if not bare:
        return {}
    reference = bare["all_images_per_s"] if label == "all" else bare["per_teacher"][label]["images_per_s"]
    return {"bare_images_per_s": reference, "busy_fraction": round(pipeline_rate / reference, 3)}


# -- 6. the training step -------------------------------------------------------------------------
def _process_group(device: str):
    """A 1-process group (nccl on CUDA, gloo on CPU); -> a function that destroys it if it was made here."""
    import torch.distributed as dist

    if dist.is_initialized():
        return lambda: None
    store = os.path.join(tempfile.mkdtemp(prefix="ola-bench-pg-"), "store")
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", init_method=f"file://{store}",
                            rank=0, world_size=1)
    return dist.destroy_process_group


def train_bench(setup: Setup, cache: str) -> dict:
    """Cached-target step (streaming loader) vs the same batches in memory vs teachers online."""
    import torch
    from torch.nn.parallel import DistributedDataParallel

    from olavlm.pipeline.preprocess import prepare_all
    from olavlm.pipeline.teachers import load_teacher
    from olavlm.schemas.cache import TargetCache
    from olavlm.schemas.config import DataConfig, ModelConfig
    from olavlm.schemas.corpus import RawSample, iter_samples, list_shards
    from olavlm.trainer.collate import to_device
    from olavlm.trainer.images import ImageTransform
    from olavlm.trainer.loader import build_loader
    from olavlm.trainer.model import OlaVlm
    from olavlm.trainer.presets import TINY_HEADS, build_tiny_student
    from olavlm.trainer.stages import apply_stage

    config, device = setup.config, torch.device(setup.device)
    cuda = device.type == "cuda"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = min(config.train_workers, max(1, cores - 1))
    if not cuda:  # the cores the workers leave to the step
        torch.set_num_threads(max(1, cores - workers))
    destroy = _process_group(setup.device)
    try:
        folders = build_tiny_student(os.path.join(setup.tmp, "student"), seed=config.seed, **config.student)
        heads = {} if config.student else TINY_HEADS  # the mid student has the paper's heads (the defaults)
        torch.manual_seed(config.seed)
        model = OlaVlm.from_config(ModelConfig(vision_model=folders.vision_model, llm=folders.llm, **heads),
                                   TargetCache(cache).specs()).to(device)
        groups = apply_stage(model, "pt")
        trainable = sum(p.numel() for g in groups for p in g["params"])
        ddp = DistributedDataParallel(model, device_ids=[device.index or 0] if cuda else None,
                                      find_unused_parameters=True)
        optimizer = torch.optim.AdamW(groups, fused=cuda)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
        data = DataConfig(data=setup.corpus, cache=cache, batch_size=config.train_batch_size, num_workers=workers,
                          seed=config.seed)
        loader = build_loader(data, tokenizer=model.tokenizer, layout=model.layout,
                              transform=ImageTransform.from_processor(model.image_processor),
                              tasks=model.layout.tasks, pin_memory=cuda)

        def step(batch) -> None:
            with autocast:
                losses = ddp(to_device(batch, device))
            losses["loss"].backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            _sync(setup.device)  # a step ends when the device is done

        batches = iter(loader)
        for _ in range(workers + 2):  # warm-up: every worker has delivered a batch; first kernels; AdamW state
            step(next(batches)[0])
        _reset_peak(setup.device)
        kept, loader_times, memory_times = [], [], []
        for _ in range(config.train_steps):  # a step = waiting for the loader's batch + the step itself
            start = time.perf_counter()
            batch, _state = next(batches)
            step(batch)
            loader_times.append(time.perf_counter() - start)
            kept.append(batch)
        del batches
        for batch in kept:  # the same batches again, from memory (pinned on CUDA, as the loader's)
            start = time.perf_counter()
            step(batch)
            memory_times.append(time.perf_counter() - start)
        loader_s, memory_s = float(np.mean(loader_times)), float(np.mean(memory_times))
        medians = float(np.median(loader_times)), float(np.median(memory_times))
        peak = _peak_gb(setup.device)
        setup.log(f"train: loader {loader_s:.3f} s/step, in memory {memory_s:.3f} s/step "
                  f"({loader_s / memory_s:.3f}x; medians {medians[0]:.3f} / {medians[1]:.3f})")

        online_s = None
        if config.online_steps:
            dtype = torch.bfloat16 if cuda else torch.float32
            teachers = {n: load_teacher(s, device=setup.device, dtype=dtype) for n, s in setup.sources().items()}
            recipes = {n: t.spec.preprocess for n, t in teachers.items()}
            wanted = {k for b in kept[:config.online_steps] for k in b["keys"]}
            jpegs = {item.key: item.image_bytes for shard in list_shards(setup.corpus)
                     for item in iter_samples(shard.url) if isinstance(item, RawSample) and item.key in wanted}

            def online(keys: list[str]) -> dict:
                """One image at a time, host preprocessing, each teacher (as the authors' training step does)."""
                out = {n: [] for n in teachers}
                for key in keys:
                    inputs = prepare_all(jpegs[key], recipes)
                    for name, teacher in teachers.items():
                        out[name].append(teacher(torch.tensor(inputs[name])[None])[0])
                return {n: torch.stack(v) for n, v in out.items()}

            online(kept[0]["keys"][:1])  # warm-up of the teachers' kernels
            _sync(setup.device)
            start = time.perf_counter()
            for batch in kept[:config.online_steps]:
                step(dict(batch, targets=online(batch["keys"])))
            online_s = (time.perf_counter() - start) / config.online_steps
            del teachers
        params = sum(p.numel() for p in model.parameters())
    finally:
        destroy()
    return {
        "student": "mid: CLIP 1024x24 at 336 px + Llama 2048x16" if config.student else "tiny preset student",
        "student_params": params, "trainable_params_pt": trainable, "batch_size": config.train_batch_size,
        "steps": config.train_steps, "loader_workers": workers, "autocast": "bfloat16" if cuda else "off (float32)",
        "backend": "nccl" if cuda else "gloo", "world_size": 1, "cache_storage_dtype": config.storage_dtype,
        "step_s_loader": round(loader_s, 4), "step_s_in_memory": round(memory_s, 4),
        "cached_over_in_memory": round(loader_s / memory_s, 3),
        "step_s_loader_median": round(medians[0], 4), "step_s_in_memory_median": round(medians[1], 4),
        "cached_over_in_memory_median": round(medians[0] / medians[1], 3), "warmup_steps": workers + 2,
        "samples_per_s_loader": round(config.train_batch_size / loader_s, 1),
        "step_s_online_teachers": round(online_s, 4) if online_s is not None else None,
        "online_over_cached": round(online_s / loader_s, 2) if online_s is not None else None,
        "online_steps": config.online_steps, "peak_memory_gb": peak,
    }


# -- the whole run ----------------------------------------------------------------------------------
def environment(device: str) -> dict:
    import ray
    import torch
    import transformers

    cuda = device.startswith("cuda")
    return {
        "device": torch.cuda.get_device_name() if cuda else f"cpu ({os.cpu_count()} cores)",
        "device_memory_gb": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if cuda else None,
        "cpu_count": os.cpu_count(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "transformers": transformers.__version__, "ray": ray.__version__, "python": sys.version.split()[0],
    }


def run_gpu_bench(config: GpuBenchConfig, *, out: str | None = None,
                  log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True)) -> dict:
    """Run the sections (see the module docstring); -> every figure in one dict (also written to `out`)."""
    import torch
    import transformers

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    transformers.utils.logging.disable_progress_bar()  # save_pretrained's bars: noise in the progress lines
    report = Report(out, log)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not config.smoke:
        report.log("warning: no CUDA device; the full-size run on a CPU takes hours (the smoke run is --smoke)")
    report.data.update(environment(device), smoke=config.smoke, config=dataclasses.asdict(config), targets=TARGETS)
    report.log(f"device {report.data['device']}, torch {report.data['torch']}, "
               f"transformers {report.data['transformers']}, smoke={config.smoke}")
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
                report.data["teachers"] = {"folder": teacher_folder, "reused": reused, "params": params,
                                           "total_params": sum(params.values()),
                                           "build_s": round(time.perf_counter() - start, 1)}
            else:
                report.data["teachers"] = {"folder": "tiny preset", "reused": None, "params": None,
                                           "total_params": None, "build_s": 0.0}
            report.log(f"teachers: {report.data['teachers']['folder']} "
                       f"({report.data['teachers']['total_params'] or 'tiny'} parameters)")
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
    """inputs, bare, levers, pipeline; -> the cache kept for the train section (None if no job ran)."""
    config, device = setup.config, setup.device
    wanted = set(config.sections)
    batches: list[dict] = []
    with report.section("inputs"):
        start = time.perf_counter()
        teachers = _load(setup, config.compute_dtypes[0])
        load_s = time.perf_counter() - start
        recipes = {n: t.spec.preprocess for n, t in teachers.items()}
        report.data["teachers"].update(
            target_shapes={n: list(t.spec.shape) for n, t in teachers.items()},
            weights_gb={n: _weights_gb(t) for n, t in teachers.items()},
            recipes=recipes, spec_fingerprints={n: t.spec.fingerprint for n, t in teachers.items()},
        )
        batches, host = predecode(setup, recipes)
        report.data["inputs"] = host
        report.log(f"inputs: {host['images']} images in {host['batches']} batches of {host['batch_size']}; host "
                   f"preprocessing {host['host_preprocess_images_per_s_per_core']} images/s per core")
    report.data.setdefault("bare", {})
    for index, dtype in enumerate(config.compute_dtypes):
        if "bare" not in wanted and not (index == 0 and "levers" in wanted):
            break
        with report.section(f"bare {dtype}"):
            if index:
                del teachers
                _free(device)
                start = time.perf_counter()
                teachers = _load(setup, dtype)
                load_s = time.perf_counter() - start
            rates = bare_rates(teachers, batches, device)
            report.data["bare"][dtype] = {**rates, "load_s": round(load_s, 1),
                                          "weights_gb": {n: _weights_gb(t) for n, t in teachers.items()}}
            report.log(f"bare {dtype}: " + ", ".join(f"{n} {v['images_per_s']:.1f}" for n, v in
                                                     rates["per_teacher"].items())
                       + f"; all three {rates['all_images_per_s']:.1f} images/s, peak {rates['peak_memory_gb']} GB")
        if index == 0 and "levers" in wanted:
            with report.section("levers"):
                report.data["levers"] = {"dtype": dtype, "images": report.data["inputs"]["images"],
                                         "rows": run_levers(setup, teachers, batches, rates, report.data["inputs"])}
    del teachers, batches
    _free(device)
    if "pipeline" not in wanted:
        return None
    return run_pipeline(setup, report)


def run_pipeline(setup: Setup, report: Report) -> str:
    """Every precompute job in one Ray session; -> the cache of the last dtype's three-teacher job (kept)."""
    from olavlm.pipeline.precompute import precompute, ray_session
    from olavlm.schemas.corpus_build import build_demo_corpus

    config = setup.config
    pipeline = report.data.setdefault("pipeline", {})
    kept = None
    with report.section("pipeline"), ray_session(None):
        if not config.smoke:  # Ray starts its task worker processes on first use: paid here, not by the timed jobs
            start = time.perf_counter()
            warmup = os.path.join(setup.tmp, "warmup")
            build_demo_corpus(warmup, samples=config.batch_size, shard_size=config.batch_size)
            precompute(setup.job(("depth",), config.compute_dtypes[0], warmup, os.path.join(setup.tmp, "warmup-cache")))
            report.log(f"pipeline: Ray warm-up job {time.perf_counter() - start:.1f} s")
        for index, dtype in enumerate(config.compute_dtypes):
            # one job per teacher at the first dtype only: each costs an actor start and a model load
            sets = [TEACHERS] + ([(n,) for n in TEACHERS] if config.per_teacher and index == 0 else [])
            for names in sets:
                label = "all" if len(names) > 1 else names[0]
                cache = os.path.join(setup.tmp, f"cache-{dtype}-{label}")
                report.log(f"pipeline {dtype} {'+'.join(names)}: running")
                figures = run_job(setup, names, dtype, cache)
                figures.update(busy_fraction(report.data.get("bare", {}).get(dtype), label, figures["images_per_s"]))
                pipeline.setdefault(dtype, {})[label] = figures
                report.log(f"pipeline {dtype} {'+'.join(names)}: {figures['images_per_s']:.1f} images/s, busy "
                           f"{figures.get('busy_fraction')}, actor {figures['actor_compute_share']}, "
                           f"peak {figures['peak_device_memory_gb']} GB, {figures['errors']} errors")
                report.save()
                if label == "all":
                    if kept:
                        shutil.rmtree(kept, ignore_errors=True)
                    kept = cache
                else:
                    shutil.rmtree(cache, ignore_errors=True)
    return kept


# -- the human table --------------------------------------------------------------------------------
def format_table(data: dict) -> str:
    """The figures as aligned text tables (what `ola bench gpu` prints without --json)."""
    lines = [f"device: {data.get('device')} | torch {data.get('torch')} | transformers {data.get('transformers')}"
             f" | smoke={data.get('smoke')} | complete={data.get('complete')}"]
    inputs = data.get("inputs")
    if inputs:
        lines.append(f"corpus: {inputs['images']} images, batch {inputs['batch_size']}, {inputs['shards']} shards; "
                     f"host preprocessing {inputs['host_preprocess_images_per_s_per_core']} images/s per core "
                     f"(pipeline host ceiling ~{inputs['pipeline_host_ceiling_images_per_s']} images/s "
                     f"with {inputs['pipeline_shards_in_flight']} shards in flight)")

    def gb(value) -> str:
        return "-" if value is None else f"{value:.2f}"

    rows = []
    for dtype, bare in data.get("bare", {}).items():
        pipe = data.get("pipeline", {}).get(dtype, {})
        for label in ("all", *TEACHERS):
            b = bare["all_images_per_s"] if label == "all" else bare["per_teacher"][label]["images_per_s"]
            peak = bare["peak_memory_gb"] if label == "all" else bare["per_teacher"][label]["peak_memory_gb"]
            p = pipe.get(label, {})
            rows.append((dtype, "all three" if label == "all" else label, f"{b:.1f}",
                         f"{p['images_per_s']:.1f}" if p else "-", str(p.get("busy_fraction", "-")),
                         str(p.get("actor_compute_share", "-")), gb(peak), gb(p.get("peak_device_memory_gb"))))
    if rows:
        lines += ["", _table(("compute", "teachers", "bare img/s", "pipeline img/s", "busy", "actor share",
                              "bare peak GB", "job peak GB"), rows)]
    levers = data.get("levers")
    if levers:
        rows = [(r["lever"], *(f"{r['per_teacher'][n]['images_per_s']:.1f}" for n in TEACHERS),
                 f"{r['all_images_per_s']:.1f}", f"{r['speedup_vs_baseline']:.2f}x", _lever_note(r))
                if "error" not in r else (r["lever"], "-", "-", "-", "-", "-", r["error"][:80])
                for r in levers["rows"]]
        lines += ["", f"levers ({levers['dtype']}, bare loop, images/s):",
                  _table(("lever", *TEACHERS, "all three", "vs baseline", "note"), rows)]
    train = data.get("train")
    if train:
        lines += ["", f"training step ({train['student']}, batch {train['batch_size']}, {train['autocast']}, "
                      f"{train['backend']} x{train['world_size']}):",
                  _table(("loader s/step", "in-memory s/step", "cached / in-memory", "online s/step",
                          "online / cached", "peak GB"),
                         [(train["step_s_loader"], train["step_s_in_memory"], train["cached_over_in_memory"],
                           train["step_s_online_teachers"], train["online_over_cached"], gb(train["peak_memory_gb"]))])]
    return "\n".join(lines)


def _lever_note(row: dict) -> str:
    if row["lever"] == "compile":
        return f"compile {row['compile_s']} s ({row['compile_backend']})"
    if row["lever"] == "gpu_preprocess":
        return (f"host {row['host_decode_only_ms_per_image']} ms/img decode only vs "
                f"{row['host_cpu_path_ms_per_image']} ms/img today")
    if "attn_implementation" in row:
        return ",".join(f"{n}={v}" for n, v in row["attn_implementation"].items())
    return ""


def _table(header: tuple, rows: list[tuple]) -> str:
    cells = [tuple(str(c) for c in header)] + [tuple(str(c) for c in r) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    text = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    return "\n".join([text[0], "  ".join("-" * w for w in widths), *text[1:]])
