"""S3 access through boto3, for any endpoint (AWS, MinIO, a moto server).

The standard credential chain applies. The endpoint is the given one, else ``AWS_ENDPOINT_URL_S3``, else
``AWS_ENDPOINT_URL``, else AWS: the same order as the registry's store (`s3_endpoint`). Downloads land in the local
cache once and are verified: against the `sha256` object metadata that perp's store writes, or else the MD5
ETag of a single-part upload. A mismatch is an error, never a silent load. A stamp next to each download records
what was verified (ETag, local size, mtime, sha256), so later resolves trust an unchanged copy without reading it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Optional

from perp.errors import PerpError
from perp.io.cache import cache_dir

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class S3Error(PerpError):
    """An S3 object is missing, unreachable or fails verification."""


class S3Unreachable(S3Error):
    """The endpoint did not answer (connection, timeout) after botocore's own retries: worth retrying later."""


def parse_s3_uri(uri: str) -> tuple[str, str]:
    if not uri.startswith("s3://"):
        raise S3Error(f"'{uri}' is not an s3:// URI")
    bucket, _, key = uri[len("s3://"):].partition("/")
    if not bucket:
        raise S3Error(f"'{uri}' names no bucket")
    return bucket, key


def s3_endpoint(explicit: Optional[str] = None) -> Optional[str]:
    """The S3 endpoint every perp client uses: `explicit`, else ``AWS_ENDPOINT_URL_S3``, else
    ``AWS_ENDPOINT_URL``, else None (AWS). One rule, so model downloads and the registry never diverge."""
    return explicit or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def s3_client(endpoint_url: Optional[str] = None, max_attempts: int = 5) -> Any:
    import boto3
    from botocore.config import Config

    config = Config(retries={"total_max_attempts": max_attempts, "mode": "adaptive"}, connect_timeout=5,
                    read_timeout=60)
    return boto3.client("s3", endpoint_url=s3_endpoint(endpoint_url), config=config)


def _endpoint(client: Any) -> str:
    return str(getattr(client.meta, "endpoint_url", "aws"))


def _call(client: Any, operation: str, **kwargs: Any) -> Any:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return getattr(client, operation)(**kwargs)
    except ClientError as error:
        code = error.response.get("Error", {}).get("Code", "?")
        where = f"s3://{kwargs.get('Bucket', '')}/{kwargs.get('Key', kwargs.get('Prefix', ''))}"
        kind = S3Unreachable if _transient(error) else S3Error
        raise kind(f"S3 {operation} on {where} failed: {code}") from None
    except BotoCoreError as error:
        raise S3Unreachable(f"S3 endpoint {_endpoint(client)} unreachable: {error}") from None


_TRANSIENT_CODES = frozenset({"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
                              "InternalError", "ServiceUnavailable", "503", "500", "502", "504"})


def _transient(error: Exception) -> bool:
    """A ClientError a later attempt can outlast: throttling, timeouts, the server's own 5xx."""
    response = getattr(error, "response", {}) or {}
    status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
    return response.get("Error", {}).get("Code") in _TRANSIENT_CODES or (isinstance(status, int) and status >= 500)


def _list_keys(client: Any, bucket: str, prefix: str) -> dict[str, dict[str, Any]]:
    """Every key under `prefix`, with what the listing says of it as `head_object` would (ETag, ContentLength)."""
    keys: dict[str, dict[str, Any]] = {}
    token: Optional[str] = None
    while True:
        kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix}
        if token:
            kwargs["ContinuationToken"] = token
        page = _call(client, "list_objects_v2", **kwargs)
        keys.update((item["Key"], {"ETag": item.get("ETag", ""), "ContentLength": int(item.get("Size", 0))})
                    for item in page.get("Contents", []))
        if not page.get("IsTruncated"):
            return keys
        token = page["NextContinuationToken"]


def _verify(path: Path, head: dict[str, Any], uri: str) -> str:
    """Read `path` once and check it against the object's `sha256` metadata, else its single-part MD5 ETag;
    returns its sha256. MD5 is computed only when it is what gets compared (no sha256 metadata, and an ETag
    without the "-N" of a multipart upload, which is not an MD5 of the content)."""
    expected_sha = head.get("Metadata", {}).get("sha256")
    etag = head.get("ETag", "").strip('"')
    check_md5 = not expected_sha and bool(etag) and "-" not in etag
    sha = hashlib.sha256()
    md5 = hashlib.md5() if check_md5 else None
    with open(path, "rb") as handle:
        while chunk := handle.read(8 << 20):
            sha.update(chunk)
            if md5 is not None:
                md5.update(chunk)
    if expected_sha and expected_sha != sha.hexdigest():
        raise S3Error(f"checksum mismatch for {uri}: sha256 {sha.hexdigest()} != recorded {expected_sha}")
    if md5 is not None and etag != md5.hexdigest():
        raise S3Error(f"checksum mismatch for {uri}: md5 {md5.hexdigest()} != ETag {etag}")
    return sha.hexdigest()


def _stamp_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".sha256")


