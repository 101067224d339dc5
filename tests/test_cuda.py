"""What only a CUDA device can show (`make test-gpu`, i.e. `pytest -m cuda`); skipped without one.

- the paper's three teachers at full size (seeded random weights) at float16 and bfloat16 against
  float32: cosine >= 0.999 per image;
- the seg teacher's fused window attention and its inductor-compiled forward at bfloat16 against the
  float32 eager reference (transformers' eager attention): cosine >= 0.999 per image;
- `ola precompute --device-resize` end to end on the GPU, then `ola cache verify`;
- one bf16-autocast PT step of a student with the paper's heads: finite, close to float32;
- FSDP2 over nccl in one process: a run saves, a second loads its step-2 checkpoint and resumes, and
  steps 3-4 and the final weights equal the uninterrupted run's.
Each helper takes the device, so its logic runs on CPU too (at tiny sizes, by hand). Importing this
module needs no CUDA. Full-size teachers are built in memory (~5 GB of float32 weights).
"""

from __future__ import annotations

import copy
import json
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS, read at its first use

CUDA = torch.cuda.is_available()
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not CUDA, reason="needs a CUDA device: run `make test-gpu` on a GPU machine"),
    pytest.mark.timeout(600),
]
MIN_COSINE = 0.999
"""Per image, half precision or fused/compiled against the float32 reference."""
PAPER_SHAPES = {"gen": (1, 1024), "depth": (576, 1024), "seg": (576, 1536)}
"""The paper teachers' target shapes (what the student's heads predict)."""


def per_image_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.flatten(1).double(), b.flatten(1).double())


def paper_teachers(device: str) -> dict:
    """The three paper architectures (bench/gpu's configs), seeded random weights, float32 on `device`,
    wrapped as the pipeline wraps them (paper recipes: 336 / 768 -> 800 / 224); seg's position-bias
    tables filled (transformers' initialiser zeroes them)."""
    import transformers

    from olavlm.bench.gpu import paper_configs
    from olavlm.pipeline.sources import TeacherSource
    from olavlm.pipeline.teachers import depth_teacher, gen_teacher, seg_teacher
    from tests.test_swin_attention import fill_position_bias

    recipes = {
        "depth": ("depth_anything", transformers.DepthAnythingForDepthEstimation, depth_teacher),
        "seg": ("oneformer_swin", transformers.OneFormerForUniversalSegmentation, seg_teacher),
        "gen": ("clip_image_embeds", transformers.CLIPVisionModelWithProjection, gen_teacher),
    }
    teachers = {}
    for seed, ((name, (kind, cls, wrap)), config) in enumerate(zip(recipes.items(), paper_configs())):
        torch.manual_seed(seed)
        with torch.device(device):
            model = cls(config).eval()
        source = TeacherSource(name=name, kind=kind, model=f"random-{name}")
        teachers[name] = wrap(source, model).to(device)
        del model
    fill_position_bias(teachers["seg"].module)
    return teachers


def paper_inputs(teachers: dict, count: int = 4) -> dict[str, torch.Tensor]:
    """Real photos through the host recipe of each teacher: uint8 (count, H, W, 3)."""
    from olavlm.pipeline.preprocess import prepare_all
    from tests._precompute_data import jpeg, photo

    recipes = {n: t.spec.preprocess for n, t in teachers.items()}
    prepared = [prepare_all(jpeg(photo(i)), recipes) for i in range(count)]
    return {n: torch.from_numpy(np.stack([p[n] for p in prepared])) for n in teachers}


