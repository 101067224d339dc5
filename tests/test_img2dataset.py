"""img2dataset-layout corpora (`jpg` + `txt` caption + `json` metadata, no conversations) with
`ola precompute` and `ola train`, through `pipe:` URLs and brace patterns."""

from __future__ import annotations

import json

import pytest

from olavlm.schemas.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from olavlm.schemas.corpus import TarShardWriter, list_shards
from olavlm.schemas.errors import DataError
from tests._precompute_data import jpeg, local_ray, photo
from tests._trainer_data import tiny_text_setup

ray_local = pytest.fixture(scope="module")(local_ray)


def caption(key: str) -> str:
    return f"a photograph numbered {key}"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two shards as img2dataset writes them: 000000.tar, 000001.tar; keys like 000010003."""
    folder = tmp_path_factory.mktemp("i2d")
    keys = []
    for s in range(2):
        with TarShardWriter(str(folder / f"{s:06d}.tar")) as writer:
            for i in range(5):
                key = f"{s:05d}{i:04d}"
                image = photo(s * 5 + i)
                meta = {
                    "url": f"https://example.com/{key}.jpg",
                    "key": key,
                    "status": "success",
                    "error_message": None,
                    "caption": caption(key),
                    "width": image.width,
                    "height": image.height,
                }
                writer.write(
                    key, {"jpg": jpeg(image), "txt": caption(key).encode(), "json": json.dumps(meta).encode()}
                )
                keys.append(key)
    return folder, keys


def urls(folder) -> dict[str, str]:
    return {
        "folder": str(folder),
        "brace": f"{folder}/{{000000..000001}}.tar",
        "pipe": f"pipe:cat {folder}/{{000000..000001}}.tar",
    }


def test_pipe_and_brace_list_the_same_shards(corpus):
    folder, _ = corpus
    names = {how: [s.name for s in list_shards(url)] for how, url in urls(folder).items()}
    assert names == {how: ["000000", "000001"] for how in names}


def one_epoch(loader, n: int) -> list[dict]:
    batches = []
    for batch, _state in loader:
        batches.append(batch)
        if sum(len(b["keys"]) for b in batches) >= n:
            return batches
    raise AssertionError("loader ended")


@pytest.mark.parametrize("how", ["pipe", "brace"])
def test_captions_become_a_prompt_and_an_answer(corpus, how):
    from olavlm.trainer.data.loader import build_loader
    from olavlm.trainer.data.text import IGNORE

    folder, keys = corpus
    tokenizer, layout, transform = tiny_text_setup()
    config = DataConfig(
        data=urls(folder)[how],
        batch_size=4,
        num_workers=0,
        max_length=256,
        caption_prompt="Write a short caption.",
    )
    batches = one_epoch(
        build_loader(config, tokenizer=tokenizer, layout=layout, transform=transform), len(keys)
    )
    seen = []
    for batch in batches:
        for key, ids, labels in zip(batch["keys"], batch["input_ids"], batch["labels"]):
            seen.append(key)
            answer = tokenizer.decode([t for t in labels.tolist() if t != IGNORE], skip_special_tokens=True)
            assert caption(key) in answer
            assert "Write a short caption." in tokenizer.decode(ids.tolist(), skip_special_tokens=True)
        assert batch["has_image"].all()
    assert sorted(seen) == sorted(keys)


def test_caption_prompt_off_refuses_caption_only_samples(corpus):
    from olavlm.trainer.data.loader import build_loader

    folder, _ = corpus
    tokenizer, layout, transform = tiny_text_setup()
    config = DataConfig(data=str(folder), batch_size=2, num_workers=0, caption_prompt="")
    with pytest.raises(DataError, match="caption_prompt") as info:
        next(iter(build_loader(config, tokenizer=tokenizer, layout=layout, transform=transform)))
    assert info.value.reason == "bad_json"


@pytest.mark.timeout(300)
def test_precompute_then_train_through_a_pipe(ray_local, corpus, tmp_path, capsys):
    """`ola precompute` and `ola train` (PT with distillation) on the pipe: + brace URL; the cache verifies
    against the plain folder, so the pipe names shards and keys as the files do. Off a terminal the
    trainer's progress is plain lines, not a tqdm bar."""
    from olavlm.pipeline.config import PrecomputeConfig
    from olavlm.pipeline.precompute import precompute
    from olavlm.schemas.cache import TargetCache
    from olavlm.schemas.inspect import verify_cache
    from olavlm.trainer.train import train

    folder, keys = corpus
    url = urls(folder)["pipe"]
    summary = precompute(
        PrecomputeConfig(
            corpus=url, cache=str(tmp_path / "cache"), preset="tiny", batch_size=4, progress=False
        )
    )
    assert (summary.committed, summary.samples) == (6, 3 * len(keys))  # 3 teachers x 2 shards
    report = verify_cache(TargetCache(str(tmp_path / "cache")), corpus=str(folder))
    assert report.ok, report.problems
    result = train(
        RunConfig(
            model=ModelConfig(preset="tiny"),
            data=DataConfig(
                data=url, cache=str(tmp_path / "cache"), batch_size=2, num_workers=0, max_length=256
            ),
            train=TrainConfig(stage="pt", steps=2, out=str(tmp_path / "run"), save_every=2, log_every=1),
        )
    )
    err = capsys.readouterr().err
    assert "train pt: step 1/2 loss" in err and "train pt: step 2/2 loss" in err and "\r" not in err
    assert (
        result["step"] == 2
        and result["last"]["loss"] > 0
        and set(result["fingerprints"]) == {"depth", "gen", "seg"}
    )


def test_pipe_reader_reads_forward_and_seeks_back_within_its_buffer(tmp_path):
    """The `pipe:` stream tarfile reads: every read returns the file's bytes, after forward seeks and
    backward seeks up to KEEP bytes before the furthest byte read; a failed command is an OSError."""
    import os
    import random

    from olavlm.schemas.corpus import _PipeReader

    data = os.urandom(1_500_000)
    (tmp_path / "blob").write_bytes(data)
    for seed in range(5):
        reader, rng, pos, far = _PipeReader(f"cat {tmp_path}/blob"), random.Random(seed), 0, 0
        while True:
            if rng.random() < 0.3 and far > _PipeReader.KEEP:
                pos = reader.seek(rng.randint(far - _PipeReader.KEEP, far + 100_000))
            n = rng.choice([1, 512, 70_000, 300_000])
            chunk = reader.read(n)
            assert chunk == data[pos : pos + n]
            if not chunk:
                break
            pos += len(chunk)
            far = max(far, pos)
        reader.close()
    reader = _PipeReader(f"cat {tmp_path}/missing")
    with pytest.raises(OSError, match="exited with status"):
        reader.read()
    reader.close()
