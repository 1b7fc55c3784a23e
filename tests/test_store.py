"""The artifact store, against the local backend and a real S3 API (a moto server on 127.0.0.1)."""

from __future__ import annotations

import os
import uuid

import boto3
import pytest

from perp.store import (
    StoreConflict,
    StoreError,
    StoreIntegrityError,
    StoreNotFound,
    StoreUnreachable,
    blob_key,
    open_store,
)
from perp.store.testing import FaultProxy, free_port, moto_s3

BUCKET = "perp-test"


@pytest.fixture(scope="module")
def s3_endpoint():
    with moto_s3((BUCKET,)) as endpoint:
        yield endpoint


@pytest.fixture(params=["local", "s3"])
def store_uri(request, tmp_path, monkeypatch):
    if request.param == "local":
        return str(tmp_path / "store")
    endpoint = request.getfixturevalue("s3_endpoint")
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    return f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}"


def raw_s3(endpoint):
    return boto3.client("s3", endpoint_url=endpoint)


def corrupt(store, key, data=b"corrupted"):
    """Overwrite an object behind the store's back."""
    if store.uri.startswith("s3://"):
        raw_s3(store.endpoint_url).put_object(Bucket=store.bucket, Key=f"{store.prefix}/{key}", Body=data)
    else:
        (store.root / key).write_bytes(data)


def test_conditional_writes(store_uri):
    store = open_store(store_uri)
    etag = store.put_bytes("log/0001.json", b"first", if_none_match=True)
    with pytest.raises(StoreConflict):
        store.put_bytes("log/0001.json", b"second", if_none_match=True)
    assert store.get_bytes("log/0001.json") == (b"first", etag)

    new_etag = store.put_bytes("log/0001.json", b"second", if_match=etag)
    with pytest.raises(StoreConflict):
        store.put_bytes("log/0001.json", b"third", if_match=etag)  # stale etag
    with pytest.raises(StoreConflict):
        store.put_bytes("log/missing.json", b"x", if_match=new_etag)
    assert store.get_bytes("log/0001.json")[0] == b"second"
    with pytest.raises(StoreNotFound):
        store.get_bytes("log/missing.json")
    assert store.list_keys("log") == ["log/0001.json"]
    assert store.list_children("") == ["log"]


@pytest.mark.parametrize("key", ["../escape", "/abs/key", "a/../b", "a//b", ".hidden", "a/.tmp-x", "a\\b", "",
                                 "k" * 1100, "a/b c"])
def test_bad_keys_are_refused_before_any_write(store_uri, key):
    store = open_store(store_uri)
    with pytest.raises(StoreError, match="store key"):
        store.put_bytes(key, b"x")
    with pytest.raises(StoreError, match="store key"):
        store.get_bytes(key)
    assert store.list_keys("") == [] if store_uri.startswith("s3://") else not os.path.exists(store_uri)


def test_blobs_are_content_addressed_deduplicated_and_verified(store_uri, tmp_path):
    store = open_store(store_uri)
    source = tmp_path / "weights.bin"
    source.write_bytes(os.urandom(100_000))
    ref = store.put_blob(source)
    assert ref.uploaded and ref.size == 100_000
    assert not store.put_blob(source).uploaded  # already there
    out = store.get_blob(ref.sha256, tmp_path / "out" / "weights.bin")
    assert out.read_bytes() == source.read_bytes()
    assert store.hash_object(blob_key(ref.sha256)) == (ref.sha256, 100_000)


