"""WebDataset corpus shards as both sides read them: listing, samples, image bytes.

A corpus is a set of tar files; a sample is the group of consecutive members sharing a key
(`dir/key.ext` -> key `dir/key`), the WebDataset convention. Shard URLs: a local path, any fsspec
URL (with `storage_options`), or `pipe:COMMAND` whose standard output is the tar; brace patterns
(`{000000..000099}`) expand in all of them, and a pipe shard is named after its last `.tar` word.

Design choice: tars are read with the standard library, not the `webdataset` package, which
imports torch (schemas/ must not) and has no resumable (seed, epoch) order; so the pipeline, the
trainer and outside tools agree on keys, shard names and image sha256s. Cost: a pipe is read
forward only, so counting a pipe shard's samples reads all its bytes.
"""

from __future__ import annotations

import hashlib
import io
import os
import posixpath
import shlex
import subprocess
import tarfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import fsspec

from .errors import CorpusError
from .storage import check_safe_name

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
MAX_IMAGE_PIXELS = 1 << 28
"""Images above this many pixels (e.g. 16384 x 16384) are recorded as errors, not decoded."""


@dataclass(frozen=True)
class CorpusShard:
    name: str
    """Shard name: the tar's file name without `.tar`; names the cache shard too."""
    url: str


@dataclass
class RawSample:
    key: str
    files: dict[str, bytes] = field(default_factory=dict)

    @property
    def image_bytes(self) -> bytes | None:
        for ext in IMAGE_EXTENSIONS:
            if ext in self.files:
                return self.files[ext]
        return None


@dataclass(frozen=True)
class ReadFailure:
    """A sample lost while reading the tar itself (truncation, corrupt header)."""

    key: str
    reason: str


def _expand_braces(pattern: str) -> list[str]:
    import braceexpand

    return list(braceexpand.braceexpand(pattern))


PIPE = "pipe:"


class _PipeReader(io.RawIOBase):
    """A command's standard output as a binary file that tarfile can read: forward seeks read
    and drop bytes, backward seeks to within `KEEP` bytes of the furthest byte read are served from a buffer.
    EOF with a failed command raises OSError naming the command and its exit status."""

    KEEP = 1 << 16

    def __init__(self, command: str):
        self.command = command
        self._proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, bufsize=1 << 20)
        self._buf = bytearray()  # the stream's bytes [self._end - len(buf), self._end)
        self._end = 0
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def _pull(self, n: int) -> bytes:
        data = self._proc.stdout.read(n)
        if not data:
            status = self._proc.wait()
            if status != 0:
                raise OSError(f"command {self.command!r} exited with status {status}")
        excess = (self._end - self.KEEP) - (
            self._end - len(self._buf)
        )  # bytes older than KEEP before the end
        self._buf += data
        self._end += len(data)
        if excess > self.KEEP:  # trimmed in steps of > KEEP: amortised O(1) per byte
            del self._buf[:excess]
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        target = offset if whence == 0 else self._pos + offset if whence == 1 else None
        if target is None:
            raise io.UnsupportedOperation("seek from the end of a pipe")
        if target < self._end - len(self._buf):
            raise io.UnsupportedOperation(
                f"backward seek to {target} on a pipe (buffered from {self._end - len(self._buf)})"
            )
        while self._end < target:
            if not self._pull(min(target - self._end, 1 << 20)):
                break
        self._pos = min(target, self._end)
        return self._pos

    def read(self, n: int = -1) -> bytes:
        out = bytearray()
        if self._pos < self._end:
            start = len(self._buf) - (self._end - self._pos)
            out += self._buf[start:] if n < 0 else self._buf[start : start + n]
            self._pos += len(out)
        while n < 0 or len(out) < n:
            data = self._pull(1 << 20 if n < 0 else max(n - len(out), 1 << 16))
            if not data:
                break
            take = data if n < 0 else data[: n - len(out)]
            out += take
            self._pos += len(take)
        return bytes(out)

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.stdout.close()
        self._proc.wait()
        super().close()


@contextmanager
def open_shard(url: str, storage_options: dict | None = None):
    """One shard's bytes: `pipe:COMMAND` (the command's stdout) or a path / fsspec URL."""
    if url.startswith(PIPE):
        reader = _PipeReader(url[len(PIPE) :])
        try:
            yield reader
        finally:
            reader.close()
    else:
        with fsspec.open(url, "rb", **(storage_options or {})) as raw:
            yield raw


def _pipe_shard(url: str) -> CorpusShard:
    words = [w for w in shlex.split(url[len(PIPE) :]) if w.endswith(".tar")]
    if not words:
        raise CorpusError(
            f"{url!r}: a pipe: shard's command must name its .tar (the shard name comes from it)"
        )
    base = posixpath.basename(words[-1])
    return CorpusShard(check_safe_name(base[: -len(".tar")], "corpus shard name"), url)


