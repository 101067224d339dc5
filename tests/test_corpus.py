"""Corpus shards: listing, sample grouping, truncation, image decoding of awkward inputs."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image

from olavlm.schemas.corpus import (
    CorpusError,
    RawSample,
    ReadFailure,
    TarShardWriter,
    decode_image,
    iter_samples,
    list_shards,
)


def encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def test_listing_folder_brace_and_missing(tmp_path, demo_corpus):
    assert [s.name for s in list_shards(demo_corpus)] == ["demo-000000", "demo-000001", "demo-000002"]
    braced = list_shards(os.path.join(demo_corpus, "demo-{000000..000001}.tar"))
    assert [s.name for s in braced] == ["demo-000000", "demo-000001"]
    with pytest.raises(CorpusError, match="does not exist"):
        list_shards(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="no .tar shards"):
        list_shards(tmp_path / "empty")


def test_demo_samples_have_image_and_conversations(demo_corpus):
    import json

    samples = list(iter_samples(list_shards(demo_corpus)[0].url))
    assert [s.key for s in samples] == [f"demo-{i:06d}" for i in range(8)]
    meta = json.loads(samples[0].files["json"])
    assert meta["conversations"][0]["value"].startswith("<image>")
    assert decode_image(samples[0].image_bytes).mode == "RGB"


@pytest.mark.parametrize("member, offset", [("s1.jpg", 1500), ("s2.jpg", -300), ("s3.txt", 0)])
def test_truncated_tar_yields_whole_samples_then_names_the_cut_one(tmp_path, member, offset):
    """Cut inside a member's data (offset >= 0 from its data start) or inside its header (< 0)."""
    import tarfile

    path = str(tmp_path / "t.tar")
    with TarShardWriter(path) as writer:
        for i in range(5):
            writer.write(f"s{i}", {"jpg": os.urandom(3000), "txt": b"x"})
    with tarfile.open(path) as tar:
        info = tar.getmember(member)
    cut = str(tmp_path / "cut.tar")
    open(cut, "wb").write(open(path, "rb").read()[: info.offset_data + offset])
    out = list(iter_samples(cut))
    cut_key = member.split(".")[0]
    assert isinstance(out[-1], ReadFailure) and "truncated" in out[-1].reason
    assert out[-1].key == cut_key
    whole = [s for s in out if isinstance(s, RawSample)]
    assert [s.key for s in whole] == [f"s{i}" for i in range(int(cut_key[1:]))]
    assert all(set(s.files) == {"jpg", "txt"} for s in whole)


def test_writer_refuses_bad_keys_and_is_atomic(tmp_path):
    path = str(tmp_path / "a.tar")
    with pytest.raises(ValueError, match="key"):
        with TarShardWriter(path) as writer:
            writer.write("../up", {"txt": b"x"})
    assert os.listdir(tmp_path) == []  # aborted: no partial tar, no temp file


@pytest.mark.parametrize("mode", ["CMYK", "RGBA", "L", "LA", "P", "I;16", "1"])
def test_decode_converts_modes_to_rgb(mode):
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8))
    if mode == "I;16":
        image = Image.fromarray(np.arange(600, dtype=np.uint16).reshape(20, 30) * 100)
        fmt = "PNG"
    else:
        image = rgb.convert(mode)
        fmt = "TIFF" if mode == "CMYK" else "PNG"
    out = decode_image(encoded(image, fmt))
    assert out.mode == "RGB" and out.size == (30, 20)
    if mode == "I;16":  # 16-bit range mapped onto 8 bits, not clipped
        arr = np.asarray(out)[..., 0]
        assert arr.max() > 200 and arr.min() == 0


def test_decode_rejects_bad_bytes():
    with pytest.raises(ValueError, match="empty"):
        decode_image(b"")
    with pytest.raises(ValueError, match="not a decodable image"):
        decode_image(b"this is not an image at all")
    jpeg = encoded(Image.new("RGB", (64, 64)), "JPEG")
    with pytest.raises(ValueError, match="not a decodable image"):
        decode_image(jpeg[: len(jpeg) // 3])


def test_decode_refuses_huge_images(monkeypatch):
    from olavlm.schemas import corpus

    monkeypatch.setattr(corpus, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ValueError, match="too large"):
        decode_image(encoded(Image.new("RGB", (100, 100)), "PNG"))