def half_precision_cosines(teachers: dict, inputs: dict, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Per teacher, per image cosine of a `dtype` copy (pipeline defaults: fused seg attention) vs float32."""
    from olavlm.pipeline.teachers import speed_up

    out = {}
    for name, teacher in teachers.items():
        reference = teacher(inputs[name])
        half = copy.deepcopy(teacher)
        half.module.to(dtype=dtype)
        speed_up(half)  # what load_teacher applies: fused window attention for seg
        targets = half(inputs[name])
        assert targets.isfinite().all(), (name, dtype)
        out[name] = per_image_cosine(targets, reference)
        del half
    return out


def seg_lever_cosines(seg, inputs: torch.Tensor, backend: str = "inductor") -> dict[str, torch.Tensor]:
    """Per image cosine vs the float32 eager reference (transformers' eager attention) of: float32 fused,
    bfloat16 fused, bfloat16 fused + compiled (a full batch, then a short one padded to it)."""
    from olavlm.pipeline.teachers import speed_up

    reference_teacher = copy.deepcopy(seg)
    reference_teacher.module.set_attn_implementation("eager")
    reference = reference_teacher(inputs)
    del reference_teacher
    fused = speed_up(copy.deepcopy(seg), "fused")
    out = {"float32 fused": per_image_cosine(fused(inputs), reference)}
    del fused
    half = copy.deepcopy(seg)
    half.module.to(dtype=torch.bfloat16)
    speed_up(half, "fused")
    out["bfloat16 fused"] = per_image_cosine(half(inputs), reference)
    half.use_compiled("default", backend)
    full, short = half(inputs), half(inputs[:-1])
    out["bfloat16 fused compiled"] = per_image_cosine(full, reference)
    out["bfloat16 fused compiled, short batch"] = per_image_cosine(short, reference[:-1])
    return out


@pytest.fixture(scope="module")
def teachers():
    built = paper_teachers("cuda")
    yield built
    del built
    torch.cuda.empty_cache()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_paper_teachers_at_half_precision_match_float32(teachers, dtype):
    inputs = paper_inputs(teachers)
    cosines = half_precision_cosines(teachers, inputs, getattr(torch, dtype))
    worst = {n: round(float(c.min()), 6) for n, c in cosines.items()}
    assert all(c.min() >= MIN_COSINE for c in cosines.values()), worst


def test_fused_and_compiled_seg_match_the_float32_eager_reference(teachers):
    inputs = paper_inputs({"seg": teachers["seg"]}, count=3)["seg"]
    cosines = seg_lever_cosines(teachers["seg"], inputs)
    worst = {k: round(float(c.min()), 6) for k, c in cosines.items()}
    assert cosines["float32 fused"].min() >= 0.99999, worst  # float32: rounding only
    assert all(c.min() >= MIN_COSINE for c in cosines.values()), worst


@pytest.fixture(scope="module")
def ray_gpu():
    """A local Ray with the GPU and a few CPUs for the preprocess and writer tasks."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="ERROR")
    yield ray
    if started:
        ray.shutdown()


def test_precompute_with_device_resize_on_the_gpu_verifies(ray_gpu, tmp_path):
    from typer.testing import CliRunner

    from olavlm.cli.app import app
    from olavlm.pipeline.preprocess import prepare_all
    from olavlm.pipeline.presets import preset_sources
    from olavlm.pipeline.teachers import load_teacher
    from olavlm.schemas.cache import TargetCache
    from tests._precompute_data import build_corpus, jpeg, photo, read_cache

    corpus, cache = tmp_path / "corpus", tmp_path / "cache"
    keys = build_corpus(corpus, shards=2, per_shard=3)
    args = ["precompute", str(corpus), str(cache), "--preset", "tiny", "--batch-size", "2", "--no-progress"]
    done = CliRunner().invoke(app, [*args, "--device-resize"])
    assert done.exit_code == 0, done.output
    verified = CliRunner().invoke(app, ["cache", "verify", str(cache), "--corpus", str(corpus), "--json"])
    assert verified.exit_code == 0, verified.output
    assert json.loads(verified.output[verified.output.index("{") :])["ok"] is True
    for name, source in preset_sources("tiny").items():
        assert TargetCache(str(cache)).spec(name).preprocess["resize_on"] == "device"
        stored = read_cache(cache, name)
        assert sorted(stored) == sorted(keys)
        host = load_teacher(source)  # float32 on the CPU, PIL resizes: the host path
        recipe = {name: host.spec.preprocess}
        pixels = np.stack([prepare_all(jpeg(photo(i)), recipe)[name] for i in range(len(keys))])
        expected = host(torch.from_numpy(pixels))  # keys in build order
        ours = torch.from_numpy(np.stack([stored[k].astype(np.float32) for k in keys]))
        assert ours.isfinite().all(), name
        assert per_image_cosine(ours, expected).min() >= MIN_COSINE, name


def pt_step_losses(device: str, autocast_dtype: torch.dtype | None) -> tuple[dict, torch.Tensor, bool]:
    """One PT step of the tiny student with the paper's heads (ModelConfig defaults) on paper-shaped
    targets: -> (losses as floats, the trainable gradients flattened, parameters finite after AdamW)."""
    from olavlm.trainer.freeze import apply_stage
    from tests._student import SAMPLES, make_batch, tiny_model

    model = tiny_model(seed=0, specs=PAPER_SHAPES, head_width=1024, head_num_heads=16, head_ffn_mult=4)
    model.to(device)
    groups = apply_stage(model, "pt")
    optimizer = torch.optim.AdamW(groups, fused=device.startswith("cuda"))
    batch = make_batch(model, SAMPLES, specs=PAPER_SHAPES)
    batch = {
        k: ({t: v.to(device) for t, v in x.items()} if isinstance(x, dict) else x.to(device))
        for k, x in batch.items()
    }
    kind = "cuda" if device.startswith("cuda") else "cpu"
    with torch.autocast(kind, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        losses = model(batch)
    losses["loss"].backward()
    trainable = [p for g in groups for p in g["params"]]
    grads = torch.cat([p.grad.float().flatten() for p in trainable if p.grad is not None])
    optimizer.step()
    finite = all(p.isfinite().all() for p in trainable)
    return {k: float(v.detach()) for k, v in losses.items()}, grads.cpu(), finite


def test_bf16_pt_step_with_the_paper_heads_is_finite_and_close_to_float32():
    reference, reference_grads, _ = pt_step_losses("cuda", None)
    losses, grads, finite = pt_step_losses("cuda", torch.bfloat16)
    assert finite and grads.isfinite().all() and all(np.isfinite(v) for v in losses.values())
    assert losses.keys() == reference.keys() and {"ntp", "depth", "seg", "gen"} <= losses.keys()
    for term, value in reference.items():
        assert losses[term] == pytest.approx(value, rel=0.03, abs=0.01), term
    cosine = torch.nn.functional.cosine_similarity(grads.double(), reference_grads.double(), dim=0)
    assert cosine >= 0.99, float(cosine)


def test_fsdp2_over_nccl_in_one_process_saves_loads_and_resumes_exactly(tmp_path):
    import torch.distributed as dist
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from olavlm.trainer.student.presets import build_tiny_student
    from olavlm.trainer.train import train
    from tests._trainer_data import make_cache, make_corpus
    from tests.test_resume import DROPOUT, SHAPES, assert_same_run, resume_config, run_config

    if dist.is_initialized():  # another test's group (gloo) would carry CUDA tensors
        dist.destroy_process_group()
    samples = make_corpus(tmp_path / "corpus", shards=2, per_shard=6, text_only_every=5)
    make_cache(tmp_path / "cache", samples, shapes=SHAPES)
    student = build_tiny_student(tmp_path / "student", seed=0)
    config = tmp_path / "student" / "llm" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "attention_dropout": DROPOUT}))
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with sdpa_kernel([SDPBackend.MATH]):  # a deterministic backward: the runs must agree to 1e-6
            train(run_config((tmp_path, student), tmp_path / "full", fsdp=True, save_frozen=True))
            assert dist.get_backend() == "nccl"
            train(resume_config(tmp_path / "full", tmp_path / "resumed", fsdp=True))
    finally:
        torch.use_deterministic_algorithms(deterministic)
        if dist.is_initialized():
            dist.destroy_process_group()
    assert_same_run(tmp_path / "full", tmp_path / "resumed")
