"""Cache roots: a local folder or any fsspec URL (s3://, gs://, memory://).

Local roots commit a shard by renaming a finished staging folder into place,
which is atomic on POSIX file systems. Object stores have no rename, so there
the shard's files are written in place and `commit.json` is written last: a
shard without it does not exist for any reader. Cost: on object stores a crashed
writer leaves orphaned files, which the next writer of that shard deletes.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import uuid
from typing import Any

import fsspec

from .errors import UnsafeNameError

SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


def check_safe_name(name: str, what: str) -> str:
    """Names taken from data (shard names) become path parts: refuse anything but a plain name."""
    if not SAFE_NAME.match(name) or ".." in name:
        raise UnsafeNameError(
            f"{what} {name!r} is not a safe path component (letters, digits, '.', '_', '-'; no '..')"
        )
    return name


class Root:
    """A folder on some fsspec file system; every path below it is joined, never taken raw."""

    def __init__(self, url: str | os.PathLike[str], storage_options: dict[str, Any] | None = None):
        url = os.fspath(url)
        self.url = url.rstrip("/") or url
        options = dict(storage_options or {})
        if "://" not in url:
            self._fs = fsspec.filesystem("file")
            self.path = os.path.abspath(url)
        else:
            self._fs, self.path = fsspec.core.url_to_fs(url, **options)
            self.path = self.path.rstrip("/")
        self._pid = os.getpid()
        self.storage_options = options
        protocols = self._fs.protocol if isinstance(self._fs.protocol, tuple) else (self._fs.protocol,)
        self.is_local = "file" in protocols or "local" in protocols

    @property
    def fs(self):
        return self.filesystem()

    def filesystem(self):
        """This process's file system: a forked child (DataLoader worker) makes its own, because
        async ones (s3fs, gcsfs) hold the parent's event loop and refuse to run after a fork."""
        if self._pid != os.getpid():
            if self.is_local:
                self._fs = fsspec.filesystem("file")
            else:
                self._fs = fsspec.core.url_to_fs(self.url, **self.storage_options)[0]
            self._pid = os.getpid()
        return self._fs

    def join(self, *parts: str) -> str:
        for part in parts:
            if part.startswith("/") or ".." in part.split("/"):
                raise UnsafeNameError(f"refusing path part {part!r} under {self.url}")
        return posixpath.join(self.path, *parts)

    def url_of(self, *parts: str) -> str:
        """A full URL (with protocol) for zarr stores and messages."""
        path = self.join(*parts)
        if self.is_local:
            return path
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        return f"{protocol}://{path}"

    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self.join(*parts))

    def read_json(self, *parts: str) -> Any:
        with self.fs.open(self.join(*parts), "r") as f:
            return json.load(f)

    def write_json(self, data: Any, *parts: str) -> None:
        """Write JSON so that readers see the old or the new file, never half of one."""
        path = self.join(*parts)
        text = json.dumps(data, indent=2, sort_keys=True)
        if self.is_local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
            with open(tmp, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        else:  # object stores replace a key atomically
            with self.fs.open(path, "w") as f:
                f.write(text)

    def listdir(self, *parts: str) -> list[str]:
        """Names directly below a folder; [] if it does not exist."""
        path = self.join(*parts)
        try:
            entries = self.fs.ls(path, detail=False)
        except FileNotFoundError:
            return []
        return sorted(posixpath.basename(e.rstrip("/")) for e in entries)

    def rm(self, *parts: str) -> None:
        path = self.join(*parts)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    def size(self, *parts: str) -> int:
        """Total bytes of all files below a folder."""
        path = self.join(*parts)
        return int(sum(info["size"] for info in self.fs.find(path, detail=True).values()))

    def zarr_store(self, *parts: str, read_only: bool = False):
        import zarr

        if self.is_local:
            return zarr.storage.LocalStore(self.join(*parts), read_only=read_only)
        return zarr.storage.FsspecStore.from_url(
            self.url_of(*parts), storage_options=self.storage_options or None, read_only=read_only
        )

    def __repr__(self) -> str:
        return f"Root({self.url!r})"


def staging_name(shard: str) -> str:
    return f"{shard}.{uuid.uuid4().hex[:12]}"


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rename_durably(src: str, dst: str) -> None:
    """Rename a finished local folder into place, crash-safe: every file and folder below `src` is on
    disk before the rename makes it visible, and the rename itself is made durable. OSError if `dst` exists."""
    for folder, _, files in os.walk(src):
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(folder)
    os.rename(src, dst)
    fsync_dir(os.path.dirname(dst))
