"""The streaming data path: source -> join -> tokenize -> collate -> loader (trainer/README.md)."""

from __future__ import annotations

import io
import itertools
import json

import numpy as np
import pytest
import torch

from olavlm.schemas.cache import SpecMismatchError
from olavlm.schemas.config import DataConfig
from olavlm.schemas.corpus import TarShardWriter
from olavlm.trainer.data.collate import to_device
from olavlm.trainer.data.join import DataError, scale_key
from olavlm.trainer.data.loader import build_loader
from olavlm.trainer.data.source import epoch_units, shards_of, split_by_node
from olavlm.trainer.data.text import IGNORE, TextError, tokenize
from tests._trainer_data import jpeg, make_cache, make_corpus, tiny_text_setup

TASKS = ("gen", "depth", "seg")


@pytest.fixture(scope="module")
def setup():
    return tiny_text_setup()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    samples = make_corpus(d / "corpus", shards=3, per_shard=6, text_only_every=5)
    cache, truth = make_cache(d / "cache", samples)
    return d, samples, truth


def loader(setup, d, *, tasks=TASKS, state=None, rank=0, world=1, **overrides):
    tokenizer, layout, transform = setup
    base = dict(data=str(d / "corpus"), cache=str(d / "cache"), batch_size=4, num_workers=0, shuffle_block=4)
    cfg = DataConfig(**{**base, **overrides})
    return build_loader(
        cfg,
        tokenizer=tokenizer,
        layout=layout,
        transform=transform,
        tasks=tasks,
        state=state,
        rank=rank,
        world=world,
    )


def take(ldr, n):
    return list(itertools.islice(iter(ldr), n))


def test_batch_contract_and_targets(setup, corpus):
    d, samples, truth = corpus
    tokenizer, layout, _ = setup
    seen = set()
    for batch, _ in take(loader(setup, d), 5):  # one epoch = 18 samples = 5 batches
        b, length = batch["input_ids"].shape
        assert batch["labels"].shape == batch["attention_mask"].shape == (b, length)
        assert batch["pixel_values"].shape == (b, 3, 8, 8) and batch["pixel_values"].dtype == torch.uint8
        for i, key in enumerate(batch["keys"]):
            seen.add(key)
            has_image = samples[key]["image"] is not None
            assert bool(batch["has_image"][i]) == has_image
            ids = batch["input_ids"][i][batch["attention_mask"][i].bool()]
            assert (ids == layout.image_token_id).sum() == (layout.num_image_tokens if has_image else 0)
            labelled = batch["labels"][i][batch["labels"][i] != IGNORE]
            assert tokenizer.decode(labelled).endswith("<|im_end|>\n")  # assistant turn only
            for task in TASKS:
                got = batch["targets"][task][i].float().numpy()
                want = truth[task][key] if has_image else np.zeros_like(got)
                np.testing.assert_array_equal(got, want)
            if not has_image:
                assert not batch["pixel_values"][i].any()
    assert seen == set(samples)


def test_keyed_path_equals_aligned(setup, tmp_path):
    samples = make_corpus(tmp_path / "corpus", shards=2, per_shard=4)
    _, truth = make_cache(
        tmp_path / "cache", samples, shard_names={"train-000": "other-a", "train-001": "other-b"}
    )
    for batch, _ in take(loader(setup, tmp_path), 2):
        for i, key in enumerate(batch["keys"]):
            np.testing.assert_array_equal(batch["targets"]["depth"][i].float().numpy(), truth["depth"][key])


def test_order_is_deterministic_and_epoch_dependent(setup, corpus):
    """The order depends on the number of workers (each reads its own units): see tests/test_worker_loader.py."""
    d, samples, _ = corpus
    keys = lambda ldr, n: [b["keys"] for b, _ in take(ldr, n)]  # noqa: E731
    base = keys(loader(setup, d), 10)
    assert base == keys(loader(setup, d), 10)
    assert base[:5] != base[5:10]  # epoch 1 is shuffled differently
    assert sorted(sum(base[:5], [])) == sorted(sum(base[5:10], [])) == sorted(samples)
    assert base != keys(loader(setup, d, seed=1), 10)
    two = take(loader(setup, d, num_workers=2), 10)
    assert [b["keys"] for b, _ in two] == keys(loader(setup, d, num_workers=2), 10)
    epoch0 = sorted(k for b, s in two if s["epoch"] == 0 for k in b["keys"])
    assert epoch0 == sorted(samples)  # two workers: each key of the epoch once