def list_shards(corpus: str | os.PathLike[str], storage_options: dict | None = None) -> list[CorpusShard]:
    """A folder, a brace pattern (`shard-{000..009}.tar`), a glob, fsspec URLs thereof, or `pipe:COMMAND`s."""
    corpus = os.fspath(corpus)
    urls: list[str] = []
    pipes: list[CorpusShard] = []
    for item in _expand_braces(corpus):
        if item.startswith(PIPE):
            pipes.append(_pipe_shard(item))
            continue
        fs, path = fsspec.core.url_to_fs(item, **(storage_options or {}))
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        prefix = "" if protocol in ("file", "local") else f"{protocol}://"
        if any(c in path for c in "*?["):
            found = fs.glob(path)
        elif fs.isdir(path):
            found = [p for p in fs.ls(path, detail=False) if p.endswith(".tar")]
        elif fs.exists(path):
            found = [path]
        else:
            raise CorpusError(f"corpus path {item!r} does not exist")
        urls.extend(prefix + p for p in sorted(found))
    shards = []
    for url in urls:
        base = posixpath.basename(url)
        if not base.endswith(".tar"):
            raise CorpusError(f"{url}: corpus shards must be .tar files")
        shards.append(CorpusShard(check_safe_name(base[: -len(".tar")], "corpus shard name"), url))
    shards.extend(pipes)
    names = [s.name for s in shards]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise CorpusError(f"corpus {corpus!r}: shard names must be unique, repeated: {dup}")
    if not shards:
        raise CorpusError(f"corpus {corpus!r} holds no .tar shards")
    return shards


def split_member_name(name: str) -> tuple[str, str]:
    """Tar member name -> (sample key, extension), WebDataset's convention: `dir/key.ext.gz` -> (`dir/key`, `ext.gz`)."""
    directory, base = posixpath.split(name)
    if "." not in base:
        return name, ""
    stem, ext = base.split(".", 1)
    return posixpath.join(directory, stem) if directory else stem, ext.lower()


def iter_samples(url: str, storage_options: dict | None = None) -> Iterator[RawSample | ReadFailure]:
    """Samples of one tar in order; a truncated or corrupt tar ends with a ReadFailure for the sample
    being read. tarfile ends quietly at a cut inside a header, so the bytes after the last member are
    checked too: anything but zero padding, or no padding at all, is a truncation."""
    current: RawSample | None = None
    try:
        with open_shard(url, storage_options) as raw:
            with tarfile.open(fileobj=raw, mode="r:") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    key, ext = split_member_name(member.name)
                    if key.startswith("__") or not ext:
                        continue
                    # A new key closes the previous sample before this member's data is read, so a
                    # tar cut inside sample N reports N as lost, not the complete sample before it.
                    if current is not None and key != current.key:
                        yield current
                        current = None
                    if current is None:
                        current = RawSample(key)
                    data = tar.extractfile(member).read()
                    if len(data) != member.size:
                        raise tarfile.ReadError(
                            f"member {member.name} truncated ({len(data)} of {member.size} bytes)"
                        )
                    current.files[ext] = data
                end = tar.offset
            raw.seek(end)
            tail = raw.read(1 << 20)
        if not tail or tail.strip(b"\0"):
            name = tail[:100].split(b"\0")[0].decode("utf-8", "replace") if tail.strip(b"\0") else ""
            key = split_member_name(name)[0] if name else None
            if key is not None and (current is None or key != current.key):
                if current is not None:
                    yield current
                current = RawSample(key)
            what = f"incomplete header of {name!r}" if name else "no end-of-archive marker"
            raise tarfile.ReadError(f"{what} at byte {end}")
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        lost = current.key if current is not None else f"{posixpath.basename(url)}#end"
        yield ReadFailure(lost, f"truncated or corrupt tar {url}: {type(exc).__name__}: {exc}")
        return
    if current is not None:
        yield current


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def decode_image(data: bytes, draft_size: int | None = None):
    """Bytes -> RGB PIL image. Converts CMYK, 16-bit, RGBA, palette and grayscale images.

    `draft_size` lets JPEG decode at a reduced scale (>= that size), which is several
    times faster for large photos. Raises ValueError with the reason on bad input.
    """
    import numpy as np
    from PIL import Image

    if not data:
        raise ValueError("empty image file")
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > MAX_IMAGE_PIXELS:
            raise ValueError(f"image too large: {width}x{height} pixels (limit {MAX_IMAGE_PIXELS})")
        if draft_size and image.format == "JPEG":
            image.draft("RGB", (draft_size, draft_size))
        image.load()
    except ValueError:
        raise
    except Exception as exc:  # PIL raises many types for undecodable bytes
        raise ValueError(f"not a decodable image: {type(exc).__name__}: {exc}") from exc
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16/32-bit grayscale: rescale to 8 bits
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 1.0)
        image = Image.fromarray(np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    if image.mode != "RGB":
        image = image.convert("RGB")
    if min(image.size) < 1:
        raise ValueError(f"image has zero size {image.size}")
    return image


class TarShardWriter:
    """Write one WebDataset tar, atomically: `<name>.tar` appears only when complete."""

    def __init__(self, path: str):
        self.path = path
        self._tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        self._file = open(self._tmp, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)
        self.count = 0

    def write(self, key: str, files: dict[str, bytes]) -> None:
        if "." in posixpath.basename(key) or key.startswith("/") or ".." in key.split("/"):
            raise ValueError(
                f"sample key {key!r} must not contain '.' in its last part, a leading '/' or '..'"
            )
        for ext, data in files.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644  # mtime 0: byte-identical rebuilds
            self._tar.addfile(info, io.BytesIO(data))
        self.count += 1

    def close(self) -> None:
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        self._tar.close()
        self._file.close()
        os.remove(self._tmp)

    def __enter__(self) -> TarShardWriter:
        return self

    def __exit__(self, exc_type, *_) -> None:
        self.close() if exc_type is None else self.abort()
