"""Teacher specifications: what makes a cached target what it is.

A target is defined by the teacher's weights *and* by how the image was
prepared and which layers were read. All of it goes into `TeacherSpec`, and a
fingerprint (sha256 over its canonical JSON) identifies it. The cache refuses to
mix targets whose fingerprints differ. Cost: any change of a preprocessing
constant, even a harmless one, forces a new cache (or an explicit overwrite).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

STORAGE_DTYPES = ("float16", "bfloat16", "int8")


@dataclass(frozen=True, kw_only=True)
class CodecSpec:
    """Compression of the stored targets (Blosc inside Zarr's sharding codec)."""

    cname: str = "zstd"
    """Blosc compressor: 'lz4', 'zstd', ... (new specs: `default_codec(dtype)`; docs/BENCHMARKS.md "Codecs")."""
    clevel: int = 3
    """Compression level (0 = stored uncompressed in Blosc frames)."""
    shuffle: str = "shuffle"
    """Blosc filter: 'shuffle' (byte), 'bitshuffle' or 'noshuffle'."""
    # These defaults read a recorded spec that names no codec; a new spec takes `default_codec(dtype)`.


DEFAULT_CODECS = {
    "float16": CodecSpec(cname="lz4", clevel=5, shuffle="shuffle"),
    "bfloat16": CodecSpec(cname="lz4", clevel=5, shuffle="shuffle"),
    "int8": CodecSpec(cname="lz4", clevel=5, shuffle="shuffle"),
}
"""Codec of a new cache per storage dtype, chosen by `ola bench codecs` (docs/BENCHMARKS.md, "Codecs"):
zstd's saved bytes do not pay for its decode time at the loader's read rates, while lz4 + byte shuffle
decodes at copy speed. Cost: caches are larger on disk than with zstd; pass
`codec=CodecSpec(cname="zstd", ...)` where disk matters more."""


def default_codec(dtype: str) -> CodecSpec:
    """The codec a new spec of this storage dtype gets when none is given."""
    if dtype not in DEFAULT_CODECS:
        raise ValueError(f"dtype {dtype!r} is not one of {STORAGE_DTYPES}")
    return DEFAULT_CODECS[dtype]


@dataclass(frozen=True, kw_only=True)
class TeacherOrigin:
    """Which teacher, its recipe and where its weights come from: the one description that the
    pipeline's `TeacherSource` and the cache's `TeacherSpec` both extend."""

    name: str
    """Task name and cache folder: 'depth', 'seg', 'gen' or any other identifier."""
    kind: str
    """Extraction recipe in the pipeline: 'depth_anything', 'oneformer_swin' or 'clip_image_embeds'."""
    model: str
    """Hub id or local folder the weights are loaded from (via `from_pretrained`)."""
    subfolder: str = ""
    """Subfolder of `model` holding the weights (e.g. 'image_encoder' for unCLIP)."""
    revision: str = ""
    """Hub revision (a commit sha for the paper preset); "" = the default branch, or a local folder."""

    def origin(self) -> dict[str, str]:
        """The shared fields, to build one subclass from another: `TeacherSpec(**source.origin(), ...)`."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(TeacherOrigin)}


@dataclass(frozen=True, kw_only=True)
class TeacherSpec(TeacherOrigin):
    """Everything that determines one teacher's stored targets."""

    weights_sha256: str = ""
    """sha256 over the loaded weights (state dict bytes), filled in by the pipeline."""
    preprocess: dict[str, Any] = field(default_factory=dict)
    """Resize / crop / normalisation constants, exactly as applied."""
    layers: tuple[int, ...] = ()
    """Which internal layers are read (meaning depends on `kind`)."""
    shape: tuple[int, int] = (0, 0)
    """Target shape per image: (tokens T, width D)."""
    dtype: str = "float16"
    """Storage dtype: float16, bfloat16 (exact), or int8 (lossy, per-token scale)."""
    codec: CodecSpec | None = None
    """Compression; None = `default_codec(dtype)`, written out by `to_dict`, so the fingerprint and
    cache.json record the codec actually used."""

    def __post_init__(self) -> None:
        if self.dtype not in STORAGE_DTYPES:
            raise ValueError(f"teacher {self.name!r}: dtype {self.dtype!r} is not one of {STORAGE_DTYPES}")
        if not self.name.isidentifier():
            raise ValueError(f"teacher name {self.name!r} must be a plain identifier (it names a folder)")
        if len(self.shape) != 2 or min(self.shape) < 1:
            raise ValueError(
                f"teacher {self.name!r}: shape {self.shape!r} must be (tokens, width), both >= 1"
            )

    @property
    def storage_codec(self) -> CodecSpec:
        """The codec the arrays are (to be) stored with."""
        return self.codec if self.codec is not None else default_codec(self.dtype)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["codec"] = dataclasses.asdict(self.storage_codec)
        out["layers"] = list(self.layers)
        out["shape"] = list(self.shape)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TeacherSpec:
        data = dict(data)
        data["layers"] = tuple(data.get("layers", ()))
        data["shape"] = tuple(data["shape"])
        data["codec"] = CodecSpec(**data.get("codec", {}))
        return cls(**data)

    @property
    def fingerprint(self) -> str:
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def provenance(self) -> str:
        """One line for plans and logs: where the weights came from (revision) and their hash."""
        where = f"{self.model}/{self.subfolder}" if self.subfolder else self.model
        revision = self.revision or "unpinned (default branch, or a local folder)"
        return f"{where} @ {revision}, weights sha256 {self.weights_sha256 or 'unknown'}"

    def diff(self, other: TeacherSpec) -> list[str]:
        """Field names whose values differ, for error messages; for `preprocess`, each differing key with
        both values (e.g. "preprocess.jpeg_draft: 224 -> 0")."""
        a, b = self.to_dict(), other.to_dict()
        out = []
        for k in sorted(a.keys() | b.keys()):
            if a.get(k) == b.get(k):
                continue
            if k == "preprocess" and isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
                pa, pb = a[k], b[k]
                out += [
                    f"preprocess.{p}: {pa.get(p)!r} -> {pb.get(p)!r}"
                    for p in sorted(pa.keys() | pb.keys())
                    if pa.get(p) != pb.get(p)
                ]
            else:
                out.append(k)
        return out
