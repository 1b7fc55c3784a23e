"""The artifact store interface shared by the local and S3 backends.

A store is a flat namespace of keys (``a/b/c.json``) under one root. Backends implement a few primitives (get,
conditional put, head, list, delete, touch, file upload/download, streaming read, listing blobs); this base class
builds on them:

- content-addressed blobs: ``blobs/sha256/<2 hex>/<sha256>``, uploaded once (dedup), never overwritten; a
  re-used blob has its last-modified time refreshed (`refresh`), so that `perp.registry.gc`, which deletes only
  unreferenced blobs older than a grace period, does not delete one that a registration in progress re-uses;
- verified downloads: the sha256 of what arrives is compared with the address, and a mismatch is an error
  (`StoreIntegrityError`), the partial file is removed, never silently used;
- conditional writes: ``if_none_match=True`` creates only if absent and ``if_match=ETAG`` replaces only the
  version that was read; a lost race is a `StoreConflict`. These back the registry's event log and stage pointers.

Keys are validated: relative, ``/``-separated, each segment ``[A-Za-z0-9_][A-Za-z0-9._-]*`` (so no ``..``, no
hidden or temporary names, no absolute keys), at most 1024 characters.
"""

from __future__ import annotations

import hashlib
import os
import re
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Optional

from perp.errors import PerpError

MAX_KEY_LENGTH = 1024
_SEGMENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
CHUNK = 8 * 1024 * 1024
BLOB_PREFIX = "blobs/sha256"


class StoreError(PerpError):
    """A store operation failed (bad key, missing bucket, unknown scheme...)."""


class StoreNotFound(StoreError):
    """The key does not exist."""


class StoreConflict(StoreError):
    """A conditional write lost: the object exists (If-None-Match) or changed since it was read (If-Match)."""


class StoreIntegrityError(StoreError):
    """Stored content does not match its recorded sha256."""


class StoreUnreachable(StoreError):
    """The backend cannot be reached, after retries."""


def validate_key(key: str) -> str:
    if not isinstance(key, str) or not key:
        raise StoreError("store key must be a non-empty string")
    if len(key) > MAX_KEY_LENGTH:
        raise StoreError(f"store key too long ({len(key)} > {MAX_KEY_LENGTH} characters)")
    if key.startswith("/") or "\\" in key:
        raise StoreError(f"store key '{key}' must be relative and use '/' separators")
    for segment in key.split("/"):
        if not _SEGMENT.match(segment):
            raise StoreError(f"store key '{key}': segment '{segment}' is not allowed "
                             "(letters, digits, '.', '_', '-'; not starting with '.' or '-'; no '..')")
    return key


def validate_sha256(digest: object) -> str:
    if not isinstance(digest, str) or not _SHA256.match(digest):
        raise StoreError(f"'{digest}' is not a sha256 hex digest")
    return digest


def blob_key(digest: str) -> str:
    validate_sha256(digest)
    return f"{BLOB_PREFIX}/{digest[:2]}/{digest}"


def blob_digest(key: str) -> Optional[str]:
    """The sha256 a blob key addresses, or None when `key` is not laid out as one (``blobs/sha256/ab/ab...``)."""
    parts = key.split("/")
    if len(parts) != 4 or "/".join(parts[:2]) != BLOB_PREFIX or not _SHA256.match(parts[3]) \
            or parts[2] != parts[3][:2]:
        return None
    return parts[3]


def md5_etag(data: bytes) -> str:
    return '"' + hashlib.md5(data).hexdigest() + '"'


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    last_modified: Optional[float] = None  # seconds since the epoch (the store's clock), when the backend knows


class BlobInfo(NamedTuple):
    """One stored blob, as `Store.list_blobs` yields it."""

    sha256: str
    size: int
    last_modified: float  # seconds since the epoch, the store's clock (S3: the server's)


@dataclass(frozen=True)
class StaleUpload:
    """What a killed upload left behind: a hidden temporary file (local) or an unfinished multipart upload (S3)."""

    name: str  # for messages: a path relative to the store, or "key (upload id)"
    size: Optional[int]  # bytes held, when the backend says without another request
    last_modified: float  # seconds since the epoch: when it was last written (S3: when the upload began)
    handle: Any = None  # what `remove_stale_upload` needs


@dataclass(frozen=True)
class BlobRef:
    sha256: str
    size: int
    uploaded: bool  # False when the store already held it


#: Held blobs up to this size are read back and hashed before a registration reuses them.
INTACT_READ_LIMIT = 16 * 1024 * 1024


