"""perp.io.s3 downloads: verified once, trusted while unchanged, re-verified when changed (local moto server)."""

from __future__ import annotations

import hashlib
import json
import os
import types

import boto3
import pytest

import perp.io.hashing
import perp.io.s3
from perp.errors import OutputError
from perp.io.hashing import cached_sha256, lookup_sha256, seed_sha256, sha256_file
from perp.io.s3 import S3Error, _verify, clear_cached, fetch_s3

PAYLOAD = b"perp weights " * 4096


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PERP_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def counters(monkeypatch):
    """Counts verifications (full reads by perp.io.s3), downloads and whole-file hashes by perp.io.hashing."""
    counts = {"verify": 0, "download": 0, "hash": 0}
    real_verify, real_hash = perp.io.s3._verify, perp.io.hashing.sha256_file
    real_client = perp.io.s3.s3_client

    def verify(*args, **kwargs):
        counts["verify"] += 1
        return real_verify(*args, **kwargs)

    def hash_file(path):
        counts["hash"] += 1
        return real_hash(path)

    def client(*args, **kwargs):
        made = real_client(*args, **kwargs)
        real_download = made.download_file

        def download_file(*a, **k):
            counts["download"] += 1
            return real_download(*a, **k)

        made.download_file = download_file
        return made

    monkeypatch.setattr(perp.io.s3, "_verify", verify)
    monkeypatch.setattr(perp.io.hashing, "sha256_file", hash_file)
    monkeypatch.setattr(perp.io.s3, "s3_client", client)
    return counts


def _put(bucket: str, key: str, body: bytes = PAYLOAD, sha256: bool = True) -> None:
    metadata = {"sha256": hashlib.sha256(body).hexdigest()} if sha256 else {}
    boto3.client("s3").put_object(Bucket=bucket, Key=key, Body=body, Metadata=metadata)


def _bump_mtime(path, by_ns: int = 5_000_000_000) -> None:
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + by_ns))


@pytest.mark.parametrize("with_sha_metadata", [True, False])
def test_a_cached_download_is_trusted_without_reading_it_again(s3_bucket, cache, counters, with_sha_metadata):
    _put(s3_bucket, "m/model.safetensors", sha256=with_sha_metadata)
    _put(s3_bucket, "m/config.json", b"{}", sha256=with_sha_metadata)
    uri = f"s3://{s3_bucket}/m"
    local = fetch_s3(uri)
    assert (local / "model.safetensors").read_bytes() == PAYLOAD
    assert counters == {"verify": 2, "download": 2, "hash": 0}
    stamp = json.loads((local / "model.safetensors.sha256").read_text())
    assert stamp["sha256"] == hashlib.sha256(PAYLOAD).hexdigest()
    assert stamp["size"] == len(PAYLOAD) and stamp["mtime_ns"] == (local / "model.safetensors").stat().st_mtime_ns

    for _ in range(2):  # every later resolve: a HEAD per object, no read of the file
        assert fetch_s3(uri) == local
    assert counters == {"verify": 2, "download": 2, "hash": 0}
    # The model content hash gets the digest the verification computed: no second read either.
    assert cached_sha256(local / "model.safetensors") == hashlib.sha256(PAYLOAD).hexdigest()
    assert counters["hash"] == 0


@pytest.mark.parametrize("change", ["same-size-content", "size", "mtime-only"])
def test_a_copy_changed_locally_is_downloaded_and_verified_again(s3_bucket, cache, counters, change):
    _put(s3_bucket, "m/model.safetensors")
    uri = f"s3://{s3_bucket}/m/model.safetensors"
    local = fetch_s3(uri)
    if change == "same-size-content":
        local.write_bytes(b"X" * len(PAYLOAD))
        _bump_mtime(local)  # a coarse-clock filesystem could keep the old mtime within one tick
    elif change == "size":
        with open(local, "ab") as handle:
            handle.write(b"appended")
    else:
        _bump_mtime(local)
    assert fetch_s3(uri) == local
    assert local.read_bytes() == PAYLOAD
    assert counters["verify"] == 2 and counters["download"] == 2
    assert cached_sha256(local) == hashlib.sha256(PAYLOAD).hexdigest()
    assert counters["hash"] == 0
    assert fetch_s3(uri) == local  # and trusted again from then on
    assert counters["verify"] == 2 and counters["download"] == 2


