"""Storage backends: bucket allow-list, key confinement, and a real S3-compatible server (moto_server)."""

from __future__ import annotations

import pytest

from dfmod.settings import Settings
from dfmod.storage import (
    BucketNotAllowed,
    InvalidKey,
    LocalStorage,
    ObjectNotFound,
    ObjectTooLarge,
    S3Storage,
    StorageUnavailable,
    validate_key,
)


@pytest.mark.parametrize("key", ["../etc/passwd", "a/../../b", "/abs/path", "a/./b", "a\\b", "nul\x00byte", "", "dir/"])
def test_keys_that_could_escape_their_bucket_are_rejected(key):
    with pytest.raises(InvalidKey):
        validate_key(key)


@pytest.mark.parametrize("key", ["a.jpg", "uploads/2026/01/x.jpg", "with space/ü.png", "..hidden", "a..b/c"])
def test_ordinary_keys_are_accepted(key):
    assert validate_key(key) == key


def test_local_storage_round_trip_and_confinement(tmp_path):
    storage = LocalStorage(tmp_path, "uploads", frozenset({"uploads", "extra"}))
    info = storage.put("uploads", "a/b.jpg", b"12345")
    assert info.size == 5 and (tmp_path / "uploads" / "a" / "b.jpg").read_bytes() == b"12345"
    assert storage.get("uploads", "a/b.jpg", max_bytes=10) == b"12345"
    with pytest.raises(ObjectTooLarge):
        storage.get("uploads", "a/b.jpg", max_bytes=4)
    with pytest.raises(ObjectNotFound):
        storage.get("uploads", "missing.jpg", max_bytes=10)
    with pytest.raises(BucketNotAllowed):
        storage.get("secret", "a/b.jpg", max_bytes=10)
    with pytest.raises(InvalidKey):
        storage.get("uploads", "../extra/x", max_bytes=10)
    # A symlink planted inside a bucket must not lead outside it.
    (tmp_path / "outside.txt").write_text("secret")
    (tmp_path / "uploads" / "link").symlink_to(tmp_path / "outside.txt")
    with pytest.raises(InvalidKey):
        storage.get("uploads", "link", max_bytes=100)


def _s3_settings(endpoint: str, bucket: str, extra: str = "", **kw) -> Settings:
    return Settings(
        storage_url=f"s3://{bucket}", allowed_buckets=extra, s3_endpoint_url=endpoint, s3_access_key_id="test",
        s3_secret_access_key="test", **kw,
    )


@pytest.mark.parametrize("reader", ["obstore", "boto3"])
def test_s3_storage_against_a_real_s3_server(s3_endpoint, s3_buckets, reader):
    client, (upload, extra) = s3_buckets
    storage = S3Storage(_s3_settings(s3_endpoint, upload, extra, s3_reader=reader))
    assert (storage.reader is not None) == (reader == "obstore")
    info = storage.put(upload, "dir/x y.jpg", b"abc", content_type="image/jpeg")
    assert info.etag
    assert storage.head(upload, "dir/x y.jpg").size == 3
    assert storage.get(upload, "dir/x y.jpg", max_bytes=3) == b"abc"
    client.put_object(Bucket=extra, Key="k.png", Body=b"0123456789")
    with pytest.raises(ObjectTooLarge):
        storage.get(extra, "k.png", max_bytes=5)
    with pytest.raises(ObjectNotFound):
        storage.get(upload, "nope.jpg", max_bytes=5)
    with pytest.raises(BucketNotAllowed):
        storage.get("not-configured", "k.png", max_bytes=5)
    storage.check()


@pytest.mark.parametrize("reader", ["obstore", "boto3"])
def test_s3_storage_unreachable_endpoint_is_transient(reader):
    from dfmod.loopback import free_port

    storage = S3Storage(
        _s3_settings(
            f"http://127.0.0.1:{free_port()}", "b", s3_max_attempts=1, s3_connect_timeout_s=0.5, s3_reader=reader
        )
    )
    with pytest.raises(StorageUnavailable):
        storage.get("b", "k.jpg", max_bytes=10)


@pytest.mark.parametrize("key", ["a/" + "x" * 256 + ".jpg", "\ud800.jpg", "ok/" + "é" * 128])
def test_keys_no_store_can_hold_are_invalid(key):
    from dfmod.storage import InvalidKey, validate_key

    with pytest.raises(InvalidKey):
        validate_key(key)


def test_a_path_segment_of_255_bytes_is_still_a_valid_key():
    from dfmod.storage import validate_key

    assert validate_key("a/" + "x" * 251 + ".jpg")


@pytest.mark.parametrize(
    "key",
    ["a b.jpg", "a+b.jpg", "100%.jpg", "ünï/cödé.jpg", "q?x.jpg", "h#x.jpg", "a%2Fb.jpg", "tab\tx.jpg", "ctl\x01x.jpg",
     "emoji😀.jpg", "{}[]^`|<>\".jpg"],
)
def test_obstore_reads_every_key_boto3_writes(s3_endpoint, s3_buckets, key):
    """Keys object_store's paths refuse (control characters) are read through boto3 instead of failing."""
    _, (upload, extra) = s3_buckets
    storage = S3Storage(_s3_settings(s3_endpoint, upload, extra, s3_reader="obstore"))
    storage.put(upload, key, key.encode())
    assert storage.get(upload, key, max_bytes=100) == key.encode()


def test_obstore_reader_missing_bucket_and_credentials_chain(s3_endpoint, s3_buckets, monkeypatch):
    """Without keys in the settings the reader takes boto3's credential chain (here: the environment)."""
    _, (upload, extra) = s3_buckets
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    storage = S3Storage(Settings(storage_url=f"s3://{upload}", allowed_buckets="gone-bucket", s3_endpoint_url=s3_endpoint,
                                 s3_reader="obstore"))
    storage.put(upload, "env.jpg", b"xyz")
    assert storage.get(upload, "env.jpg", max_bytes=3) == b"xyz"
    with pytest.raises(BucketNotAllowed):
        storage.get("gone-bucket", "k.jpg", max_bytes=10)