@pytest.mark.parametrize("workers", [0, 2, 3])
def test_loader_state_resume_is_exact(setup, corpus, workers):
    """Read N batches, save the state, rebuild, and the next K batches equal an uninterrupted run's."""
    d = corpus[0]
    n, k = 7, 5  # crosses an epoch boundary
    full = take(loader(setup, d, num_workers=workers), n + k)
    state = json.loads(json.dumps(full[n - 1][1]))  # the state goes through JSON in a checkpoint
    resumed = take(loader(setup, d, num_workers=workers, state=state), k)
    for (a, _), (b, _) in zip(full[n:], resumed):
        assert a["keys"] == b["keys"]
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(
            a["pixel_values"], b["pixel_values"]
        )
        assert all(torch.equal(a["targets"][t], b["targets"][t]) for t in TASKS)


def test_shuffle_before_split_by_node(setup, corpus):
    d, samples, _ = corpus
    shards = shards_of(str(d / "corpus"))
    # every rank computes the same global order, then takes its share
    assert epoch_units(shards, seed=0, epoch=0, world=2) == epoch_units(shards, seed=0, epoch=0, world=2)
    units = epoch_units(shards, seed=0, epoch=0, world=4)
    assert len(units) == 6  # 3 shards cut into 2 parts each for 4 ranks
    parts = [split_by_node(units, r, 4) for r in range(4)]
    assert sum(len(p) for p in parts) == len(units) and set().union(*parts) == set(units)
    got = []
    for rank in range(2):
        epoch0 = [b for b, s in take(loader(setup, d, rank=rank, world=2), 6) if s["epoch"] == 0]
        got.append({k for b in epoch0 for k in b["keys"]})
    assert not got[0] & got[1] and got[0] | got[1] == set(samples)


def test_no_cache_needed_without_tasks(setup, corpus):
    batch, _ = take(loader(setup, corpus[0], tasks=(), cache=""), 1)[0]
    assert batch["targets"] == {}


# -- bad data: each stops with key and shard named, or is counted under on_missing='skip' -------------
def bad_corpus(tmp_path, mutate):
    samples = make_corpus(tmp_path / "corpus", shards=1, per_shard=4)
    make_cache(tmp_path / "cache", samples)
    mutate(tmp_path, samples)
    return tmp_path


def rewrite(tmp_path, change):
    """Rewrite train-000.tar with sample s0-2 changed by `change(files)`."""
    from olavlm.schemas.corpus import iter_samples

    path = tmp_path / "corpus" / "train-000.tar"
    items = [(s.key, dict(s.files)) for s in iter_samples(str(path))]
    with TarShardWriter(str(path)) as w:
        for key, files in items:
            w.write(key, change(files) if key == "s0-2" else files)


def png_of(data):
    from PIL import Image

    buf = io.BytesIO()
    Image.open(io.BytesIO(data)).save(buf, format="PNG")
    return buf.getvalue()