def test_a_changed_object_is_downloaded_again(s3_bucket, cache, counters):
    _put(s3_bucket, "m/model.safetensors")
    uri = f"s3://{s3_bucket}/m/model.safetensors"
    local = fetch_s3(uri)
    _put(s3_bucket, "m/model.safetensors", b"new weights")  # new ETag and size
    assert fetch_s3(uri) == local
    assert local.read_bytes() == b"new weights"
    assert counters["verify"] == 2 and counters["download"] == 2


def test_a_stamp_that_disagrees_with_the_sha256_metadata_is_not_trusted(s3_bucket, cache, counters):
    _put(s3_bucket, "m/model.safetensors")
    uri = f"s3://{s3_bucket}/m/model.safetensors"
    local = fetch_s3(uri)
    stamp = local.with_name(local.name + ".sha256")
    record = json.loads(stamp.read_text())
    stamp.write_text(json.dumps({**record, "sha256": "0" * 64}))
    assert fetch_s3(uri) == local
    assert counters["verify"] == 2
    assert json.loads(stamp.read_text())["sha256"] == hashlib.sha256(PAYLOAD).hexdigest()


def test_a_stamp_of_an_older_perp_is_verified_once_in_place(s3_bucket, cache, counters):
    _put(s3_bucket, "m/model.safetensors")
    uri = f"s3://{s3_bucket}/m/model.safetensors"
    local = fetch_s3(uri)
    etag = boto3.client("s3").head_object(Bucket=s3_bucket, Key="m/model.safetensors")["ETag"]
    local.with_name(local.name + ".sha256").write_text(f"{etag} {len(PAYLOAD)}")  # the old "ETAG SIZE" stamp
    assert fetch_s3(uri) == local
    assert counters == {"verify": 2, "download": 1, "hash": 0}  # read once more, not downloaded
    assert fetch_s3(uri) == local
    assert counters == {"verify": 2, "download": 1, "hash": 0}


def test_a_corrupt_copy_under_an_old_stamp_is_downloaded_again(s3_bucket, cache, counters):
    _put(s3_bucket, "m/model.safetensors")
    uri = f"s3://{s3_bucket}/m/model.safetensors"
    local = fetch_s3(uri)
    etag = boto3.client("s3").head_object(Bucket=s3_bucket, Key="m/model.safetensors")["ETag"]
    local.write_bytes(b"X" * len(PAYLOAD))
    local.with_name(local.name + ".sha256").write_text(f"{etag} {len(PAYLOAD)}")
    assert fetch_s3(uri) == local
    assert local.read_bytes() == PAYLOAD
    assert counters["download"] == 2


def test_a_bad_object_is_still_refused(s3_bucket, cache):
    boto3.client("s3").put_object(Bucket=s3_bucket, Key="m/model.safetensors", Body=b"corrupted",
                                  Metadata={"sha256": "0" * 64})
    with pytest.raises(S3Error, match="checksum mismatch for s3://.*/m/model.safetensors"):
        fetch_s3(f"s3://{s3_bucket}/m/model.safetensors")
    assert not (cache / "s3" / s3_bucket / "m" / "model.safetensors").exists()


def test_only_what_the_cache_lacks_must_fit_and_a_download_that_cannot_is_refused_before_it_starts(
        s3_bucket, cache, counters, full_disk):
    for name in ("a", "b"):
        _put(s3_bucket, f"m/{name}.safetensors")
    uri = f"s3://{s3_bucket}/m"
    fetch_s3(uri)
    assert counters["download"] == 2
    full_disk(cache, free=1 << 20)
    assert fetch_s3(uri) == cache / "s3" / s3_bucket / "m"  # everything cached: nothing to fit
    _put(s3_bucket, "m/b.safetensors", PAYLOAD[::-1])  # new content, same size: downloaded in full again
    with pytest.raises(OutputError, match=f"downloading {uri} needs about .* 1.0 MiB free; .* PERP_CACHE"):
        fetch_s3(uri)
    with pytest.raises(OutputError, match="downloading"):
        fetch_s3(f"{uri}/b.safetensors")
    assert counters["download"] == 2