def _write_stamp(dest: Path, head: dict[str, Any], digest: str) -> os.stat_result:
    """Record what was verified: the object's ETag and the local file's size, mtime and sha256."""
    stat = dest.stat()
    stamp = _stamp_path(dest)
    record = {"etag": head.get("ETag", ""), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
    tmp = stamp.with_name(f".{stamp.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_text(json.dumps(record, sort_keys=True))
        os.replace(tmp, stamp)
    finally:
        tmp.unlink(missing_ok=True)
    return stat


def _stamped_digest(dest: Path, head: dict[str, Any]) -> Optional[str]:
    """The sha256 the stamp recorded when `dest` was verified, if the stamp still describes both the object (same
    ETag, size and sha256 metadata) and the local file (same size and mtime): then the file needs no re-read."""
    try:
        record = json.loads(_stamp_path(dest).read_text())
        stat = dest.stat()
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict):
        return None
    digest = record.get("sha256")
    expected_sha = head.get("Metadata", {}).get("sha256")
    if (not isinstance(digest, str) or not _SHA256.match(digest)
            or record.get("etag") != head.get("ETag", "")
            or record.get("size") != stat.st_size or record.get("mtime_ns") != stat.st_mtime_ns
            or head.get("ContentLength", stat.st_size) != stat.st_size
            or (expected_sha and expected_sha != digest)):
        return None
    return digest


def _legacy_stamp_matches(dest: Path, head: dict[str, Any]) -> bool:
    """A stamp of an older perp ("ETAG SIZE"): it records no mtime or digest, so the file is verified once more."""
    try:
        return _stamp_path(dest).read_text().split() == [head.get("ETag", ""), str(dest.stat().st_size)]
    except OSError:
        return False


def download_object(client: Any, bucket: str, key: str, dest: Path) -> str:
    """Download one object to `dest` atomically and verify it; returns its sha256.

    A cached copy whose stamp still matches (object ETag and size; local size and mtime) is trusted without
    reading it again; one changed locally since (size or mtime) is downloaded and verified again. The verified
    sha256 also seeds `perp.io.hashing.cached_sha256`, so the model content hash does not re-read the file."""
    from perp.io.hashing import lookup_sha256, seed_sha256

    uri = f"s3://{bucket}/{key}"
    head = _call(client, "head_object", Bucket=bucket, Key=key)
    if dest.is_file():
        digest = _stamped_digest(dest, head)
        if digest is not None:
            if lookup_sha256(dest) != digest:
                seed_sha256(dest, digest)
            return digest
        if _legacy_stamp_matches(dest, head):
            try:
                digest = _verify(dest, head, uri)
            except S3Error:
                digest = None  # the cached copy is damaged: download it again below
            if digest is not None:
                seed_sha256(dest, digest, _write_stamp(dest, head, digest))
                return digest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.part")
    try:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            client.download_file(bucket, key, str(tmp))
        except (ClientError, BotoCoreError) as error:
            kind = S3Unreachable if isinstance(error, BotoCoreError) or _transient(error) else S3Error
            raise kind(f"download of {uri} from {_endpoint(client)} failed: {error}") from None
        digest = _verify(tmp, head, uri)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    seed_sha256(dest, digest, _write_stamp(dest, head, digest))
    return digest


def _inside(root: Path, key: str, uri: str) -> Path:
    """The cache path of an S3 key; keys that would escape the cache (`..`, absolute) are refused."""
    if key.startswith("/") or "\\" in key or any(part in ("", ".", "..") for part in key.rstrip("/").split("/")):
        raise S3Error(f"refusing S3 key '{key}' under {uri}: empty, '.', '..' or absolute path segments")
    dest = root / key
    if not dest.resolve().is_relative_to(root.resolve()):
        raise S3Error(f"refusing S3 key '{key}' under {uri}: it resolves outside the download cache")
    return dest


def fetch_s3(uri: str, client: Any = None) -> Path:
    """Mirror an object, or every object under a prefix, into the local cache; returns the local path."""
    bucket, key = parse_s3_uri(uri)
    if "/" in bucket or bucket in (".", ".."):
        raise S3Error(f"'{uri}' names an invalid bucket")
    client = client or s3_client()
    root = cache_dir("s3", bucket)
    prefix = key.rstrip("/")
    keys = _list_keys(client, bucket, prefix)
    if prefix in keys:  # a single object
        dest = _inside(root, prefix, uri)
        _require_cache_space(uri, {dest: keys[prefix]})
        download_object(client, bucket, prefix, dest)
        return dest
    children = [k for k in keys if k.startswith(prefix + "/") and not k.endswith("/")]
    if not children:
        raise S3Error(f"nothing at {uri} (endpoint {_endpoint(client)})")
    destinations = [(child, _inside(root, child, uri)) for child in children]  # all checked before any download
    _require_cache_space(uri, {dest: keys[child] for child, dest in destinations})
    for child, dest in destinations:
        download_object(client, bucket, child, dest)
    return _inside(root, prefix, uri)


def _require_cache_space(uri: str, listed: dict[Path, dict[str, Any]]) -> None:
    """The objects the cache does not hold as they are now (by their stamp: same ETag and size) must fit in its
    free space: a 140 GB checkpoint that fills the disk halfway leaves a broken cache and nothing loaded."""
    from perp.io.atomic import require_free_space

    missing = sum(head["ContentLength"] for dest, head in listed.items() if _stamped_digest(dest, head) is None)
    if missing:
        require_free_space(next(iter(listed)), missing, "the download cache", f"downloading {uri}",
                           hint="free some space or point PERP_CACHE at a bigger disk")


def clear_cached(uri: str) -> None:
    bucket, key = parse_s3_uri(uri)
    local = cache_dir("s3", bucket) / key.rstrip("/")
    if local.is_file():  # a single object: the file and its stamp
        local.unlink(missing_ok=True)
        _stamp_path(local).unlink(missing_ok=True)
    else:
        shutil.rmtree(local, ignore_errors=True)