def test_list_delete_and_refresh_blobs(store_uri, tmp_path):
    import time

    store = open_store(store_uri)
    assert list(store.list_blobs()) == []
    source = tmp_path / "weights.bin"
    source.write_bytes(os.urandom(10_000))
    started = time.time()
    first, second = store.put_blob(source), store.put_blob_bytes(b"manifest")
    store.put_bytes("blobs/sha256/ab/not-a-blob", b"x")  # under the prefix, not laid out as a blob: not listed
    store.put_bytes(f"blobs/sha256/zz/{first.sha256}", b"x")  # a blob name in the wrong shard: not listed
    listed = {blob.sha256: blob for blob in store.list_blobs()}
    assert sorted(listed) == sorted([first.sha256, second.sha256])
    assert listed[first.sha256].size == 10_000 and listed[second.sha256].size == len(b"manifest")
    assert abs(listed[first.sha256].last_modified - started) < 60  # the store's clock, seconds since the epoch
    assert store.head(blob_key(first.sha256)).last_modified == listed[first.sha256].last_modified

    time.sleep(1.2)  # S3 keeps whole seconds
    assert not store.put_blob(source, refresh=False).uploaded
    assert store.head(blob_key(first.sha256)).last_modified == listed[first.sha256].last_modified
    assert not store.put_blob(source).uploaded  # re-used: refreshed, content and metadata unchanged
    assert store.head(blob_key(first.sha256)).last_modified >= listed[first.sha256].last_modified + 1
    assert store.get_blob(first.sha256, tmp_path / "back.bin").read_bytes() == source.read_bytes()
    if store_uri.startswith("s3://"):
        head = raw_s3(store.endpoint_url).head_object(Bucket=BUCKET, Key=f"{store.prefix}/{blob_key(first.sha256)}")
        assert head["Metadata"]["sha256"] == first.sha256

    store.delete_blob(first.sha256)
    store.delete_blob(first.sha256)  # absent: not an error
    assert [blob.sha256 for blob in store.list_blobs()] == [second.sha256]
    with pytest.raises(StoreNotFound):
        store._touch(blob_key(first.sha256))

    # Deleted between the existence check and the refresh (a gc): uploaded again, not assumed present.
    store.put_blob(source)
    touch = store._touch

    def deleted_first(key):
        store.delete(key)
        touch(key)

    store._touch = deleted_first
    assert store.put_blob(source).uploaded
    assert store.hash_object(blob_key(first.sha256)) == (first.sha256, 10_000)


def test_corrupted_object_fails_verified_download_and_leaves_nothing(store_uri, tmp_path):
    store = open_store(store_uri)
    source = tmp_path / "weights.bin"
    source.write_bytes(b"good weights" * 1000)
    ref = store.put_blob(source)
    corrupt(store, blob_key(ref.sha256))
    dest = tmp_path / "out" / "weights.bin"
    with pytest.raises(StoreIntegrityError, match=f"{ref.sha256}.*corrupt"):
        store.get_blob(ref.sha256, dest)
    assert not dest.parent.exists() or list(dest.parent.iterdir()) == []
    with pytest.raises(StoreIntegrityError):
        store.get_blob_bytes(ref.sha256)


