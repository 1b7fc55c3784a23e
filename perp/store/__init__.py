"""Artifact stores: a local directory (the embedded default) or S3 (AWS, MinIO, a moto server).

    store = open_store("./perp-store")            # or "file:///abs/path", "s3://bucket/prefix"
    ref = store.put_blob("model.safetensors")     # content-addressed, deduplicated
    store.get_blob(ref.sha256, "out/model.safetensors")   # verified; a mismatch is an error

See `perp.store.base` for the interface and its guarantees, `perp.store.sparse_format` for the compact sparse
checkpoint format the registry stores pruned weights in.
"""

from __future__ import annotations

from typing import Any

from perp.store.base import (
    BlobRef,
    ObjectInfo,
    Store,
    StoreConflict,
    StoreError,
    StoreIntegrityError,
    StoreNotFound,
    StoreUnreachable,
    blob_key,
    validate_key,
)


def open_store(uri: str, **options: Any) -> Store:
    """Open a store from its URI: a local path, ``file:///abs/path`` or ``s3://bucket[/prefix]``.

    `options` go to the backend: for S3, `endpoint_url`, `max_attempts`, `multipart_threshold`,
    `multipart_chunksize`, `max_concurrency`. Nothing is created or contacted until the first operation.
    """
    if not isinstance(uri, str) or not uri.strip():
        raise StoreError("store URI is empty (allowed: s3://bucket/prefix, file:///path, or a local path)")
    uri = uri.strip()
    if uri.startswith("s3://"):
        from perp.store.s3 import S3Store

        return S3Store(uri, **options)
    if "://" in uri:
        scheme = uri.split("://", 1)[0]
        if scheme != "file":
            raise StoreError(f"unknown store scheme '{scheme}://' in '{_redact(uri)}' "
                             "(allowed: s3://, file://, or a local path)")
        uri = uri[len("file://"):]
        if not uri.startswith("/"):
            raise StoreError("file:// store URIs must be absolute: file:///path/to/store")
    if options:
        raise StoreError(f"options {sorted(options)} do not apply to a local store")
    from perp.store.local import LocalStore

    return LocalStore(uri)


def _redact(uri: str) -> str:
    from perp.store.s3 import redact_url

    return redact_url(uri)


__all__ = [
    "BlobRef", "ObjectInfo", "Store", "StoreConflict", "StoreError", "StoreIntegrityError", "StoreNotFound",
    "StoreUnreachable", "blob_key", "open_store", "validate_key",
]
