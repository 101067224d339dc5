"""The Ray precompute job on the tiny preset: end to end, resume, bad inputs, CLI errors, S3.

All Ray tests share one local Ray instance (module fixture; the job reuses it), and every Ray job
costs an actor start and a teacher load: tests that start from a finished cache copy full_run's, and
tests that read one job's outcome share it (module fixtures).
Corpora are built on the fly from scikit-image photos with `TarShardWriter`.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from olavlm.pipeline.encode import encode_on_device
from olavlm.pipeline.precompute import PrecomputeConfig, plan_precompute, precompute, preprocess_batches
from olavlm.pipeline.presets import preset_sources
from olavlm.pipeline.teachers import load_teacher
from olavlm.schemas.cache import TargetCache
from olavlm.schemas.corpus import TarShardWriter, list_shards
from olavlm.schemas.inspect import verify_cache
from tests._precompute_data import build_corpus, jpeg, local_ray, photo, png, read_cache

pytestmark = pytest.mark.timeout(300)


ray_local = pytest.fixture(scope="module")(local_ray)


def config(corpus, cache, **kwargs) -> PrecomputeConfig:
    return PrecomputeConfig(
        corpus=str(corpus), cache=str(cache), preset="tiny", batch_size=4, progress=False, **kwargs
    )


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    keys = build_corpus(folder, shards=2, per_shard=5)
    return folder, keys


@pytest.fixture(scope="module")
def full_run(ray_local, corpus, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache") / "c"
    summary = precompute(config(corpus[0], cache))
    return cache, summary


def reference_targets(corpus_folder, teacher_name: str, dtype: str = "float16") -> dict[str, np.ndarray]:
    """The same teacher run in this process, batch by batch as the job batches: key -> stored values."""
    teacher = load_teacher(preset_sources("tiny", (teacher_name,))[teacher_name])
    out = {}
    for shard in list_shards(str(corpus_folder)):
        for batch in preprocess_batches(shard.url, {teacher_name: teacher.spec.preprocess}, 4):
            if batch["keys"]:
                encoded = encode_on_device(teacher(torch.from_numpy(batch["inputs"][teacher_name])), dtype)
                out.update(zip(batch["keys"], encoded.values))
    return out


def test_end_to_end_targets_equal_the_teachers(full_run, corpus):
    cache_root, summary = full_run
    folder, keys = corpus
    assert (summary.shards, summary.committed, summary.skipped) == (2, 6, 0)
    assert summary.samples == 3 * len(keys) and summary.errors == 0 and summary.images == len(keys)
    cache = TargetCache(cache_root)
    assert cache.teachers() == ["depth", "gen", "seg"]
    shapes = {name: spec.shape for name, spec in cache.specs().items()}
    assert shapes == {"depth": (64, 32), "seg": (16, 128), "gen": (1, 32)}
    report = verify_cache(cache)
    assert report.ok, report.problems
    for name in ("depth", "seg", "gen"):
        stored = read_cache(cache_root, name)
        expected = reference_targets(folder, name)
        assert sorted(stored) == sorted(keys) == sorted(expected)
        for key in keys:
            np.testing.assert_allclose(
                stored[key].astype(np.float32), expected[key].astype(np.float32), atol=2e-3, rtol=2e-3
            )
    manifest = cache.manifest("depth").to_pandas() if hasattr(cache.manifest("depth"), "to_pandas") else None
    if manifest is not None:
        assert set(manifest["sha256"]) and (manifest["sha256"].str.len() == 64).all()


def test_rerun_skips_everything_and_changes_nothing(ray_local, full_run, corpus):
    cache_root, _ = full_run
    before = read_cache(cache_root, "seg")
    commits = {
        s: os.path.getmtime(cache_root / "seg" / s / "commit.json") for s in ("shard-000000", "shard-000001")
    }
    summary = precompute(config(corpus[0], cache_root))
    assert (summary.committed, summary.skipped, summary.images) == (0, 6, 0)
    after = read_cache(cache_root, "seg")
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert commits == {s: os.path.getmtime(cache_root / "seg" / s / "commit.json") for s in commits}


@pytest.fixture(scope="module")
def added_teacher_run(ray_local, full_run, corpus, tmp_path_factory):
    """A copy of full_run's cache, then a job of gen and gen_copy (gen's weights under a second name, added by
    configuration): gen is done, gen_copy is new. -> (cache, summary, gen's commit time before the job)."""
    cache_root = tmp_path_factory.mktemp("added") / "cache"
    shutil.copytree(full_run[0], cache_root)
    stamp = os.path.getmtime(cache_root / "gen" / "shard-000000" / "commit.json")
    overrides = {"gen_copy": f"clip_image_embeds:{preset_sources('tiny', ('gen',))['gen'].model}"}
    summary = precompute(config(corpus[0], cache_root, teachers=("gen", "gen_copy"), overrides=overrides))
    return cache_root, summary, stamp


def test_adding_a_teacher_computes_only_that_teacher(added_teacher_run):
    cache_root, summary, stamp = added_teacher_run
    assert (summary.committed, summary.skipped) == (2, 2)
    assert os.path.getmtime(cache_root / "gen" / "shard-000000" / "commit.json") == stamp
    assert TargetCache(cache_root).teachers() == ["depth", "gen", "gen_copy", "seg"]


def test_a_teacher_added_by_configuration_is_cached_like_the_preset_ones(added_teacher_run, corpus):
    cache_root, summary, _ = added_teacher_run
    assert summary.committed == 2 and summary.samples == len(corpus[1])
    original, copy = read_cache(cache_root, "gen"), read_cache(cache_root, "gen_copy")
    assert original.keys() == copy.keys() and all(np.array_equal(original[k], copy[k]) for k in original)
    gen_folder = preset_sources("tiny", ("gen",))["gen"].model
    with pytest.raises(ValueError, match="KIND:PATH_OR_ID"):
        config(corpus[0], cache_root, teachers=("gen", "other"), overrides={"other": gen_folder}).sources()
    with pytest.raises(ValueError, match="neither preset teachers"):
        config(corpus[0], cache_root, teachers=("gen", "nope")).sources()


def test_spec_change_is_refused_then_overwritten_and_int8_records_fidelity(
    ray_local, full_run, corpus, tmp_path
):
    from olavlm.cli.app import app

    cache_root = tmp_path / "cache"
    shutil.copytree(full_run[0], cache_root)  # gen stored as float16
    args = [
        "precompute",
        str(corpus[0]),
        str(cache_root),
        "--preset",
        "tiny",
        "--teachers",
        "gen",
        "--dtype",
        "int8",
        "--batch-size",
        "4",
        "--no-progress",
    ]
    refused = CliRunner().invoke(app, args)
    assert refused.exit_code == 2 and "--overwrite" in refused.output and "dtype" in refused.output
    done = CliRunner().invoke(app, [*args, "--overwrite"])
    assert done.exit_code == 0, done.output
    assert "int8 cosine_min" in done.output
    cache = TargetCache(cache_root)
    assert cache.spec("gen").dtype == "int8"
    info = cache.commit_info("gen", "shard-000000")
    assert info["fidelity"]["cosine_min"] > 0.999 and info["fidelity"]["max_rel_error"] < 0.01
    # the stored int8 equals the host-side reference quantisation of the same float32 outputs
    expected = reference_targets(corpus[0], "gen", "int8")
    values, _ = cache.open_shard("gen", "shard-000000").read_stored(slice(None))
    keys = cache.open_shard("gen", "shard-000000").keys
    assert np.abs(values.astype(int) - np.stack([expected[k] for k in keys]).astype(int)).max() <= 1


# -- bad inputs: one corpus, one run, one test per case ---------------------------------------
def cmyk_jpeg() -> bytes:
    return jpeg(photo(0).convert("CMYK"))


def sixteen_bit_png() -> bytes:
    array = (np.asarray(photo(1).convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    return png(Image.fromarray(array))  # uint16 -> mode I;16


def huge_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("1", (16400, 16400)).save(buffer, format="PNG")  # 269M pixels > MAX_IMAGE_PIXELS, ~30 KB
    return buffer.getvalue()


BAD_CASES = {
    # key: (files, expected outcome: "written" or the error stage)
    "undecodable": ({"jpg": b"this is not an image at all"}, "decode"),
    "empty": ({"jpg": b""}, "decode"),
    "cmyk": ({"jpg": None}, "written"),
    "sixteen-bit": ({"png": None}, "written"),
    "rgba": ({"png": None}, "written"),
    "grayscale": ({"jpg": None}, "written"),
    "huge": ({"png": None}, "decode"),
    "caption-only": ({"txt": b"a caption without an image"}, "decode"),
}


def bad_files(case: str) -> dict[str, bytes]:
    makers = {
        "cmyk": lambda: {"jpg": cmyk_jpeg()},
        "sixteen-bit": lambda: {"png": sixteen_bit_png()},
        "rgba": lambda: {"png": png(photo(2).convert("RGBA"))},
        "grayscale": lambda: {"jpg": jpeg(photo(3).convert("L"))},
        "huge": lambda: {"png": huge_png()},
    }
    return makers[case]() if case in makers else BAD_CASES[case][0]


BAD_SHARD_URLS: dict[str, str] = {}


@pytest.fixture(scope="module")
def bad_run(ray_local, tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    extra = {0: [(case, bad_files(case)) for case in BAD_CASES]}
    build_corpus(folder, shards=1, per_shard=2, extra=extra)
    # a truncated tar: 4 good samples, cut in the middle of the third one's image
    with TarShardWriter(str(folder / "truncated.tar")) as writer:
        for i in range(4):
            writer.write(f"t{i}", {"jpg": jpeg(photo(i))})
    data = (folder / "truncated.tar").read_bytes()
    offsets = []
    with tarfile.open(folder / "truncated.tar") as tar:
        offsets = [m.offset_data for m in tar.getmembers()]
    (folder / "truncated.tar").write_bytes(data[: offsets[2] + 100])
    BAD_SHARD_URLS.update({s.name: s.url for s in list_shards(str(folder))})
    cache_root = tmp_path_factory.mktemp("bad-cache") / "c"
    summary = precompute(config(folder, cache_root, teachers=("depth", "gen")))
    return TargetCache(cache_root), summary


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_is_converted_or_recorded(bad_run, case):
    cache, _ = bad_run
    for teacher in ("depth", "gen"):
        written = set(cache.manifest(teacher).column("key").to_pylist())
        errors = cache.errors(teacher).to_pylist()
        recorded = {e["key"]: e for e in errors}
        expected = BAD_CASES[case][1]
        if expected == "written":
            assert case in written and case not in recorded
        else:
            assert case not in written and recorded[case]["stage"] == expected and recorded[case]["reason"]


def test_truncated_tar_keeps_readable_samples_and_records_the_error(bad_run):
    cache, _ = bad_run
    keys = set(cache.open_shard("depth", "truncated").keys)
    assert "t0" in keys and keys <= {"t0", "t1"}  # t2 is cut; iter_samples may also count t1 as lost
    errors = [e for e in cache.errors("depth").to_pylist() if e["shard"] == "truncated"]
    assert [e["stage"] for e in errors] == ["read"] and errors[0]["key"] in {"t1", "t2"}
    assert "truncated" in errors[0]["reason"]


def test_inputs_equal_written_plus_errors_per_shard(bad_run):
    from olavlm.schemas.corpus import iter_samples

    cache, summary = bad_run
    inputs = {shard: sum(1 for _ in iter_samples(url)) for shard, url in BAD_SHARD_URLS.items()}
    assert inputs["shard-000000"] == 2 + len(BAD_CASES)
    for teacher in ("depth", "gen"):
        for shard, count in inputs.items():
            info = cache.commit_info(teacher, shard)
            assert info["rows"] + info["errors"] == count, (teacher, shard, info)
    assert summary.errors == 2 * (4 + 1)
    assert summary.unusable_samples == 4 + 1  # once each, not once per teacher


class RecordingBar:
    """Stands in for the rich progress bar: keeps its total and what was advanced."""

    def __init__(self, total):
        self.total, self.completed = total, 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def advance(self, task, count):
        self.completed += count


@pytest.fixture(scope="module")
def one_shard_run(ray_local, tmp_path_factory):
    """One shard (fewer than the 2 actors) of 4 photos, as many as a batch, so the last batch holds no image,
    then a text-only sample; depth and gen, the progress bar recorded. -> (summary, the bars)."""
    from olavlm.pipeline import precompute as driver

    folder = tmp_path_factory.mktemp("one-shard")
    build_corpus(folder / "corpus", shards=1, per_shard=4, extra={0: [("text-only", {"txt": b"no image"})]})
    bars = []

    def recording_bar(enabled, total):
        bars.append(RecordingBar(total))
        return bars[-1], 0

    job = config(folder / "corpus", folder / "cache", teachers=("depth", "gen"), actors=2)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(driver, "progress_bar", recording_bar)
        summary = precompute(dataclasses.replace(job, progress=True))
    return summary, bars


def test_fewer_shards_than_actors(one_shard_run):
    summary, _ = one_shard_run
    assert (summary.actors, summary.shards, summary.committed, summary.images) == (2, 1, 2, 4)


def test_progress_ends_at_the_total_and_refused_samples_count_once(one_shard_run):
    summary, bars = one_shard_run
    assert (bars[0].total, bars[0].completed) == (5, 5)
    assert (summary.samples, summary.errors, summary.unusable_samples) == (8, 2, 1)
    assert (
        "8 targets, 2 error rows (one per teacher and sample; samples without a usable image: 1)"
        in summary.describe()
    )


# -- CLI: plan, clear errors ------------------------------------------------------------------
def test_dry_run_prints_the_plan_and_writes_nothing(full_run, corpus, tmp_path):
    from olavlm.cli.app import app

    fresh = CliRunner().invoke(
        app,
        [
            "precompute",
            str(corpus[0]),
            str(tmp_path / "new"),
            "--preset",
            "tiny",
            "--teachers",
            "depth,gen",
            "--dry-run",
        ],
    )
    assert fresh.exit_code == 0, fresh.output
    assert "depth" in fresh.output and "0 shards done, 2 to do (10 samples)" in fresh.output
    assert not (tmp_path / "new").exists()
    done = plan_precompute(config(corpus[0], full_run[0]))
    assert done.todo == {} and done.done == {"depth": 2, "seg": 2, "gen": 2} and done.estimated_bytes() == 0


@pytest.mark.parametrize("make", ["missing", "empty"])
def test_corpus_errors_exit_non_zero_with_a_message(tmp_path, make):
    from olavlm.cli.app import app

    corpus = tmp_path / "corpus"
    if make == "empty":
        corpus.mkdir()
    result = CliRunner().invoke(app, ["precompute", str(corpus), str(tmp_path / "cache"), "--preset", "tiny"])
    assert result.exit_code == 2
    assert ("does not exist" if make == "missing" else "holds no .tar shards") in result.output
    assert not (tmp_path / "cache").exists()


def test_bad_options_are_clear_errors(tmp_path, corpus):
    from olavlm.cli.app import app

    for args, message in (
        (["--teacher", "depth"], "NAME=PATH_OR_ID"),
        (["--dtype", "float8"], "float16"),
        (["--teachers", "normals"], "unknown teacher"),
    ):
        result = CliRunner().invoke(
            app, ["precompute", str(corpus[0]), str(tmp_path / "c"), "--preset", "tiny", *args]
        )
        assert result.exit_code == 2 and message in result.output, result.output


def test_an_unloadable_teacher_is_one_line_naming_it(ray_local, corpus, tmp_path):
    """A hub id that is not cached, offline (HF_HUB_OFFLINE=1, conftest): in the dry run (in this process)
    and in a run (in a Ray actor) one line names the teacher, the id, the revision and the fixes."""
    from olavlm.cli.app import app
    from olavlm.pipeline.sources import TeacherLoadError, TeacherSource, unloadable

    assert os.environ["HF_HUB_OFFLINE"] == "1"
    args = ["precompute", str(corpus[0]), str(tmp_path / "c"), "--preset", "tiny", "--teachers", "gen"]
    result = CliRunner().invoke(app, [*args, "--teacher", "gen=nobody/not-a-model", "--dry-run"])
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert len(result.output) < 1200 and "Traceback" not in result.output, result.output
    for part in (
        "teacher 'gen' cannot be loaded from hub id 'nobody/not-a-model' (revision default branch)",
        "couldn't connect",
        "--teacher gen=FOLDER",
        "HF_HOME",
        "huggingface-cli login",
    ):
        assert part in text, (part, text)
    with pytest.raises(TeacherLoadError) as raised:
        precompute(
            config(corpus[0], tmp_path / "c2", teachers=("gen",), overrides={"gen": "nobody/not-a-model"})
        )
    message = str(raised.value)
    assert "\n" not in message and message.startswith("teacher 'gen' cannot be loaded from hub id")
    pinned = TeacherSource(name="seg", kind="oneformer_swin", model="org/seg", revision="abc123")
    assert "(revision abc123): gated repo. To fix" in str(unloadable(pinned, OSError("gated\nrepo")))


# -- S3 ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_cache_on_s3(ray_local, full_run, corpus, s3_options):
    options = s3_options
    job = config(corpus[0], "s3://olavlm/precompute-cache", teachers=("gen",), storage_options=options)
    summary = precompute(job)
    assert (summary.committed, summary.samples) == (2, 10)
    cache = TargetCache("s3://olavlm/precompute-cache", options)
    assert cache.committed_shards("gen") == ["shard-000000", "shard-000001"]
    assert verify_cache(cache).ok
    stored = read_cache("s3://olavlm/precompute-cache", "gen", **options)
    on_disk = read_cache(full_run[0], "gen")  # the same targets, written to a local disk
    assert sorted(stored) == sorted(on_disk) == sorted(corpus[1])
    assert all(np.array_equal(stored[k], on_disk[k]) for k in on_disk)
    cache.clean_staging("gen")  # what a rerun does first: it removes prefixes without commit.json only
    assert cache.committed_shards("gen") == ["shard-000000", "shard-000001"]
    again = plan_precompute(job)  # what a rerun would do (the driver plans the same): nothing
    assert again.todo == {} and again.done == {"gen": 2} and again.spec_status == {"gen": "same"}
    assert json.loads(json.dumps(cache.commit_info("gen", "shard-000000")))["rows"] == 5


def test_non_finite_teacher_outputs_become_recorded_errors():
    import torch

    from olavlm.pipeline.precompute import drop_non_finite

    targets = torch.ones(3, 2, 4)
    targets[1, 0, 2] = float("nan")
    batch = {"keys": ["a", "b", "c"], "sha256s": ["ha", "hb", "hc"], "errors": [("z", "decode", "bad")]}
    kept, keys, sha256s, errors = drop_non_finite("depth", targets, batch)
    assert keys == ["a", "c"] and sha256s == ["ha", "hc"] and kept.shape == (2, 2, 4)
    assert errors == [
        ("z", "decode", "bad"),
        ("b", "teacher", "teacher 'depth' returned NaN/inf for this image"),
    ]
    same = drop_non_finite(
        "depth", torch.ones(2, 1, 1), {"keys": ["x", "y"], "sha256s": ["1", "2"], "errors": []}
    )
    assert same[1] == ["x", "y"] and same[0].shape == (2, 1, 1)