BAD = {
    "missing_target": lambda tmp, s: make_cache(tmp / "cache2", {k: v for k, v in s.items() if k != "s0-2"}),
    "sha256_mismatch": lambda tmp, s: rewrite(tmp, lambda f: {"json": f["json"], "jpg": jpeg(99)}),
    "bad_json": lambda tmp, s: rewrite(tmp, lambda f: {"jpg": f["jpg"]}),
    "caption": lambda tmp, s: rewrite(tmp, lambda f: {"jpg": f["jpg"], "json": b'{"conversations": []}'}),
    "bad_image": lambda tmp, s: rewrite(tmp, lambda f: {"json": f["json"], "jpg": f["jpg"][:40]}),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_sample_stops_naming_key_and_shard(setup, tmp_path, case):
    d = bad_corpus(tmp_path, BAD[case])
    cache = str(d / ("cache2" if case == "missing_target" else "cache"))
    with pytest.raises(DataError) as err:
        take(loader(setup, d, cache=cache), 2)
    assert "'s0-2'" in str(err.value) and "'train-000'" in str(err.value)
    reason = {"caption": "bad_json"}.get(case, case)
    assert err.value.reason == reason
    got = take(loader(setup, d, cache=cache, on_missing="skip"), 1)
    batch, state = got[0]
    assert "s0-2" not in batch["keys"] and len(batch["keys"]) == 3
    assert state["skipped"] == {reason: 1}


def test_corrupt_image_with_matching_target(setup, tmp_path):
    """Undecodable image bytes whose sha256 the cache knows: the decode fails, naming key and shard."""
    samples = make_corpus(tmp_path / "corpus", shards=1, per_shard=2)
    samples["s0-0"]["image"] = b"\xff\xd8\xff\xe0 not really a jpeg"
    conv = json.dumps(
        {"conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x"}]}
    )
    with TarShardWriter(str(tmp_path / "corpus" / "train-000.tar")) as w:
        for i in range(2):
            w.write(f"s0-{i}", {"json": conv.encode(), "jpg": samples[f"s0-{i}"]["image"]})
    make_cache(tmp_path / "cache", samples)
    with pytest.raises(DataError, match="s0-0.*train-000") as err:
        take(loader(setup, tmp_path), 1)
    assert err.value.reason == "bad_image"


def test_truncated_tar_is_reported(setup, tmp_path):
    samples = make_corpus(tmp_path / "corpus", shards=1, per_shard=4)
    make_cache(tmp_path / "cache", samples)
    path = tmp_path / "corpus" / "train-000.tar"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="truncated or corrupt tar"):
        take(loader(setup, tmp_path), 2)
    _, state = take(loader(setup, tmp_path, on_missing="skip"), 1)[0]
    assert state["skipped"] == {"read": 1}


def test_spec_fingerprint_mismatch_is_refused(setup, corpus):
    d = corpus[0]
    with pytest.raises(SpecMismatchError, match="'depth'"):
        loader(setup, d, expect_fingerprints={"depth": "0123456789abcdef"})
    fingerprints = loader(setup, d).fingerprints
    loader(setup, d, expect_fingerprints=fingerprints)  # the recorded ones pass
    with pytest.raises(Exception, match="no targets for teacher"):
        loader(setup, d, tasks=("depth", "normals"))


# -- text ---------------------------------------------------------------------------------------
def test_truncation_never_cuts_image_or_task_tokens(setup):
    tokenizer, layout, _ = setup
    conv = [
        {"from": "human", "value": "<image>\nDescribe."},
        {"from": "gpt", "value": "A dog on a table. " * 20},
    ]
    full = tokenize(conv, tokenizer, layout, has_image=True, max_length=4096)
    block_end = max(i for i, t in enumerate(full.input_ids) if t in layout.image_block()) + 1
    first_label = next(i for i, t in enumerate(full.labels) if t != IGNORE)
    cut = tokenize(conv, tokenizer, layout, has_image=True, max_length=first_label + 3)
    assert cut.input_ids == full.input_ids[: first_label + 3] and len(cut.input_ids) < len(full.input_ids)
    assert sum(t == layout.image_token_id for t in cut.input_ids) == layout.num_image_tokens
    with pytest.raises(TextError, match="max_length") as err:
        tokenize(conv, tokenizer, layout, has_image=True, max_length=block_end - 1)
    assert err.value.reason == "too_long"
    with pytest.raises(TextError) as err:  # room for the prompt but not for one answer token
        tokenize(conv, tokenizer, layout, has_image=True, max_length=first_label)
    assert err.value.reason == "no_labels"


def test_labels_cover_every_assistant_turn_only(setup):
    tokenizer, layout, _ = setup
    conv = [
        {"from": "human", "value": "<image>\nWhat?"},
        {"from": "gpt", "value": "A dog."},
        {"from": "human", "value": "Color?"},
        {"from": "gpt", "value": "Red."},
    ]
    out = tokenize(conv, tokenizer, layout, has_image=True, max_length=4096)
    labelled = tokenizer.decode([t for t in out.labels if t != IGNORE])
    assert labelled == "A dog.<|im_end|>\nRed.<|im_end|>\n"
    # no placeholder in the text but an image: LLaVA puts it first in the user turn
    out = tokenize(
        conv[1:] and [{"from": "human", "value": "What?"}, conv[1]],
        tokenizer,
        layout,
        has_image=True,
        max_length=4096,
    )
    assert out.input_ids.count(layout.image_token_id) == layout.num_image_tokens


