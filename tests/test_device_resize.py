"""`ola precompute --device-resize`: the host only decodes, the teacher actor resizes on its device.

What is checked: the device path's uint8 inputs stay within a stated distance of the host (PIL) path's
on real photos of several sizes, per teacher and at the paper's geometry; the targets' cosine against
the host path stays above a stated floor; the choice is recorded in the spec (another fingerprint)
while the default spec is exactly what it was; a job with the option completes, verifies, and is
refused as a different spec by a cache made without it.
"""

from __future__ import annotations

import dataclasses
import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from olavlm.bench.precompute import paper_recipes
from olavlm.pipeline import preprocess
from olavlm.pipeline.config import PrecomputeConfig
from olavlm.pipeline.precompute import preprocess_batches
from olavlm.pipeline.presets import preset_sources
from olavlm.pipeline.teachers import load_teacher
from olavlm.schemas.cache import TargetCache
from olavlm.schemas.corpus import list_shards
from tests._precompute_data import build_corpus, jpeg, local_ray, photo, read_cache

pytestmark = pytest.mark.timeout(300)

TOLERANCE = {"float": (0.5, 12), "uint8": (0.05, 2)}
"""Per kernel: (mean, max) |device - host| in grey levels over every uint8 pixel of a batch. float: what a CUDA
device runs (measured mean 0.08-0.24, max 10: PIL rounds between its two passes, float32 does not); uint8: torch's
uint8 kernels, what a CPU device runs (PIL's arithmetic; measured mean <= 0.004, max 2)."""
KERNELS = [pytest.param(False, id="float"), pytest.param(True, id="uint8")]
COSINE_FLOOR = 0.9995
"""Per-image cosine of a tiny teacher's target from device inputs vs host inputs (measured >= 0.99987)."""
SIZES = sorted(
    {photo(i).size for i in range(6)}
)  # 512x512, 600x400, 451x300, 640x427: squares, wide, tall crops


def host_and_device_inputs(
    recipe: dict, uint8_kernels: bool, count: int = 6
) -> tuple[np.ndarray, np.ndarray]:
    """The same JPEGs through prepare_all with the host recipe and with the device one (+ device_prepare)."""
    on_device = {**recipe, "resize_on": "device"}
    host, decoded = [], []
    for i in range(count):
        data = jpeg(photo(i).convert("RGB"))
        host.append(preprocess.prepare_all(data, {"t": recipe})["t"])
        decoded.append(preprocess.prepare_all(data, {"t": on_device})["t"])
    return np.stack(host), preprocess.device_prepare(
        decoded, on_device, "cpu", uint8_kernels=uint8_kernels
    ).numpy()


def assert_close_pixels(host: np.ndarray, device: np.ndarray, uint8_kernels: bool, what: str) -> None:
    assert device.dtype == np.uint8 and device.shape == host.shape, what
    diff = np.abs(host.astype(np.int16) - device.astype(np.int16))
    mean, largest = TOLERANCE["uint8" if uint8_kernels else "float"]
    assert diff.mean() <= mean and diff.max() <= largest, (what, diff.mean(), diff.max())
    if not uint8_kernels:
        assert diff.mean() > 0, what  # not the host path by accident: torch's float filters are not PIL's


@pytest.mark.timeout(120)
@pytest.mark.parametrize("uint8_kernels", KERNELS)
@pytest.mark.parametrize("name", ["depth", "seg", "gen"])
def test_device_inputs_and_targets_are_close_to_the_host_path(name, uint8_kernels):
    assert len(SIZES) >= 4
    teacher = load_teacher(preset_sources("tiny")[name])
    host, device = host_and_device_inputs(teacher.spec.preprocess, uint8_kernels)
    assert_close_pixels(host, device, uint8_kernels, name)
    targets_host, targets_device = teacher(torch.from_numpy(host)), teacher(torch.from_numpy(device))
    cosine = torch.nn.functional.cosine_similarity(targets_host.flatten(1), targets_device.flatten(1))
    assert cosine.min() >= COSINE_FLOOR, cosine


@pytest.mark.parametrize("uint8_kernels", KERNELS)
@pytest.mark.parametrize("name", ["depth", "seg", "gen"])
def test_device_geometry_is_close_at_the_paper_sizes(name, uint8_kernels):
    """336 squash; 768 squash then the processor's 800; shortest side 224 + centre crop 224."""
    host, device = host_and_device_inputs(paper_recipes()[name], uint8_kernels, count=4)
    assert_close_pixels(host, device, uint8_kernels, name)


