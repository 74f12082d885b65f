"""Content-addressed storage of original image bytes: one file (or object) per SHA-256, written atomically.

`open_store` gives the local folder (`ImageStore`) or, for a URL such as `s3://bucket/images`, any
fsspec file system (`RemoteImageStore`), so API replicas and workers on several hosts share one store.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from iqa.settings import Settings

_SHA256 = re.compile(r"[0-9a-f]{64}")
# Temp files start with this prefix and never match _SHA256, so a crash leftover is never taken for an image.
TEMP_PREFIX = ".tmp-"


@dataclass(frozen=True)
class StoredImage:
    """Where `put` left the bytes; `created` is False when the same content was already stored."""

    sha256: str
    key: str
    path: Path | None  # the local file; None in a remote store
    created: bool


class ImageStore:
    """Files under `<root>/<sha[:2]>/<sha[2:4]>/<sha>`; the fan-out keeps folders small.

    The same bytes always land at the same path, so writes are idempotent and safe from several threads
    or processes: each writer fills its own temp file and renames it into place.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @staticmethod
    def sha256_of(data: bytes) -> str:
        """The hex SHA-256 of `data`, the address of its file."""
        return hashlib.sha256(data).hexdigest()

    @staticmethod
    def key_for(sha256: str) -> str:
        """The path relative to the root (the `images.storage_key` column); ValueError for a bad hash."""
        if not _SHA256.fullmatch(sha256):
            raise ValueError(f"not a lowercase hex SHA-256: {sha256!r}")
        return f"{sha256[:2]}/{sha256[2:4]}/{sha256}"

    def path_for(self, sha256: str) -> Path:
        """The file for `sha256` (validated first, so a crafted value cannot leave the root)."""
        return self.root / self.key_for(sha256)

    def exists(self, sha256: str) -> bool:
        """Whether the bytes for `sha256` are stored (temp files from a crash do not count)."""
        return self.path_for(sha256).is_file()

    def read(self, sha256: str) -> bytes:
        """The stored bytes; FileNotFoundError when they were never stored."""
        return self.path_for(sha256).read_bytes()

    def delete(self, sha256: str) -> bool:
        """Remove the bytes for `sha256`; False when they were not there (deleting twice is harmless)."""
        try:
            self.path_for(sha256).unlink()
        except FileNotFoundError:
            return False
        return True

    def copy_to(self, sha256: str, target: Path) -> None:
        """Put the bytes for `sha256` at `target` (a hard link where it can); FileNotFoundError if gone."""
        source = self.path_for(sha256)
        try:
            os.link(source, target)
        except FileNotFoundError:
            raise
        except OSError:  # another file system
            shutil.copyfile(source, target)

    def put(self, data: bytes, sha256: str | None = None) -> StoredImage:
        """Store `data` unless already there. `sha256`, when given, must be the caller's hash of `data`.

        Two concurrent puts of new content may both report `created=True`; the file is the same either way.
        """
        sha256 = self.sha256_of(data) if sha256 is None else sha256
        key = self.key_for(sha256)
        path = self.root / key
        if path.is_file():
            return StoredImage(sha256, key, path, created=False)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f"{TEMP_PREFIX}{secrets.token_hex(8)}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)
        return StoredImage(sha256, key, path, created=True)


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (POSIX); without it a power cut can lose a file already reported."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class RemoteImageStore(ImageStore):
    """Objects `<url>/<sha[:2]>/<sha[2:4]>/<sha>` on an fsspec file system (S3 through s3fs, GCS, ...).

    An object store's PUT is atomic (an object is there whole or not at all) and the same bytes always
    go to the same key, so writes need no temp names and are idempotent, from any number of hosts.
    """

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        import fsspec

        self.url = url.rstrip("/")
        self.fs, self.base = fsspec.core.url_to_fs(self.url, **(storage_options or {}))

    def _object(self, sha256: str) -> str:
        return f"{self.base.rstrip('/')}/{self.key_for(sha256)}"

    def path_for(self, sha256: str) -> Path:
        raise TypeError("a remote store has no local paths: use read or copy_to")

    def put(self, data: bytes, sha256: str | None = None) -> StoredImage:
        sha256 = self.sha256_of(data) if sha256 is None else sha256
        key, name = self.key_for(sha256), self._object(sha256)
        if self.fs.exists(name):
            return StoredImage(sha256, key, None, created=False)
        self.fs.pipe_file(name, data)
        return StoredImage(sha256, key, None, created=True)

    def exists(self, sha256: str) -> bool:
        return self.fs.exists(self._object(sha256))

    def read(self, sha256: str) -> bytes:
        return self.fs.cat_file(self._object(sha256))

    def delete(self, sha256: str) -> bool:
        name = self._object(sha256)
        if not self.fs.exists(name):
            return False
        self.fs.rm_file(name)
        return True

    def copy_to(self, sha256: str, target: Path) -> None:
        target.write_bytes(self.read(sha256))


def open_store(location: str | Path, storage_options: dict[str, Any] | None = None) -> ImageStore:
    """The store at `location`: a URL (`s3://bucket/images`) is remote, anything else a folder."""
    text = str(location)
    if "://" in text and not text.startswith("file://"):
        return RemoteImageStore(text, storage_options)
    return ImageStore(Path(text.removeprefix("file://")))


def service_store(settings: Settings) -> ImageStore:
    """The store the service's settings name (`EVOQ_IMAGE_STORE`, `EVOQ_IMAGE_STORE_OPTIONS`)."""
    return open_store(settings.image_store or settings.data_dir / "images", settings.image_store_options)