def test_image_transform_matches_clip_processor(tmp_path):
    from PIL import Image
    from transformers import CLIPImageProcessor

    from olavlm.trainer.data.images import ImageTransform, normalize_pixels

    processor = CLIPImageProcessor(size={"shortest_edge": 24}, crop_size={"height": 24, "width": 24})
    transform = ImageTransform.from_processor(processor)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (37, 53, 3), dtype=np.uint8))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    want = processor(images=image, return_tensors="pt")["pixel_values"][0]
    got = normalize_pixels(torch.from_numpy(transform(buf.getvalue()))[None], transform.mean, transform.std)[
        0
    ]
    assert got.shape == want.shape
    assert (got - want).abs().max() < 0.05  # uint8 rounding of the resized image


# -- from-llava ---------------------------------------------------------------------------------
def test_from_llava_reports_problems_and_joins(setup, tmp_path):
    from olavlm.schemas.corpus_build import convert_llava

    images = tmp_path / "images" / "coco"
    images.mkdir(parents=True)
    (images / "a.jpg").write_bytes(jpeg(1))
    (images / "b.JPEG").write_bytes(jpeg(2))
    conv = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A dog."}]
    entries = [
        {"id": "000001", "image": "coco/a.jpg", "conversations": conv},
        {"id": "000002", "image": "coco/missing.jpg", "conversations": conv},
        {"id": "000003", "image": "coco/b.JPEG"},
        {
            "id": "text.1",
            "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}],
        },
        {"id": "000001", "image": "coco/b.JPEG", "conversations": conv},
        {"id": "000005", "image": "../secret.jpg", "conversations": conv},
        "junk",
    ]
    (tmp_path / "llava.json").write_text(json.dumps(entries))
    out = tmp_path / "corpus"
    report = convert_llava(str(tmp_path / "llava.json"), str(tmp_path / "images"), str(out), shard_size=2)
    assert (
        report.samples == 3
        and report.text_only == 1
        and report.shards == ["llava-000000.tar", "llava-000001.tar"]
    )
    assert [(p["id"], p["index"]) for p in report.problems] == [
        ("000002", 1),
        ("000003", 2),
        ("000005", 5),
        (None, 6),
    ]
    assert "missing.jpg" in report.problems[0]["reason"]
    first = (out / "llava-000000.tar").read_bytes()
    convert_llava(
        str(tmp_path / "llava.json"), str(tmp_path / "images"), str(tmp_path / "again"), shard_size=2
    )
    assert (tmp_path / "again" / "llava-000000.tar").read_bytes() == first  # stable keys and bytes

    from olavlm.schemas.corpus import iter_samples

    samples = {}
    for shard in ("llava-000000", "llava-000001"):
        for s in iter_samples(str(out / f"{shard}.tar")):
            samples[s.key] = {"shard": shard, "image": s.image_bytes}
    assert sorted(samples) == ["000001", "000001-dup1", "text_1"]
    make_cache(tmp_path / "cache", samples)
    batches = take(loader(setup, tmp_path), 1)
    assert sorted(batches[0][0]["keys"]) == ["000001", "000001-dup1", "text_1"]