def test_a_cpu_device_uses_the_uint8_kernels_by_default():
    recipe = {**paper_recipes()["depth"], "resize_on": "device"}
    images = [np.asarray(photo(i).convert("RGB")) for i in range(2)]
    default = preprocess.device_prepare(images, recipe, "cpu")
    assert torch.equal(default, preprocess.device_prepare(images, recipe, "cpu", uint8_kernels=True))
    assert not torch.equal(default, preprocess.device_prepare(images, recipe, "cpu", uint8_kernels=False))


@pytest.mark.parametrize("uint8_kernels", KERNELS)
def test_device_prepare_keeps_the_order_of_mixed_sizes_and_handles_an_empty_batch(uint8_kernels):
    recipe = {"resize_shortest": 32, "center_crop": [32, 32], "resample": "bicubic"}
    images = [
        np.asarray(photo(i).convert("RGB")) for i in (0, 1, 0, 2)
    ]  # sizes a, b, a, c: grouped, then reordered
    together = preprocess.device_prepare(images, recipe, "cpu", uint8_kernels=uint8_kernels)
    alone = torch.cat(
        [preprocess.device_prepare([image], recipe, "cpu", uint8_kernels=uint8_kernels) for image in images]
    )
    assert torch.equal(together, alone) and not torch.equal(together[0], together[1])
    assert tuple(preprocess.device_prepare([], recipe, "cpu").shape) == (0, 32, 32, 3)


def test_the_spec_records_it_and_the_default_spec_is_unchanged():
    default = PrecomputeConfig(corpus="c", cache="k", preset="tiny").sources()
    device = PrecomputeConfig(corpus="c", cache="k", preset="tiny", device_resize=True).sources()
    for name in ("depth", "seg", "gen"):
        assert not default[name].device_resize and device[name].device_resize
        plain, moved = load_teacher(default[name]).spec, load_teacher(device[name]).spec
        assert (
            "resize_on" not in plain.preprocess
        )  # default specs (and their fingerprints) as before the option
        assert moved.preprocess == {**plain.preprocess, "resize_on": "device"}
        assert moved.to_dict() == {**plain.to_dict(), "preprocess": moved.preprocess}
        assert moved.fingerprint != plain.fingerprint


def test_batches_ship_each_decoded_image_once(tmp_path):
    build_corpus(tmp_path, shards=1, per_shard=3)
    url = list_shards(str(tmp_path))[0].url
    recipes = {n: {**r, "resize_on": "device"} for n, r in paper_recipes().items()}
    batch = next(preprocess_batches(url, recipes, batch_size=3))
    assert batch["keys"] == ["s0-000", "s0-001", "s0-002"]
    sizes = [photo(i).size for i in range(3)]
    for name in recipes:  # the decoded photos at their own sizes, the same objects for the three teachers
        assert [a.shape for a in batch["inputs"][name]] == [(h, w, 3) for w, h in sizes]
        assert all(a is b for a, b in zip(batch["inputs"][name], batch["inputs"]["depth"]))
    pixels = sum(a.nbytes for a in batch["inputs"]["depth"])
    assert len(pickle.dumps(batch, protocol=5)) < 1.1 * pixels  # once, not once per teacher
    with pytest.raises(ValueError, match="smaller than the crop"):  # still a per-sample error on the host
        preprocess.prepare_all(jpeg(photo(0)), {"g": {**recipes["gen"], "resize_shortest": 100}})


ray_local = pytest.fixture(scope="module")(local_ray)


