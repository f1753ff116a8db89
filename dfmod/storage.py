"""Object storage: S3-compatible buckets through boto3, or a local folder for the embedded default.

Both backends speak in (bucket, key) and enforce the same rules: only configured buckets are readable,
and a key can never escape its bucket (no ``..`` segments, no absolute paths, no NUL bytes). Errors are
sorted into what a worker must do with them: :class:`ObjectNotFound` and :class:`ObjectTooLarge` fail
the item, :class:`StorageUnavailable` is transient and retried.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import posixpath
import re
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from dfmod.errors import DfmodError
from dfmod.settings import Settings


class StorageError(DfmodError):
    """A storage failure; ``code`` (also ``reason``, the failed item's reason in the worker) says which."""

    code = "storage_error"
    http_status = 502

    @property
    def reason(self) -> str:
        return self.code


class BucketNotAllowed(StorageError):
    code = "bucket_not_allowed"
    http_status = 403


class InvalidKey(StorageError):
    code = "invalid_key"
    http_status = 400


class ObjectNotFound(StorageError):
    code = "object_not_found"
    http_status = 404


class ObjectTooLarge(StorageError):
    code = "too_large"
    http_status = 413


class StorageUnavailable(StorageError):
    """A transient fault (network, throttling, 5xx, a stalled endpoint): retry later."""

    code = "storage_unavailable"
    http_status = 503


@dataclass(frozen=True)
class ObjectInfo:
    bucket: str
    key: str
    size: int
    etag: str | None = None
    version_id: str | None = None
    content_type: str | None = None


def validate_key(key: str) -> str:
    """Reject keys that could address something outside their bucket or confuse path handling."""
    if not key or len(key) > 1024:
        raise InvalidKey("object keys must be 1 to 1024 characters")
    if "\x00" in key or "\\" in key:
        raise InvalidKey("object keys may not contain NUL or backslash")
    try:
        encoded_parts = key.encode("utf-8").split(b"/")
    except UnicodeEncodeError as exc:  # lone surrogates: no store can hold such a name
        raise InvalidKey("object keys must be valid UTF-8 text") from exc
    if any(len(part) > 255 for part in encoded_parts):
        # The longest file name of every common filesystem; local storage would fail on it later.
        raise InvalidKey("each '/'-separated part of an object key must be at most 255 bytes")
    if key.startswith("/"):
        raise InvalidKey("object keys may not start with '/'")
    parts = key.split("/")
    if any(part in ("..", ".") for part in parts):
        raise InvalidKey("object keys may not contain '.' or '..' segments")
    if posixpath.normpath(key) != key.rstrip("/") or key.endswith("/"):
        raise InvalidKey("object keys must be normalised paths to a file")
    return key


def heatmap_key(item_id: str, model_version: str) -> str:
    """Where the heatmap (Grad-CAM or occlusion map) of an item under a model version is cached (in the upload bucket)."""
    # Model versions are free text; keep the object key a plain, valid file name.
    safe_version = re.sub(r"[^A-Za-z0-9._-]", "_", model_version).strip(".") or "model"
    return f"heatmaps/{item_id}/{safe_version}.png"


def thumbnail_key(item_id: str) -> str:
    """Where the review page's thumbnail of an item is cached (in the upload bucket), made once."""
    return f"thumbnails/{item_id}.jpg"


class Storage(Protocol):
    readable_buckets: frozenset[str]
    bucket_allowed: Callable[[str], bool] | None

    def put(self, bucket: str, key: str, data: bytes, content_type: str | None = None) -> ObjectInfo: ...

    def head(self, bucket: str, key: str) -> ObjectInfo: ...

    def get(self, bucket: str, key: str, max_bytes: int) -> bytes: ...

    def check(self) -> None:
        """Raise if the upload bucket cannot be reached (readiness)."""


class _BucketRules:
    readable_buckets: frozenset[str]
    # Tenants' buckets live in the database (dfmod.tenants.BucketDirectory.readable), set by the API and workers.
    bucket_allowed: Callable[[str], bool] | None = None

    def _check(self, bucket: str, key: str) -> None:
        if bucket not in self.readable_buckets and not (self.bucket_allowed is not None and self.bucket_allowed(bucket)):
            raise BucketNotAllowed(f"bucket {bucket!r} is not configured for dfmod")
        validate_key(key)


class LocalStorage(_BucketRules):
    """Buckets are sub-folders of ``root``; used by the embedded default and in tests."""

    def __init__(self, root: Path, upload_bucket: str, readable_buckets: frozenset[str]) -> None:
        self.root = Path(root).resolve()
        self.upload_bucket = upload_bucket
        self.readable_buckets = readable_buckets
        (self.root / upload_bucket).mkdir(parents=True, exist_ok=True)

    def _path(self, bucket: str, key: str) -> Path:
        self._check(bucket, key)
        bucket_root = (self.root / bucket).resolve()
        path = (bucket_root / key).resolve()
        # Belt and braces after validate_key: a symlink inside the bucket must not lead out of it either.
        if not path.is_relative_to(bucket_root):
            raise InvalidKey("object key escapes its bucket")
        return path

    def put(self, bucket: str, key: str, data: bytes, content_type: str | None = None) -> ObjectInfo:
        path = self._path(bucket, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".upload-")
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
        return ObjectInfo(bucket, key, len(data), etag=hashlib.md5(data).hexdigest(), content_type=content_type)

    def head(self, bucket: str, key: str) -> ObjectInfo:
        path = self._path(bucket, key)
        if not path.is_file():
            raise ObjectNotFound(f"{bucket}/{key} does not exist")
        return ObjectInfo(bucket, key, path.stat().st_size)

    def get(self, bucket: str, key: str, max_bytes: int) -> bytes:
        info = self.head(bucket, key)
        if info.size > max_bytes:
            raise ObjectTooLarge(f"{info.size} bytes exceeds the limit of {max_bytes}")
        return self._path(bucket, key).read_bytes()

    def check(self) -> None:
        if not (self.root / self.upload_bucket).is_dir():
            raise StorageUnavailable(f"local storage folder {self.root / self.upload_bucket} is missing")


class S3Storage(_BucketRules):
    """Any S3-compatible endpoint (AWS, MinIO, R2, moto) with bounded retries and timeouts."""

    def __init__(self, settings: Settings) -> None:
        import boto3
        from botocore.config import Config

        self.upload_bucket = settings.upload_bucket
        self.readable_buckets = settings.readable_buckets
        config = Config(
            region_name=settings.s3_region,
            retries={"max_attempts": settings.s3_max_attempts, "mode": "adaptive"},
            connect_timeout=settings.s3_connect_timeout_s,
            read_timeout=settings.s3_read_timeout_s,
            s3={"addressing_style": settings.s3_addressing_style},
            max_pool_connections=32,
            # botocore >= 1.36 adds CRC checksums to every upload and verifies them on every download by
            # default; several S3-compatible stores reject or omit them, and the worker hashes the bytes
            # itself (sha256). Checksums stay on where an operation requires them.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        credentials = {}
        if settings.s3_access_key_id and settings.s3_secret_access_key:
            credentials = {
                "aws_access_key_id": settings.s3_access_key_id.get_secret_value(),
                "aws_secret_access_key": settings.s3_secret_access_key.get_secret_value(),
            }
        session = boto3.session.Session()
        self.client = session.client("s3", endpoint_url=settings.s3_endpoint_url, config=config, **credentials)
        self.reader = _ObstoreReader(settings, session) if _wants_obstore(settings.s3_reader) else None

    def _translate(self, exc: Exception, bucket: str, key: str) -> StorageError:
        from botocore.exceptions import BotoCoreError, ClientError

        if isinstance(exc, ClientError):
            code = str(exc.response.get("Error", {}).get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if code in ("NoSuchKey", "404", "NotFound", "NoSuchVersion"):
                return ObjectNotFound(f"{bucket}/{key} does not exist")
            if code == "NoSuchBucket":
                return BucketNotAllowed(f"bucket {bucket!r} does not exist")
            if status >= 500 or code in ("SlowDown", "Throttling", "RequestTimeout"):
                return StorageUnavailable(f"S3 {code or status}: {exc}")
            return StorageError(f"S3 {code or status}: {exc}")
        if isinstance(exc, BotoCoreError):
            return StorageUnavailable(f"S3 unreachable: {exc}")
        return StorageError(str(exc))

    def put(self, bucket: str, key: str, data: bytes, content_type: str | None = None) -> ObjectInfo:
        self._check(bucket, key)
        extra = {"ContentType": content_type} if content_type else {}
        try:
            response = self.client.put_object(Bucket=bucket, Key=key, Body=data, **extra)
        except Exception as exc:  # translated into our taxonomy
            raise self._translate(exc, bucket, key) from exc
        return ObjectInfo(
            bucket, key, len(data), etag=(response.get("ETag") or "").strip('"') or None,
            version_id=response.get("VersionId"), content_type=content_type,
        )

    def head(self, bucket: str, key: str) -> ObjectInfo:
        self._check(bucket, key)
        try:
            response = self.client.head_object(Bucket=bucket, Key=key)
        except Exception as exc:
            raise self._translate(exc, bucket, key) from exc
        return ObjectInfo(
            bucket, key, int(response.get("ContentLength", 0)), etag=(response.get("ETag") or "").strip('"') or None,
            version_id=response.get("VersionId"), content_type=response.get("ContentType"),
        )

    def get(self, bucket: str, key: str, max_bytes: int) -> bytes:
        self._check(bucket, key)
        if self.reader is not None:
            try:
                return self.reader.get(bucket, key, max_bytes)
            except _UnsupportedKey:
                pass
        try:
            response = self.client.get_object(Bucket=bucket, Key=key)
            size = int(response.get("ContentLength", 0))
            if size > max_bytes:
                response["Body"].close()
                raise ObjectTooLarge(f"{size} bytes exceeds the limit of {max_bytes}")
            # Read one byte past the limit so a lying Content-Length cannot make us buffer unbounded data.
            data = response["Body"].read(max_bytes + 1)
        except StorageError:
            raise
        except Exception as exc:
            raise self._translate(exc, bucket, key) from exc
        if len(data) > max_bytes:
            raise ObjectTooLarge(f"object exceeds the limit of {max_bytes} bytes")
        return data

    def check(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.upload_bucket)
        except Exception as exc:
            raise self._translate(exc, self.upload_bucket, "") from exc


def _wants_obstore(choice: str) -> bool:
    if choice == "boto3":
        return False
    installed = importlib.util.find_spec("obstore") is not None
    if choice == "obstore" and not installed:
        raise RuntimeError("DFMOD_S3_READER=obstore, but obstore is not installed (pip install obstore)")
    return installed


class _UnsupportedKey(Exception):
    """A key obstore cannot address (it is read with boto3 instead)."""


class _ObstoreReader:
    """Object reads through obstore (Rust's ``object_store``): the worker's hot path.

    botocore spends about 1.6 ms of CPU on one small GET (request signing, event hooks, header parsing in
    Python); obstore about 0.3 ms, measured on one 2-core machine against moto_server (see ``dfmod bench
    --worker-only --services``). Same endpoint, region, addressing style, credentials (explicit keys, else
    boto3's credential chain: environment, profile, IRSA, instance role), timeouts and attempt count as the
    boto3 client; errors sorted into the same taxonomy.
    """

    def __init__(self, settings: Settings, session) -> None:
        from datetime import timedelta

        self._stores: dict[str, object] = {}
        self._lock = threading.Lock()
        endpoint = settings.s3_endpoint_url
        virtual = settings.s3_addressing_style == "virtual" or (settings.s3_addressing_style == "auto" and not endpoint)
        self._config: dict = {"region": settings.s3_region, "virtual_hosted_style_request": virtual}
        if endpoint:
            self._config["endpoint"] = endpoint
        self._credentials: dict = {}
        if settings.s3_access_key_id and settings.s3_secret_access_key:
            self._credentials = {
                "access_key_id": settings.s3_access_key_id.get_secret_value(),
                "secret_access_key": settings.s3_secret_access_key.get_secret_value(),
            }
        else:
            from obstore.auth.boto3 import Boto3CredentialProvider

            self._credentials = {"credential_provider": Boto3CredentialProvider(session)}
        self._client_options = {
            "allow_http": bool(endpoint and endpoint.startswith("http://")),
            "connect_timeout": timedelta(seconds=settings.s3_connect_timeout_s),
            # botocore's read_timeout is per socket read; object_store's the same ("resets after each read").
            "read_timeout": timedelta(seconds=settings.s3_read_timeout_s),
            # object_store caps a whole request at 30 s by default; stalls are the read timeout's job.
            "timeout": timedelta(seconds=10 * settings.s3_read_timeout_s),
        }
        attempts = settings.s3_max_attempts
        self._retry = {
            "max_retries": attempts - 1,
            "retry_timeout": timedelta(seconds=attempts * (settings.s3_connect_timeout_s + settings.s3_read_timeout_s)),
        }

    def _store(self, bucket: str):
        with self._lock:
            store = self._stores.get(bucket)
            if store is None:
                from obstore.store import S3Store

                store = S3Store(
                    bucket, config=self._config, client_options=self._client_options, retry_config=self._retry,
                    **self._credentials,
                )
                self._stores[bucket] = store
            return store

    def get(self, bucket: str, key: str, max_bytes: int) -> bytes:
        import obstore
        from obstore.exceptions import InvalidPathError

        try:
            result = obstore.get(self._store(bucket), key)
        except (InvalidPathError, ValueError) as exc:
            # object_store's paths refuse some valid S3 keys (control characters): boto3 reads those.
            raise _UnsupportedKey(str(exc)) from exc
        except Exception as exc:
            raise self._translate(exc, bucket, key) from exc
        try:
            size = int(result.meta["size"])
            if size > max_bytes:
                raise ObjectTooLarge(f"{size} bytes exceeds the limit of {max_bytes}")
            # Streamed and cut one chunk past the limit, so a lying Content-Length cannot make us buffer more.
            chunks, received = [], 0
            for chunk in result.stream(min_chunk_size=min(max_bytes + 1, 1 << 20)):
                chunks.append(bytes(chunk))
                received += len(chunks[-1])
                if received > max_bytes:
                    raise ObjectTooLarge(f"object exceeds the limit of {max_bytes} bytes")
        except StorageError:
            raise
        except Exception as exc:  # translated into our taxonomy
            raise self._translate(exc, bucket, key) from exc
        return b"".join(chunks)

    @staticmethod
    def _translate(exc: Exception, bucket: str, key: str) -> StorageError:
        from obstore.exceptions import NotFoundError, PermissionDeniedError, UnauthenticatedError

        message = str(exc)
        if "NoSuchBucket" in message:
            return BucketNotAllowed(f"bucket {bucket!r} does not exist")
        # obstore raises Python's own FileNotFoundError / PermissionError where those fit.
        if isinstance(exc, (NotFoundError, FileNotFoundError)):
            return ObjectNotFound(f"{bucket}/{key} does not exist")
        if isinstance(exc, (PermissionDeniedError, UnauthenticatedError, PermissionError)):
            return StorageError(f"S3 refused the read: {message[:500]}")
        # Everything else (timeouts, refused connections, 5xx after the retries) is transient: the item goes
        # back to the queue with a delay, and max_attempts still bounds how often.
        return StorageUnavailable(f"S3 unreachable: {message[:500]}")


def make_storage(settings: Settings) -> Storage:
    if settings.storage_is_s3:
        return S3Storage(settings)
    return LocalStorage(settings.local_storage_root, settings.upload_bucket, settings.readable_buckets)
