"""The S3 store, through boto3, against any endpoint: AWS, MinIO, Ceph, a moto server.

- Credentials: the standard boto3 chain (environment, ~/.aws, SSO, instance role). They are never logged or written.
- Endpoint: `endpoint_url`, else ``AWS_ENDPOINT_URL_S3``, else ``AWS_ENDPOINT_URL``, else AWS. Custom endpoints use
  path-style addressing (botocore's default for them).
- Retries: botocore's adaptive mode (exponential backoff with jitter plus client-side rate limiting) retries
  throttling (SlowDown, 503), 5xx and connection errors up to `max_attempts` (``PERP_S3_MAX_ATTEMPTS``, default
  5). An endpoint still unreachable after that is a `StoreUnreachable` naming the endpoint.
- Uploads: a single PUT, or a multipart upload above `multipart_threshold` (boto3 TransferConfig, parallel parts;
  64 MiB parts, or ``PERP_S3_MULTIPART_MB``).
  S3 publishes an object only when its upload completes, so a killed upload leaves nothing visible. Blobs carry
  their sha256 as object metadata, which `perp.io.s3.fetch_s3` also verifies.
- Conditional writes: ``If-None-Match: *`` and ``If-Match: ETAG`` (S3 since 2024; MinIO and moto support them).
  412 PreconditionFailed and 409 ConditionalRequestConflict both become `StoreConflict`.
- Garbage collection (`perp.registry.gc`): a re-used blob is refreshed by a server-side copy onto itself (S3's
  only way to move Last-Modified, which gc's grace period reads); a ranged download racing that copy gets 412 and
  starts over. gc deletes with DeleteObject: in a versioned bucket that adds a delete marker and the bytes stay
  until a lifecycle rule expires noncurrent versions. The parts of a killed multipart upload are no object; gc
  lists the unfinished uploads under blobs/ and aborts those past its grace period (a bucket lifecycle rule,
  AbortIncompleteMultipartUpload, is a good backstop).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Iterator, Optional
from urllib.parse import urlsplit, urlunsplit

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
    StoreUnreachable,
    blob_digest,
    validate_key,
)

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
DEFAULT_MULTIPART_THRESHOLD = 64 * 1024 * 1024
DEFAULT_MULTIPART_CHUNKSIZE = 64 * 1024 * 1024


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        return int(raw)
    except ValueError:
        raise StoreError(f"{name} must be an integer, got '{raw}'") from None


def redact_url(url: Optional[str]) -> str:
    """An endpoint URL without any user:password@ part, for messages."""
    if not url:
        return "AWS (default endpoint)"
    parts = urlsplit(url)
    if parts.username or parts.password:
        host = parts.hostname or ""
        if parts.port:
            host += f":{parts.port}"
        return urlunsplit((parts.scheme, host, parts.path, "", ""))
    return url


class S3Store(Store):
    def __init__(self, uri: str, endpoint_url: Optional[str] = None, max_attempts: Optional[int] = None,
                 multipart_threshold: Optional[int] = None, multipart_chunksize: Optional[int] = None,
                 max_concurrency: int = 4) -> None:
        rest = uri[len("s3://"):]
        bucket, _, prefix = rest.partition("/")
        if not _BUCKET.match(bucket or "") or ".." in bucket:
            raise StoreError(f"'{uri}': '{bucket}' is not a valid S3 bucket name")
        prefix = prefix.strip("/")
        if prefix:
            validate_key(prefix)
        self.bucket = bucket
        self.prefix = prefix
        self.uri = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
        from perp.io.s3 import s3_endpoint

        self.endpoint_url = s3_endpoint(endpoint_url)
        if max_attempts is None:
            max_attempts = _env_int("PERP_S3_MAX_ATTEMPTS", 5)
        self.max_attempts = max(1, max_attempts)
        part_mb = _env_int("PERP_S3_MULTIPART_MB", 0)
        default_part = part_mb * 1024 * 1024 if part_mb else None
        multipart_threshold = multipart_threshold or default_part or DEFAULT_MULTIPART_THRESHOLD
        multipart_chunksize = multipart_chunksize or default_part or DEFAULT_MULTIPART_CHUNKSIZE
        if multipart_chunksize < 5 * 1024 * 1024:
            raise StoreError("S3 multipart parts must be at least 5 MiB (PERP_S3_MULTIPART_MB >= 5)")
        self._transfer_args = dict(multipart_threshold=multipart_threshold, multipart_chunksize=multipart_chunksize,
                                   max_concurrency=max_concurrency)
        self._client: Any = None

    # ---------------------------------------------------------------- client and errors

    @property
    def client(self) -> Any:
        if self._client is None:
            from perp.io.s3 import s3_client

            # s3_client counts total requests (botocore's total_max_attempts), first call included.
            self._client = s3_client(self.endpoint_url, max_attempts=self.max_attempts)
        return self._client

    @property
    def endpoint(self) -> str:
        return redact_url(self.endpoint_url)

    def describe(self) -> str:
        return f"{self.uri} (endpoint {self.endpoint})" if self.endpoint_url else self.uri

    def describe_key(self, key: str) -> str:
        return f"{self.uri}/{key} (endpoint {self.endpoint})" if self.endpoint_url else f"{self.uri}/{key}"

    def _transfer_config(self) -> Any:
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(**self._transfer_args)

    def _full(self, key: str) -> str:
        validate_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _error(self, error: Exception, operation: str, key: str) -> StoreError:
        """Translate a botocore/boto3 error into a one-line StoreError (never including credentials)."""
        from botocore.exceptions import (
            ClientError,
            ConnectionClosedError,
            ConnectTimeoutError,
            EndpointConnectionError,
            NoCredentialsError,
            PartialCredentialsError,
            ReadTimeoutError,
        )

        where = f"s3://{self.bucket}/{self._full(key) if key else self.prefix}"
        if isinstance(error, ClientError):
            info = error.response.get("Error", {})
            code = str(info.get("Code", "?"))
            status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("NoSuchKey", "404", "NotFound"):
                return StoreNotFound(f"{where} does not exist")
            if code in ("PreconditionFailed", "412", "ConditionalRequestConflict") or status in (409, 412):
                return StoreConflict(f"{operation} on {where} lost a concurrent write ({code})")
            if code == "NoSuchBucket":
                return StoreError(f"bucket '{self.bucket}' does not exist at endpoint {self.endpoint}")
            if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken"):
                return StoreError(f"{operation} on {where} denied ({code}): check the AWS credentials and "
                                  f"permissions for endpoint {self.endpoint}")
            if isinstance(status, int) and status >= 500 or code in ("SlowDown", "Throttling", "ThrottlingException"):
                return StoreUnreachable(f"{operation} on {where} failed after {self.max_attempts} attempts: "
                                        f"endpoint {self.endpoint} answered {status} {code}")
            return StoreError(f"{operation} on {where} failed: {code} {info.get('Message', '')}".rstrip())
        if isinstance(error, (NoCredentialsError, PartialCredentialsError)):
            return StoreError("no usable AWS credentials (standard chain: environment, ~/.aws, SSO, instance role)")
        if isinstance(error, (EndpointConnectionError, ConnectTimeoutError, ConnectionClosedError, ReadTimeoutError)):
            return StoreUnreachable(f"S3 endpoint {self.endpoint} unreachable after {self.max_attempts} attempts "
                                    f"({type(error).__name__}) during {operation} on {where}")
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        if "Could not connect" in message or "Connect timeout" in message:
            return StoreUnreachable(f"S3 endpoint {self.endpoint} unreachable after {self.max_attempts} attempts "
                                    f"during {operation} on {where}")
        for marker in ("PreconditionFailed", "(412)", "ConditionalRequestConflict"):
            if marker in message:
                return StoreConflict(f"{operation} on {where} lost a concurrent write")
        return StoreError(f"{operation} on {where} failed: {message}")

    def _call(self, operation: str, key: str, **kwargs: Any) -> Any:
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return getattr(self.client, operation)(Bucket=self.bucket, **kwargs)
        except (ClientError, BotoCoreError, Boto3Error) as error:
            raise self._error(error, operation, key) from None

    # ---------------------------------------------------------------- primitives

    def get_bytes(self, key: str) -> tuple[bytes, str]:
        response = self._call("get_object", key, Key=self._full(key))
        try:
            data = response["Body"].read()
        except Exception as error:  # a connection dropped mid-body
            raise self._error(error, "get_object", key) from None
        return data, response.get("ETag", "")

    def put_bytes(self, key: str, data: bytes, *, if_none_match: bool = False, if_match: Optional[str] = None) -> str:
        kwargs: dict[str, Any] = {"Key": self._full(key), "Body": data}
        if if_none_match:
            kwargs["IfNoneMatch"] = "*"
        elif if_match is not None:
            kwargs["IfMatch"] = if_match
        try:
            response = self._call("put_object", key, **kwargs)
        except StoreNotFound:  # S3 answers If-Match on a missing key with 404
            raise StoreConflict(f"s3://{self.bucket}/{self._full(key)} does not exist (expected etag {if_match})") \
                from None
        return response.get("ETag", "")

    def head(self, key: str) -> Optional[ObjectInfo]:
        try:
            response = self._call("head_object", key, Key=self._full(key))
        except StoreNotFound:
            return None
        modified = response.get("LastModified")
        return ObjectInfo(key, int(response.get("ContentLength", 0)), modified.timestamp() if modified else None)

    def _paginate(self, prefix: str, delimiter: Optional[str] = None) -> Iterator[dict[str, Any]]:
        full = (self._full(prefix) + "/") if prefix else (self.prefix + "/" if self.prefix else "")
        token: Optional[str] = None
        while True:
            kwargs: dict[str, Any] = {"Prefix": full}
            if delimiter:
                kwargs["Delimiter"] = delimiter
            if token:
                kwargs["ContinuationToken"] = token
            page = self._call("list_objects_v2", prefix, **kwargs)
            yield page
            if not page.get("IsTruncated"):
                return
            token = page["NextContinuationToken"]

    def _relative(self, full_key: str) -> str:
        return full_key[len(self.prefix) + 1:] if self.prefix else full_key

    def list_keys(self, prefix: str) -> list[str]:
        keys: list[str] = []
        for page in self._paginate(prefix):
            keys.extend(self._relative(item["Key"]) for item in page.get("Contents", []))
        return sorted(keys)

    def list_children(self, prefix: str) -> list[str]:
        names: set[str] = set()
        base = len(prefix) + 1 if prefix else 0
        for page in self._paginate(prefix, delimiter="/"):
            for item in page.get("Contents", []):
                names.add(self._relative(item["Key"])[base:])
            for common in page.get("CommonPrefixes", []):
                names.add(self._relative(common["Prefix"]).rstrip("/")[base:])
        return sorted(n for n in names if n)

    def list_blobs(self) -> Iterator[BlobInfo]:
        for page in self._paginate(BLOB_PREFIX):  # list_objects_v2, 1000 keys a page
            for item in page.get("Contents", []):
                digest = blob_digest(self._relative(item["Key"]))
                if digest is not None:
                    yield BlobInfo(digest, int(item["Size"]), item["LastModified"].timestamp())

    def _large_blob_intact(self, key: str, digest: str) -> bool:
        """The sha256 perp recorded in the object's metadata when it uploaded it; an object written over by
        anything else (without that metadata, or with another digest) is uploaded again."""
        try:
            response = self._call("head_object", key, Key=self._full(key))
        except StoreNotFound:
            return False
        return (response.get("Metadata") or {}).get("sha256") == digest

    def principal(self) -> Optional[str]:
        """The ARN STS says these credentials are (GetCallerIdentity: no permission needed), asked once per store;
        None where the endpoint has no STS (some S3-compatible servers) or it does not answer within seconds."""
        if not hasattr(self, "_principal"):
            self._principal: Optional[str] = None
            try:
                import boto3
                from botocore.config import Config

                config = Config(connect_timeout=3, read_timeout=5, retries={"total_max_attempts": 1})
                endpoint = os.environ.get("AWS_ENDPOINT_URL_STS") or self.endpoint_url
                sts = boto3.client("sts", endpoint_url=endpoint, config=config)
                self._principal = str(sts.get_caller_identity()["Arn"])
            except Exception:  # noqa: BLE001  (no STS, no network, no credentials: the event records no principal)
                pass
        return self._principal

    def exists(self) -> bool:
        """A prefix exists once anything was stored under it (a registration writes first): an empty one is
        almost always a mistyped --store, which readers should refuse rather than report as an empty registry."""
        full = self.prefix + "/" if self.prefix else ""
        page = self._call("list_objects_v2", "", Prefix=full, MaxKeys=1)
        if page.get("KeyCount") or page.get("Contents"):
            return True
        # A first registration killed mid-upload leaves only an unfinished multipart upload, which gc removes.
        return bool(self._call("list_multipart_uploads", "", Prefix=full, MaxUploads=1).get("Uploads"))

    def stale_uploads(self) -> Iterator[StaleUpload]:
        """Multipart uploads of blobs that were begun and never completed or aborted: their parts are stored (and
        billed) but invisible to object listings."""
        prefix = self._full(BLOB_PREFIX) + "/"
        markers: dict[str, Any] = {}
        while True:
            page = self._call("list_multipart_uploads", BLOB_PREFIX, Prefix=prefix, **markers)
            for upload in page.get("Uploads", []):
                key = upload["Key"]
                yield StaleUpload(f"{self._relative(key)} (upload {upload['UploadId'][:16]})", None,
                                  upload["Initiated"].timestamp(), (key, upload["UploadId"]))
            if not page.get("IsTruncated"):
                return
            markers = {"KeyMarker": page.get("NextKeyMarker"), "UploadIdMarker": page.get("NextUploadIdMarker")}

    def remove_stale_upload(self, upload: StaleUpload) -> None:
        from botocore.exceptions import ClientError

        key, upload_id = upload.handle
        try:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") != "NoSuchUpload":
                raise self._error(error, "abort_multipart_upload", self._relative(key)) from None

    def delete(self, key: str) -> None:
        self._call("delete_object", key, Key=self._full(key))  # S3 answers 204 for an absent key too

    def _touch(self, key: str) -> None:
        """A server-side copy of the object onto itself (multipart above the threshold): S3 has no other way to
        set Last-Modified. Nothing is downloaded. In a versioned bucket this keeps the previous version."""
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        full = self._full(key)
        digest = blob_digest(key)
        # ChecksumAlgorithm: the server computes the copy's own checksum. Without it a multipart source's composite
        # checksum can be carried over onto a single-part copy, and every later download fails its validation.
        try:
            self.client.copy({"Bucket": self.bucket, "Key": full}, self.bucket, full,
                             ExtraArgs={"MetadataDirective": "REPLACE", "ChecksumAlgorithm": "CRC32",
                                        "Metadata": {"sha256": digest} if digest else {}},
                             Config=self._transfer_config())
        except (ClientError, BotoCoreError, Boto3Error) as error:
            raise self._error(error, "copy", key) from None

    def iter_bytes(self, key: str) -> Iterator[bytes]:
        response = self._call("get_object", key, Key=self._full(key))
        try:
            yield from response["Body"].iter_chunks(CHUNK)
        except Exception as error:
            raise self._error(error, "get_object", key) from None

    def _upload_file(self, key: str, path: Path, sha256: str) -> None:
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.upload_file(str(path), self.bucket, self._full(key),
                                    ExtraArgs={"Metadata": {"sha256": sha256}}, Config=self._transfer_config())
        except (ClientError, BotoCoreError, Boto3Error) as error:
            raise self._error(error, "upload", key) from None

    def _download_file(self, key: str, dest: Path) -> None:
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.download_file(self.bucket, self._full(key), str(dest), Config=self._transfer_config())
        except (ClientError, BotoCoreError, Boto3Error) as error:
            raise self._error(error, "download", key) from None