@pytest.mark.timeout(240)
def test_a_device_resize_job_completes_verifies_and_never_mixes_with_a_host_cache(ray_local, tmp_path):
    from olavlm.cli.app import app

    corpus, cache = tmp_path / "corpus", tmp_path / "cache"
    keys = build_corpus(corpus, shards=2, per_shard=3)
    args = ["precompute", str(corpus), str(cache), "--preset", "tiny", "--batch-size", "2", "--no-progress"]
    done = CliRunner().invoke(app, [*args, "--device-resize", "--teachers", "depth,gen"])
    assert done.exit_code == 0, done.output
    verified = CliRunner().invoke(app, ["cache", "verify", str(cache), "--corpus", str(corpus), "--json"])
    assert verified.exit_code == 0, verified.output
    assert json.loads(verified.output[verified.output.index("{") :])["ok"] is True
    sources = preset_sources("tiny")
    for name in ("depth", "gen"):
        stored = read_cache(cache, name)
        assert sorted(stored) == sorted(keys)
        host = load_teacher(sources[name])
        recipes = {
            name: host.spec.preprocess
        }  # the same JPEG bytes as the corpus holds, through the host path
        images = np.stack([preprocess.prepare_all(jpeg(photo(i)), recipes)[name] for i in range(6)])
        expected = host(torch.from_numpy(images))  # keys in build order
        ours = torch.from_numpy(np.stack([stored[k].astype(np.float32) for k in keys]))
        cosine = torch.nn.functional.cosine_similarity(ours.flatten(1), expected.flatten(1))
        assert cosine.min() >= COSINE_FLOOR, (name, cosine)
        assert TargetCache(str(cache)).spec(name).preprocess["resize_on"] == "device"
    refused = CliRunner().invoke(app, [*args, "--teachers", "depth"])  # the host path: another spec
    assert refused.exit_code != 0 and "'depth' was written with spec" in refused.output, refused.output
    assert "preprocess" in refused.output  # the differing field is named


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bench_precompute_reports_the_host_cost_with_and_without_device_resize():
    from olavlm.cli.app import app

    result = CliRunner().invoke(
        app,
        [
            "bench",
            "precompute",
            "--json",
            "--preset",
            "tiny",
            "--images",
            "8",
            "--shards",
            "2",
            "--batch-size",
            "4",
            "--teachers",
            "gen",
            "--device-resize",
        ],
    )
    assert result.exit_code == 0, result.output
    figures = json.loads(result.output[result.output.index("{") :])
    assert figures["device_resize"] is True and figures["images"] == 8 and figures["busy_fraction"] > 0
    for sizes in ("preset_sizes", "paper_sizes"):
        costs = figures["host_cpu_ms_per_image"][sizes]
        assert (
            costs["host_resize"] > 0
            and costs["device_resize"] > 0
            and costs["device_resize_actor_cpu_wall"] > 0
        )


def test_the_bench_gpu_arm_is_on_by_default_and_runs_the_job_with_the_option(tmp_path):
    from olavlm.bench import gpu

    config = gpu.gpu_bench_config(cuda=False)
    assert config.pipeline_device_resize
    setup = gpu.Setup(config=config, device="cpu", tmp=str(tmp_path), teacher_folder=None, log=lambda m: None)
    jobs = [setup.job(gpu.TEACHERS, "float32", "c", "k", device_resize=flag) for flag in (False, True)]
    assert [j.device_resize for j in jobs] == [False, True]
    assert all(s.device_resize for s in jobs[1].sources().values())
    assert dataclasses.replace(jobs[1], device_resize=False) == jobs[0]


def test_with_jpeg_draft_the_host_ships_the_draft_decode():
    """--device-resize --jpeg-draft: the host decodes at the draft scale and ships that, smaller than a full decode."""
    recipe = paper_recipes()["depth"]
    data = jpeg(photo(0).convert("RGB").resize((2048, 2048)))
    full = preprocess.prepare_all(data, {"d": {**recipe, "resize_on": "device", "jpeg_draft": 0}})["d"]
    draft = preprocess.prepare_all(data, {"d": {**recipe, "resize_on": "device", "jpeg_draft": 336}})["d"]
    assert full.shape == (2048, 2048, 3) and draft.shape[0] < 2048 and min(draft.shape[:2]) >= 336
    resized = preprocess.device_prepare([draft], {**recipe, "resize_on": "device"}, "cpu")
    assert tuple(resized.shape) == (1, 336, 336, 3)


def test_device_resize_refuses_filters_torch_cannot_reproduce():
    """lanczos / box / hamming have no torch kernel: refused when the spec is built, naming teacher and filter
    (they were silently resized with bicubic); PIL's nearest maps to torch's nearest-exact."""
    from olavlm.pipeline.preprocess import INTERPOLATE_MODES, check_device_resample
    from olavlm.schemas.errors import ConfigError

    for name in ("lanczos", "box", "hamming"):
        with pytest.raises(ConfigError, match=f"teacher 'gen'.*{name}"):
            check_device_resample(
                "gen", {"resize_shortest": 224, "center_crop": [224, 224], "resample": name}
            )
    with pytest.raises(ConfigError, match="processor_resample"):
        check_device_resample(
            "seg", {"resize": [768, 768], "resample": "bicubic", "processor_resample": "lanczos"}
        )
    check_device_resample(
        "seg", {"resize": [768, 768], "resample": "bicubic", "processor_resample": "bilinear"}
    )
    assert INTERPOLATE_MODES["nearest"] == "nearest-exact"
    from olavlm.pipeline.preprocess import _device_resize

    image = np.random.default_rng(0).integers(0, 255, (97, 131, 3), dtype=np.uint8)
    pil = np.asarray(Image.fromarray(image).resize((50, 40), Image.NEAREST))
    torch_out = _device_resize(torch.from_numpy(image).permute(2, 0, 1)[None], (40, 50), "nearest")
    assert np.array_equal(torch_out[0].permute(1, 2, 0).numpy(), pil)  # "nearest" was off by up to 253 levels