def test_clear_cached_removes_a_single_object_and_its_stamp(s3_bucket, cache, counters):
    _put(s3_bucket, "m/model.safetensors")
    uri = f"s3://{s3_bucket}/m/model.safetensors"
    local = fetch_s3(uri)
    clear_cached(uri)
    assert not local.exists() and not local.with_name(local.name + ".sha256").exists()
    fetch_s3(uri)
    assert counters["download"] == 2


# --------------------------------------------------------------------------------------------- _verify


@pytest.fixture
def md5_calls(monkeypatch):
    calls = []

    def md5(*args):
        calls.append(args)
        return hashlib.md5(*args)

    monkeypatch.setattr(perp.io.s3, "hashlib", types.SimpleNamespace(sha256=hashlib.sha256, md5=md5))
    return calls


def test_md5_is_computed_only_against_a_single_part_etag(tmp_path, md5_calls):
    path = tmp_path / "f"
    path.write_bytes(PAYLOAD)
    sha, md5 = hashlib.sha256(PAYLOAD).hexdigest(), hashlib.md5(PAYLOAD).hexdigest()
    assert _verify(path, {"ETag": f'"{md5[:-2]}-3"'}, "s3://b/f") == sha  # multipart: not an MD5 of the content
    assert _verify(path, {"ETag": f'"{md5}"', "Metadata": {"sha256": sha}}, "s3://b/f") == sha  # sha256 decides
    assert md5_calls == []
    assert _verify(path, {"ETag": f'"{md5}"'}, "s3://b/f") == sha
    assert len(md5_calls) == 1
    with pytest.raises(S3Error, match="md5"):
        _verify(path, {"ETag": '"' + "0" * 32 + '"'}, "s3://b/f")
    with pytest.raises(S3Error, match="sha256"):
        _verify(path, {"ETag": f'"{md5[:-2]}-3"', "Metadata": {"sha256": "0" * 64}}, "s3://b/f")


# --------------------------------------------------------------------------------------------- hash cache


def test_seeded_digests_use_the_cached_sha256_key(tmp_path, cache, monkeypatch):
    path = tmp_path / "f"
    path.write_bytes(b"abc")
    assert lookup_sha256(path) is None
    seed_sha256(path, "1" * 64)
    assert lookup_sha256(path) == "1" * 64
    with monkeypatch.context() as patch:
        patch.setattr(perp.io.hashing, "sha256_file", lambda p: pytest.fail("re-read a seeded file"))
        assert cached_sha256(path) == "1" * 64
    _bump_mtime(path)  # any change of size or mtime invalidates the entry
    assert lookup_sha256(path) is None
    assert cached_sha256(path) == sha256_file(path) == hashlib.sha256(b"abc").hexdigest()
    assert lookup_sha256(path) == hashlib.sha256(b"abc").hexdigest()


@pytest.mark.parametrize("code, status, transient", [("SlowDown", 503, True), ("InternalError", 500, True),
                                                     ("RequestTimeout", 400, True), ("NoSuchKey", 404, False),
                                                     ("AccessDenied", 403, False)])
def test_throttling_and_server_errors_are_retryable_and_missing_objects_are_not(code, status, transient):
    from botocore.exceptions import ClientError

    from perp.io.s3 import S3Error, S3Unreachable, _call

    class Client:
        def head_object(self, **kwargs):
            raise ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "HeadObject")

    with pytest.raises(S3Error, match=code) as raised:
        _call(Client(), "head_object", Bucket="bucket", Key="key")
    assert isinstance(raised.value, S3Unreachable) is transient
