"""Zarr v3 `sharding_indexed` storage objects, encoded and decoded directly.

The cache's arrays are ordinary Zarr v3 arrays that zarr-python reads, but its per-row overhead
exceeds the decompression itself (docs/BENCHMARKS.md, "Direct reader vs zarr-python"), so the hot
paths read and write the format here: an object is the Blosc-compressed inner chunks followed by
an index of (offset, nbytes) uint64 pairs and its crc32c (index_location "end"). Chunks or whole
objects that zarr-python leaves out (all fill value) read as the fill value, as there.
Cost: this module must track the sharding spec; tests check interop both ways, and `check_codecs`
refuses by name the layouts this reader does not implement instead of misreading them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import google_crc32c
import numcodecs
import numpy as np

EMPTY = np.uint64(2**64 - 1)
INDEX_ENTRY = 16  # two uint64 per inner chunk
CRC = 4


def blosc_codec(cname: str, clevel: int, shuffle: str) -> numcodecs.Blosc:
    flag = {
        "noshuffle": numcodecs.Blosc.NOSHUFFLE,
        "shuffle": numcodecs.Blosc.SHUFFLE,
        "bitshuffle": numcodecs.Blosc.BITSHUFFLE,
    }[shuffle]
    return numcodecs.Blosc(cname=cname, clevel=clevel, shuffle=flag, blocksize=0)


def encode_object(rows: np.ndarray, rows_per_object: int, codec: numcodecs.Blosc) -> bytes:
    """Rows (k <= rows_per_object, ...) -> one storage object; missing trailing rows are empty."""
    chunks = [
        codec.encode(np.ascontiguousarray(row).astype(row.dtype.newbyteorder("<"), copy=False))
        for row in rows
    ]
    index = np.full((rows_per_object, 2), EMPTY, dtype="<u8")
    offset = 0
    for i, chunk in enumerate(chunks):
        index[i] = (offset, len(chunk))
        offset += len(chunk)
    index_bytes = index.tobytes()
    crc = np.uint32(google_crc32c.value(index_bytes)).astype("<u4").tobytes()
    return b"".join(chunks) + index_bytes + crc


def check_codecs(codecs: list[dict], where: str) -> None:
    """Raise ValueError unless an array's codec list (zarr.json "codecs") is the layout read here:
    sharding_indexed, index at the end (bytes little + crc32c), inner chunks bytes little + blosc."""

    def names(chain):
        return [(c.get("name"), (c.get("configuration") or {}).get("endian", "little")) for c in chain]

    expected = (
        "sharding_indexed (index_location end, index bytes+crc32c) around bytes (little endian) + blosc"
    )
    if len(codecs) != 1 or codecs[0].get("name") != "sharding_indexed":
        raise ValueError(
            f"{where}: codecs {[c.get('name') for c in codecs]} are not the cache layout ({expected})"
        )
    config = codecs[0].get("configuration") or {}
    ok = (
        config.get("index_location", "end") == "end"
        and names(config.get("index_codecs", [])) == [("bytes", "little"), ("crc32c", "little")]
        and names(config.get("codecs", [])) == [("bytes", "little"), ("blosc", "little")]
    )
    if not ok:
        raise ValueError(f"{where}: sharding configuration {config} is not the cache layout ({expected})")


def decode_index(tail: bytes, rows_per_object: int, where: str) -> np.ndarray:
    """The trailing index bytes of an object -> (rows_per_object, 2) uint64, checksum verified."""
    body, crc = tail[:-CRC], tail[-CRC:]
    if len(body) != rows_per_object * INDEX_ENTRY:
        raise ValueError(
            f"{where}: shard index has {len(body)} bytes, expected {rows_per_object * INDEX_ENTRY}"
        )
    if np.uint32(google_crc32c.value(body)).astype("<u4").tobytes() != crc:
        raise ValueError(f"{where}: shard index checksum mismatch (corrupt object)")
    return np.frombuffer(body, dtype="<u8").reshape(rows_per_object, 2)


@dataclass
class ObjectLayout:
    """Where one array's storage objects live and how to slice them."""

    path: str
    """Array folder (holds zarr.json and c/...)."""
    rows: int
    rows_per_object: int
    row_shape: tuple[int, ...]
    dtype: np.dtype
    fill_value: Any = 0
    """Value of the rows whose inner chunk (or whole object) is absent."""

    def object_path(self, k: int) -> str:
        return f"{self.path}/c/{k}" + "/0" * len(self.row_shape)


class ObjectReader:
    """Row reads through the shard index, one cached index per storage object."""

    def __init__(self, fs, layout: ObjectLayout):
        """`fs`: an fsspec file system, or a callable returning the current process's (storage.Root's)."""
        self._fs, self.layout = fs, layout
        self._codec = numcodecs.Blosc()
        self._indexes: dict[int, np.ndarray] = {}

    @property
    def fs(self):
        return self._fs() if callable(self._fs) else self._fs

    def _index(self, k: int) -> np.ndarray:
        if k not in self._indexes:
            path = self.layout.object_path(k)
            size = self.layout.rows_per_object * INDEX_ENTRY + CRC
            try:
                tail = self.fs.tail(path, size)
            except FileNotFoundError:  # zarr-python writes no object whose chunks all equal the fill value
                self._indexes[k] = np.full((self.layout.rows_per_object, 2), EMPTY, dtype="<u8")
            else:
                self._indexes[k] = decode_index(tail, self.layout.rows_per_object, path)
        return self._indexes[k]

    def read_rows(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows [start, stop) as one array; adjacent chunks come from one range read per object.

        Each chunk is decompressed straight into `out` (allocated if None; else C-contiguous,
        shape (stop - start, *row_shape), this dtype): no intermediate copy.
        """
        shape = (stop - start, *self.layout.row_shape)
        if out is None:
            out = np.empty(shape, dtype=self.layout.dtype)
        elif out.shape != shape or out.dtype != self.layout.dtype or not out.flags.c_contiguous:
            raise ValueError(
                f"out must be C-contiguous {shape} {self.layout.dtype}, got {out.shape} {out.dtype}"
            )
        row = start
        while row < stop:
            k, first = divmod(row, self.layout.rows_per_object)
            last = min(stop - row, self.layout.rows_per_object - first) + first
            index = self._index(k)[first:last]
            empty = (index == EMPTY).all(axis=1)
            if (index[~empty] == EMPTY).any():
                raise ValueError(f"{self.layout.object_path(k)}: corrupt shard index (half-empty entry)")
            for i in np.flatnonzero(empty):  # chunks equal to the fill value are not stored
                out[row - start + i] = self.layout.fill_value
            stored = index[~empty]
            if len(stored):  # one range read over the stored chunks (zarr-python need not keep them in order)
                begin, end = int(stored[:, 0].min()), int((stored[:, 0] + stored[:, 1]).max())
                blob = self.fs.cat_file(self.layout.object_path(k), start=begin, end=end)
            for i, (offset, nbytes) in enumerate(index):
                if empty[i]:
                    continue
                piece = blob[int(offset) - begin : int(offset + nbytes) - begin]
                dest = out[row - start + i]
                if not np.little_endian:  # stored little-endian; a big-endian host needs the swap
                    dest[...] = np.frombuffer(
                        self._codec.decode(piece), dtype=self.layout.dtype.newbyteorder("<")
                    ).reshape(self.layout.row_shape)
                else:
                    numcodecs.blosc.decompress(piece, dest)  # into place: no intermediate bytes object
            row += last - first
        return out
