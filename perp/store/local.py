"""The local-directory store: the embedded default.

Every write goes to a hidden temporary file in the target directory, is fsynced, then renamed into place, so an
object appears whole or not at all. Conditional writes: create-if-absent is an atomic ``link()`` (which fails if
the name exists); replace-if-unchanged holds an exclusive ``flock`` on a hidden per-key lock file while it
compares and renames. Hidden names never collide with keys (keys cannot start with '.') and are never listed.
POSIX only for conditional replaces (flock); use a local disk, not NFS, for concurrent writers.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator, Optional

from perp.store.base import (
    BLOB_PREFIX,
    CHUNK,
    BlobInfo,
    ObjectInfo,
    StaleUpload,
    Store,
    StoreConflict,
    StoreError,
    StoreNotFound,
    blob_digest,
    md5_etag,
    validate_key,
)


class LocalStore(Store):
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().absolute()
        self.uri = str(self.root)
        if self.root.exists() and not self.root.is_dir():
            raise StoreError(f"store '{self.root}' exists and is not a directory")

    def exists(self) -> bool:
        return self.root.is_dir()

    def _path(self, key: str) -> Path:
        return self.root / validate_key(key)

    def _prefix_dir(self, prefix: str) -> Path:
        return self.root / validate_key(prefix) if prefix else self.root

    # ---------------------------------------------------------------- primitives

    def get_bytes(self, key: str) -> tuple[bytes, str]:
        path = self._path(key)
        try:
            data = path.read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise StoreNotFound(f"{self.uri}/{key} does not exist") from None
        return data, md5_etag(data)

    def put_bytes(self, key: str, data: bytes, *, if_none_match: bool = False, if_match: Optional[str] = None) -> str:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._write_tmp(path, data)
        try:
            if if_none_match:
                try:
                    os.link(tmp, path)  # atomic create-if-absent
                except FileExistsError:
                    raise StoreConflict(f"{self.uri}/{key} already exists") from None
                except OSError:  # a filesystem without hard links: check and rename under the key's lock
                    with self._lock(path):
                        if path.exists():
                            raise StoreConflict(f"{self.uri}/{key} already exists") from None
                        os.replace(tmp, path)
            elif if_match is not None:
                with self._lock(path):
                    try:
                        current = md5_etag(path.read_bytes())
                    except FileNotFoundError:
                        raise StoreConflict(f"{self.uri}/{key} does not exist (expected etag {if_match})") from None
                    if current != if_match:
                        raise StoreConflict(f"{self.uri}/{key} changed since it was read")
                    os.replace(tmp, path)
            else:
                os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_dir(path.parent)
        return md5_etag(data)

    def head(self, key: str) -> Optional[ObjectInfo]:
        path = self._path(key)
        try:
            if not path.is_file():
                return None
            stat = path.stat()
            return ObjectInfo(key, stat.st_size, stat.st_mtime)
        except FileNotFoundError:
            return None

    def list_keys(self, prefix: str) -> list[str]:
        base = self._prefix_dir(prefix)
        if not base.is_dir():
            return []
        keys = []
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in filenames:
                if not name.startswith("."):
                    keys.append((Path(dirpath) / name).relative_to(self.root).as_posix())
        return sorted(keys)

    def list_children(self, prefix: str) -> list[str]:
        base = self._prefix_dir(prefix)
        if not base.is_dir():
            return []
        return sorted(name for name in os.listdir(base) if not name.startswith("."))

    def list_blobs(self) -> Iterator[BlobInfo]:
        base = self._prefix_dir(BLOB_PREFIX)
        if not base.is_dir():
            return
        for shard in sorted(os.listdir(base)):
            if shard.startswith(".") or not (base / shard).is_dir():
                continue
            for name in sorted(os.listdir(base / shard)):
                digest = blob_digest(f"{BLOB_PREFIX}/{shard}/{name}")
                if digest is None:
                    continue  # hidden temporary files of uploads in flight, or not a blob
                try:
                    stat = (base / shard / name).stat()
                except FileNotFoundError:  # deleted meanwhile
                    continue
                yield BlobInfo(digest, stat.st_size, stat.st_mtime)

    def _large_blob_intact(self, key: str, digest: str) -> bool:
        """Hashed through the hash cache: free while the file is untouched since it was last hashed (stored,
        verified), a full read once its size or mtime changed (written over)."""
        from perp.io.hashing import cached_sha256

        try:
            return cached_sha256(self._path(key)) == digest
        except FileNotFoundError:
            return False

    def stale_uploads(self) -> Iterator[StaleUpload]:
        """The hidden `.tmp-*` files of writes (blob uploads, events, pointers): a complete write renames its file,
        a killed one leaves it."""
        if not self.root.is_dir():
            return
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames.sort()
            for name in sorted(filenames):
                if not name.startswith(".tmp-"):
                    continue
                path = Path(dirpath) / name
                try:
                    stat = path.stat()
                except FileNotFoundError:  # its write just finished
                    continue
                yield StaleUpload(path.relative_to(self.root).as_posix(), stat.st_size, stat.st_mtime, path)

    def remove_stale_upload(self, upload: StaleUpload) -> None:
        Path(upload.handle).unlink(missing_ok=True)

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink()
        except FileNotFoundError:
            return
        except IsADirectoryError:
            raise StoreError(f"{self.uri}/{key} is a directory, not an object") from None
        _fsync_dir(path.parent)

    def _touch(self, key: str) -> None:
        from perp.io.hashing import lookup_sha256, seed_sha256

        path = self._path(key)
        digest = lookup_sha256(path) if path.is_file() else None  # a new mtime would orphan the hash cache's entry
        try:
            os.utime(path)
            if digest is not None:
                seed_sha256(path, digest)
        except FileNotFoundError:
            raise StoreNotFound(f"{self.uri}/{key} does not exist") from None
        except OSError as error:
            raise StoreError(f"cannot refresh {self.uri}/{key}: {error.strerror or error}") from None

    def iter_bytes(self, key: str) -> Iterator[bytes]:
        path = self._path(key)
        try:
            handle = open(path, "rb")
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise StoreNotFound(f"{self.uri}/{key} does not exist") from None
        with handle:
            while chunk := handle.read(CHUNK):
                yield chunk

    def _upload_file(self, key: str, path: Path, sha256: str) -> None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".tmp-{uuid.uuid4().hex}")
        try:
            with open(path, "rb") as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, CHUNK)
                dst.flush()
                os.fsync(dst.fileno())
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_dir(target.parent)
        from perp.io.hashing import seed_sha256

        seed_sha256(target, sha256)  # the bytes just copied from a file of this digest: reuse checks need no read

    def _download_file(self, key: str, dest: Path) -> None:
        source = self._path(key)
        if not source.is_file():
            raise StoreNotFound(f"{self.uri}/{key} does not exist")
        shutil.copyfile(source, dest)

    # ---------------------------------------------------------------- helpers

    @staticmethod
    def _write_tmp(path: Path, data: bytes) -> Path:
        tmp = path.with_name(f".tmp-{uuid.uuid4().hex}")
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        return tmp

    @staticmethod
    @contextlib.contextmanager
    def _lock(path: Path) -> Iterator[None]:
        import fcntl

        with open(path.with_name(f".lock-{path.name}"), "a+b") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