class Store(ABC):
    """One store: a local directory or an S3 bucket/prefix."""

    uri: str

    # ---------------------------------------------------------------- backend primitives

    @abstractmethod
    def get_bytes(self, key: str) -> tuple[bytes, str]:
        """(content, etag). Raises StoreNotFound."""

    @abstractmethod
    def put_bytes(self, key: str, data: bytes, *, if_none_match: bool = False, if_match: Optional[str] = None) -> str:
        """Write atomically; returns the new etag. Raises StoreConflict when a condition fails."""

    @abstractmethod
    def head(self, key: str) -> Optional[ObjectInfo]:
        """The object's size and last-modified time (`ObjectInfo`), or None if absent."""

    @abstractmethod
    def list_keys(self, prefix: str) -> list[str]:
        """Every key under `prefix/` (recursively), sorted."""

    @abstractmethod
    def list_children(self, prefix: str) -> list[str]:
        """Names directly under `prefix/` (objects and 'directories'), sorted."""

    @abstractmethod
    def list_blobs(self) -> Iterator[BlobInfo]:
        """Every blob in the store as (sha256, size, last_modified), in no particular order. Keys under the blob
        prefix that are not laid out as blobs (and hidden temporary files) are not listed."""

    def principal(self) -> Optional[str]:
        """The identity the store authenticates this process as, where it has one (S3: the credentials' ARN);
        None for a local store."""
        return None

    def stale_uploads(self) -> Iterator[StaleUpload]:
        """Uploads of blobs that never completed (their writer was killed); none by default."""
        return iter(())

    def remove_stale_upload(self, upload: StaleUpload) -> None:
        """Remove what `stale_uploads` listed (absent already is not an error)."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove an object; removing one that is absent is not an error."""

    @abstractmethod
    def _touch(self, key: str) -> None:
        """Set an object's last-modified time to now, content unchanged. Raises StoreNotFound."""

    @abstractmethod
    def iter_bytes(self, key: str) -> Iterator[bytes]:
        """Stream an object's content in chunks. Raises StoreNotFound."""

    @abstractmethod
    def _upload_file(self, key: str, path: Path, sha256: str) -> None:
        """Store a file under `key`; the object appears whole or not at all."""

    @abstractmethod
    def _download_file(self, key: str, dest: Path) -> None:
        """Copy an object to `dest` (a temporary path the caller verifies). Raises StoreNotFound."""

    def describe(self) -> str:
        return self.uri

    def describe_key(self, key: str) -> str:
        """An object's address for messages (S3: with the endpoint after it, not inside it)."""
        return f"{self.uri}/{key}"

    def exists(self) -> bool:
        """False when the store itself is absent (a local root directory that does not exist, an S3 prefix with
        nothing under it), so a reader can refuse it rather than see an empty store."""
        return True

    # ---------------------------------------------------------------- content-addressed blobs

    def put_blob(self, path: str | Path, sha256: Optional[str] = None, *, refresh: bool = True) -> BlobRef:
        """Upload a file under its sha256 unless the store already holds it (same size); returns its ref.

        A blob already held is refreshed (its last-modified time set to now; on S3 a server-side copy onto itself)
        unless `refresh` is False: the caller knows it is referenced by a recorded version, so gc keeps it anyway.
        """
        from perp.io.hashing import cached_sha256

        path = Path(path)
        digest = validate_sha256(sha256) if sha256 else cached_sha256(path)
        size = path.stat().st_size
        key = blob_key(digest)
        if self._reuse(key, digest, size, refresh):
            return BlobRef(digest, size, uploaded=False)
        self._upload_file(key, path, digest)
        return BlobRef(digest, size, uploaded=True)

    def put_blob_bytes(self, data: bytes, *, refresh: bool = True) -> BlobRef:
        digest = hashlib.sha256(data).hexdigest()
        key = blob_key(digest)
        if self._reuse(key, digest, len(data), refresh):
            return BlobRef(digest, len(data), uploaded=False)
        self.put_bytes(key, data)
        return BlobRef(digest, len(data), uploaded=True)

    def _reuse(self, key: str, digest: str, size: int, refresh: bool) -> bool:
        """True when the store holds `key` intact with this size (refreshed if asked): no upload needed.

        A held blob that is not intact (altered, or rotted) is uploaded again over itself, so registering the
        good files repairs it instead of recording a new version on top of damaged content.
        """
        existing = self.head(key)
        if existing is None or existing.size != size:
            return False
        if not self._blob_intact(key, digest, size):
            return False
        if refresh:
            try:
                self._touch(key)
            except StoreNotFound:  # deleted (gc) since the head: upload it again
                return False
        return True

    def _blob_intact(self, key: str, digest: str, size: int) -> bool:
        """Whether a held blob still has its content. Small ones are read and hashed; backends check large ones
        cheaply (`_large_blob_intact`)."""
        if size <= INTACT_READ_LIMIT:
            try:
                data, _ = self.get_bytes(key)
            except StoreNotFound:
                return False
            return hashlib.sha256(data).hexdigest() == digest
        return self._large_blob_intact(key, digest)

    def _large_blob_intact(self, key: str, digest: str) -> bool:
        return True

    def delete_blob(self, digest: str) -> None:
        """Remove a blob (only `perp.registry.gc` does, for blobs no recorded version names)."""
        self.delete(blob_key(digest))

    def get_blob(self, digest: str, dest: str | Path) -> Path:
        """Download a blob to `dest`, verified against its sha256; a mismatch removes it and raises."""
        key = blob_key(digest)
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.part")
        try:
            for attempt in range(3):
                try:
                    self._download_file(key, tmp)
                    break
                except StoreConflict:  # replaced mid-download (a refresh copies it onto itself): same content
                    if attempt == 2:
                        raise
            actual = _sha256_path(tmp)
            if actual != digest:
                raise StoreIntegrityError(f"{self.describe_key(key)} is corrupt: its content has sha256 {actual}; "
                                          "refusing to use it")
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        return dest

    def get_blob_bytes(self, digest: str) -> bytes:
        key = blob_key(digest)
        data, _ = self.get_bytes(key)
        actual = hashlib.sha256(data).hexdigest()
        if actual != digest:
            raise StoreIntegrityError(f"{self.describe_key(key)} is corrupt: its content has sha256 {actual}; "
                                      "refusing to use it")
        return data

    def hash_object(self, key: str) -> tuple[str, int]:
        """(sha256, size) of an object's current content, streamed (nothing written locally)."""
        digest = hashlib.sha256()
        size = 0
        for chunk in self.iter_bytes(key):
            digest.update(chunk)
            size += len(chunk)
        return digest.hexdigest(), size


def _sha256_path(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