def test_from_llava_cli(tmp_path):
    from typer.testing import CliRunner

    from olavlm.cli.app import app

    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.jpg").write_bytes(jpeg(0))
    conv = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A dog."}]
    (tmp_path / "x.json").write_text(
        json.dumps(
            [
                {"id": "1", "image": "a.jpg", "conversations": conv},
                {"id": "2", "image": "gone.jpg", "conversations": conv},
            ]
        )
    )
    result = CliRunner().invoke(
        app,
        [
            "corpus",
            "from-llava",
            str(tmp_path / "x.json"),
            str(tmp_path / "img"),
            str(tmp_path / "out"),
            "--shard-size",
            "5",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "wrote 1 samples" in result.output and "'2'" in result.output


def test_from_llava_rerun_replaces_the_shards_and_reports_renamed_keys(tmp_path):
    """A rerun with another --shard-size leaves only the new set (each sample once); keys other than
    the id (non-ASCII, repeated) are counted and shown in the summary."""
    from typer.testing import CliRunner

    from olavlm.cli.app import app
    from olavlm.schemas.corpus import iter_samples, list_shards

    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.jpg").write_bytes(jpeg(0))
    conv = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A dog."}]
    ids = ["1", "2", "3", "café", "2"]
    (tmp_path / "x.json").write_text(
        json.dumps([{"id": i, "image": "a.jpg", "conversations": conv} for i in ids])
    )
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("not a shard")

    def convert(size):
        args = [
            "corpus",
            "from-llava",
            str(tmp_path / "x.json"),
            str(tmp_path / "img"),
            str(tmp_path / "out"),
        ]
        result = CliRunner().invoke(app, [*args, "--shard-size", size])
        assert result.exit_code == 0, result.output
        return result.output

    convert("2")
    assert len(list_shards(str(tmp_path / "out"))) == 3
    output = convert("5")
    keys = [s.key for shard in list_shards(str(tmp_path / "out")) for s in iter_samples(shard.url)]
    assert sorted(keys) == ["1", "2", "2-dup1", "3", "caf_"]  # once each: the old shards are gone
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "from_llava_report.json",
        "llava-000000.tar",
        "mine.txt",
    ]
    assert "removed 2 shards of an earlier conversion" in output and "llava-000001.tar" in output
    assert "2 samples keyed other than their id" in output and "'café' -> 'caf_'" in output
    report = json.loads((tmp_path / "out" / "from_llava_report.json").read_text())
    assert report["removed"] == ["llava-000001.tar", "llava-000002.tar"] and report["renamed"] == 2


@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_other_storage_dtypes_reach_the_batch_exactly(setup, tmp_path, dtype):
    samples = make_corpus(tmp_path / "corpus", shards=1, per_shard=3)
    _, truth = make_cache(tmp_path / "cache", samples, dtype=dtype)
    batch, _ = take(loader(setup, tmp_path), 1)[0]
    want = {"bfloat16": torch.bfloat16, "int8": torch.int8}[dtype]  # the stored form crosses the loader
    for task in TASKS:
        assert batch["targets"][task].dtype == want
        if dtype == "int8":  # its per-token scale beside it, dequantised on the device
            assert batch["targets"][scale_key(task)].shape == batch["targets"][task].shape[:2]
    on_device = to_device(batch, "cpu")
    assert set(on_device["targets"]) == set(TASKS)
    for task in TASKS:
        assert on_device["targets"][task].dtype == torch.float32
        for i, key in enumerate(batch["keys"]):
            np.testing.assert_array_equal(on_device["targets"][task][i].numpy(), truth[task][key])


def test_bench_loader_runs():
    from olavlm.bench.loader import bench_loader

    result = bench_loader(samples=16, batch_size=8, workers=0)
    assert result["samples_per_s_one_core"] > 0 and result["tokens_per_sample"] > 576 + 24
    assert set(result["stage_ms_per_sample"]) == {
        "tar_read",
        "jpeg_decode_resize",
        "tokenize",
        "join_sha256_and_cache_read",
        "collate",
    }


def test_keyed_corpus_opens_one_key_index_before_workers_start(setup, tmp_path):
    """Training shards that are no cache shards: the loader's main process builds the key index, and its two
    workers use that one (no worker builds its own: one published index, no build leftovers)."""
    samples = make_corpus(tmp_path / "corpus", shards=2, per_shard=4)
    _, truth = make_cache(
        tmp_path / "cache", samples, shard_names={"train-000": "other-a", "train-001": "other-b"}
    )
    ldr = loader(setup, tmp_path, num_workers=2)
    for task in TASKS:
        indexes = list((tmp_path / "cache" / task / ".keyindex").iterdir())
        assert len(indexes) == 1 and (indexes[0] / "index.json").exists()  # built before the first batch
    for batch, _ in take(ldr, 2):
        for i, key in enumerate(batch["keys"]):
            np.testing.assert_array_equal(batch["targets"]["depth"][i].float().numpy(), truth["depth"][key])
    for task in TASKS:
        assert len(list((tmp_path / "cache" / task / ".keyindex").iterdir())) == 1