def test_s3_multipart_upload_round_trip(s3_endpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("PERP_S3_MULTIPART_MB", "5")
    store = open_store(f"s3://{BUCKET}/multipart", endpoint_url=s3_endpoint)
    source = tmp_path / "big.bin"
    source.write_bytes(os.urandom(11 * 1024 * 1024))
    ref = store.put_blob(source)
    head = raw_s3(s3_endpoint).head_object(Bucket=BUCKET, Key=f"multipart/{blob_key(ref.sha256)}")
    assert head["ETag"].strip('"').endswith("-3")  # three parts
    assert head["Metadata"]["sha256"] == ref.sha256
    assert store.get_blob(ref.sha256, tmp_path / "back.bin").read_bytes() == source.read_bytes()
    # Re-used through a store whose threshold makes the refresh a single-part copy: still a valid object.
    single = open_store(f"s3://{BUCKET}/multipart", endpoint_url=s3_endpoint, multipart_threshold=64 * 2**20,
                        multipart_chunksize=64 * 2**20)
    assert not single.put_blob(source).uploaded
    head = raw_s3(s3_endpoint).head_object(Bucket=BUCKET, Key=f"multipart/{blob_key(ref.sha256)}")
    assert not head["ETag"].strip('"').endswith("-3") and head["Metadata"]["sha256"] == ref.sha256
    assert single.get_blob(ref.sha256, tmp_path / "again.bin").read_bytes() == source.read_bytes()


def test_retries_through_throttling_and_5xx(s3_endpoint, tmp_path):
    source = tmp_path / "w.bin"
    source.write_bytes(os.urandom(50_000))
    with FaultProxy(s3_endpoint, fail_every=3, status=503, code="SlowDown") as proxy:
        store = open_store(f"s3://{BUCKET}/throttled", endpoint_url=proxy.url, max_attempts=5)
        ref = store.put_blob(source)
        store.put_bytes("pointer.json", b"{}", if_none_match=True)
        assert store.get_blob(ref.sha256, tmp_path / "back.bin").read_bytes() == source.read_bytes()
    assert proxy.failures >= 2
    with FaultProxy(s3_endpoint, fail_first=2, status=500, code="InternalError") as proxy:
        store = open_store(f"s3://{BUCKET}/throttled", endpoint_url=proxy.url, max_attempts=5)
        assert store.list_keys("") == sorted([blob_key(ref.sha256), "pointer.json"])
    assert proxy.failures == 2


def test_download_retried_when_the_blob_is_replaced_mid_way(s3_endpoint, tmp_path):
    """A refresh (gc's grace) copies a blob onto itself; a ranged download racing it gets 412: it starts over."""
    source = tmp_path / "w.bin"
    source.write_bytes(os.urandom(50_000))
    ref = open_store(f"s3://{BUCKET}/refreshed", endpoint_url=s3_endpoint).put_blob(source)
    with FaultProxy(s3_endpoint, fail_first=1, status=412, code="PreconditionFailed") as proxy:
        store = open_store(f"s3://{BUCKET}/refreshed", endpoint_url=proxy.url)
        assert store.get_blob(ref.sha256, tmp_path / "back.bin").read_bytes() == source.read_bytes()
    assert proxy.failures == 1
    with FaultProxy(s3_endpoint, always=True, status=412, code="PreconditionFailed") as proxy:
        with pytest.raises(StoreConflict):
            open_store(f"s3://{BUCKET}/refreshed", endpoint_url=proxy.url).get_blob(ref.sha256, tmp_path / "x.bin")
    assert proxy.requests >= 3 and not (tmp_path / "x.bin").exists()  # three attempts, then the error


def test_endpoint_that_keeps_failing_is_a_clear_error_after_retries(s3_endpoint):
    with FaultProxy(s3_endpoint, always=True, status=500, code="InternalError") as proxy:
        store = open_store(f"s3://{BUCKET}/down", endpoint_url=proxy.url, max_attempts=3)
        with pytest.raises(StoreUnreachable, match=f"after 3 attempts.*{proxy.url}.*500"):
            store.get_bytes("x.json")
    assert proxy.requests == 3


def test_unreachable_endpoint_names_the_endpoint(monkeypatch):
    endpoint = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "super-secret-value")
    store = open_store(f"s3://{BUCKET}/p", endpoint_url=endpoint, max_attempts=2)
    with pytest.raises(StoreUnreachable) as error:
        store.list_keys("models")
    assert endpoint in str(error.value) and "after 2 attempts" in str(error.value)
    assert "super-secret-value" not in str(error.value)


def test_missing_bucket_and_bad_uris(s3_endpoint):
    with pytest.raises(StoreError, match="bucket 'no-such-bucket' does not exist"):
        open_store("s3://no-such-bucket/p", endpoint_url=s3_endpoint).list_keys("models")
    with pytest.raises(StoreError, match=r"unknown store scheme 'gs://'.*allowed: s3://, file://"):
        open_store("gs://bucket/prefix")
    with pytest.raises(StoreError) as error:
        open_store("ftp://user:hunter2@host/x")
    assert "hunter2" not in str(error.value)
    with pytest.raises(StoreError, match="not a valid S3 bucket name"):
        open_store("s3://../etc")
    with pytest.raises(StoreError, match="store key"):
        open_store("s3://bucket/../escape")
    with pytest.raises(StoreError, match="must be absolute"):
        open_store("file://relative/path")


def test_file_uri_and_nothing_created_until_written(tmp_path):
    store = open_store(f"file://{tmp_path}/store")
    assert store.list_keys("models") == [] and store.head("a.json") is None
    assert not (tmp_path / "store").exists()
    store.put_bytes("a.json", b"1")
    assert (tmp_path / "store" / "a.json").read_bytes() == b"1"
