"""Shared fixtures: real Postgres, Redis and an S3-compatible server (moto_server) on loopback.

Nothing here mocks boto3, Redis or the database. The services are the ones ``scripts/test.sh`` makes sure
are running (Postgres on 127.0.0.1:5432, Redis on 127.0.0.1:6379); moto_server is started here on a free
port. Each test session gets its own Postgres database and Redis DB number, so runs don't collide.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from dfmod.loopback import free_port, moto_server
from tests.utils.databases import POSTGRES_ADMIN_URL
from tests.utils.processes import WorkerProcess
from tests.utils.receivers import CallbackReceiver

REDIS_HOST_URL = os.environ.get("DFMOD_TEST_REDIS", "redis://127.0.0.1:6379")
REDIS_TEST_DB = int(os.environ.get("DFMOD_TEST_REDIS_DB", "11"))


# --- model -----------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def checkpoint_path(tmp_path_factory) -> Path:
    """A random-weight MobileNetV4-Small checkpoint: the real architecture and code path, no training."""
    import torch

    from dfmod.detector import ModelMeta, build_model, save_checkpoint

    torch.manual_seed(0)
    meta = ModelMeta(model_version="test-random-0001", threshold=0.5, threshold_rule="test")
    path = tmp_path_factory.mktemp("model") / "test.safetensors"
    return save_checkpoint(build_model(meta), meta, path)


@pytest.fixture(scope="session")
def generated_faces(tmp_path_factory) -> Path:
    """A small labelled folder (Real/ smooth textures, Fake/ sharper ones) made here, never a data set."""
    import numpy as np
    from PIL import Image, ImageFilter

    root = tmp_path_factory.mktemp("generated")
    rng = np.random.default_rng(7)
    for label, blur in (("Real", 2.0), ("Fake", 0.0)):
        (root / label).mkdir()
        for index in range(24):
            noise = rng.integers(0, 256, (56, 56, 3), dtype=np.uint8)
            image = Image.fromarray(noise).resize((224, 224), Image.Resampling.BICUBIC)
            if blur:
                image = image.filter(ImageFilter.GaussianBlur(blur))
            image.save(root / label / f"{index:03d}.jpg", quality=90)
    return root


@pytest.fixture(scope="session")
def exported_checkpoint(checkpoint_path, generated_faces, tmp_path_factory) -> Path:
    """The random-weight checkpoint exported by `dfmod export`: fp32 and int8 ONNX and OpenVINO IR, with the sidecar."""
    from dfmod.export import export

    out = tmp_path_factory.mktemp("exported")
    export(checkpoint_path, out, formats=("onnx", "openvino"), calibration_folder=generated_faces, calibration_images=32,
           accept_on=generated_faces, threads=1)
    return out / checkpoint_path.name


# --- Postgres --------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """A fresh database for this test session, migrated to head, dropped afterwards."""
    from sqlalchemy import create_engine, text

    name = f"dfmod_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"Postgres not reachable at {POSTGRES_ADMIN_URL} ({exc}); run the tests with scripts/test.sh")
    url = POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    from dfmod import migrate
    from dfmod.settings import Settings

    migrate.upgrade(Settings(database_url=url))
    yield url
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture
def clean_postgres(postgres_url) -> str:
    from sqlalchemy import create_engine, text

    from dfmod.db import DEFAULT_TENANT_ID, DEFAULT_TENANT_NAME

    engine = create_engine(postgres_url)
    with engine.begin() as connection:
        connection.execute(
            text(
                "TRUNCATE verdicts, reviews, callback_deliveries, api_key_tenants, api_keys, items, tenant_buckets,"
                " tenants RESTART IDENTITY CASCADE"
            )
        )
        # Migration 0003 made the default tenant; every test starts with it, and only it.
        connection.execute(
            text("INSERT INTO tenants (id, name, created_at, updated_at) VALUES (:id, :name, now(), now())"),
            {"id": DEFAULT_TENANT_ID, "name": DEFAULT_TENANT_NAME},
        )
    engine.dispose()
    return postgres_url


# --- Redis -----------------------------------------------------------------------------------------


@pytest.fixture
def redis_url() -> str:
    import redis

    url = f"{REDIS_HOST_URL}/{REDIS_TEST_DB}"
    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
    except redis.ConnectionError as exc:
        pytest.fail(f"Redis not reachable at {url} ({exc}); run the tests with scripts/test.sh")
    yield url
    client.flushdb()
    client.close()


# --- S3 (moto_server) ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def s3_endpoint() -> str:
    try:
        with moto_server() as endpoint:
            yield endpoint
    except RuntimeError as exc:
        pytest.fail(str(exc))


@pytest.fixture
def s3_buckets(s3_endpoint):
    """Two fresh buckets on the S3 server: (upload bucket, an extra allowed bucket)."""
    import boto3

    client = boto3.client(
        "s3", endpoint_url=s3_endpoint, region_name="us-east-1", aws_access_key_id="test",
        aws_secret_access_key="test",
    )
    suffix = uuid.uuid4().hex[:8]
    buckets = (f"uploads-{suffix}", f"platform-{suffix}")
    for bucket in buckets:
        client.create_bucket(Bucket=bucket)
    return client, buckets


@pytest.fixture
def integration_env(clean_postgres, redis_url, s3_endpoint, s3_buckets, checkpoint_path, tmp_path) -> dict:
    """DFMOD_* variables for a full production-shaped stack on the real local services."""
    _client, (upload_bucket, extra_bucket) = s3_buckets
    return {
        "DFMOD_DATABASE_URL": clean_postgres,
        "DFMOD_BROKER_URL": redis_url,
        "DFMOD_QUEUE": f"dfmod-test-{uuid.uuid4().hex[:6]}",
        "DFMOD_STORAGE_URL": f"s3://{upload_bucket}",
        "DFMOD_ALLOWED_BUCKETS": extra_bucket,
        "DFMOD_S3_ENDPOINT_URL": s3_endpoint,
        "DFMOD_S3_ACCESS_KEY_ID": "test",
        "DFMOD_S3_SECRET_ACCESS_KEY": "test",
        "DFMOD_S3_MAX_ATTEMPTS": "2",
        "DFMOD_S3_EVENT_TOKEN": "event-secret",
        "DFMOD_CHECKPOINT": str(checkpoint_path),
        "DFMOD_DATA_DIR": str(tmp_path / "data"),
        "DFMOD_DEVICE": "cpu",
        "DFMOD_TORCH_THREADS": "1",
        "DFMOD_METRICS_PORT": str(free_port()),
        "DFMOD_BATCH_WAIT_MS": "200",
        "DFMOD_BATCH_SIZE": "8",
    }


@pytest.fixture
def integration_settings(integration_env, monkeypatch):
    from dfmod.settings import Settings

    for key, value in integration_env.items():
        monkeypatch.setenv(key, value)
    return Settings()


@pytest.fixture
def worker_factory(integration_env, tmp_path):
    started: list[WorkerProcess] = []

    def start(**overrides) -> WorkerProcess:
        env = {**integration_env, **{key: str(value) for key, value in overrides.items()}}
        worker = WorkerProcess(env, tmp_path / f"worker-{len(started)}.log")
        started.append(worker)
        return worker.start()

    yield start
    for worker in started:
        worker.stop(sig=9)


# --- API keys --------------------------------------------------------------------------------------


@pytest.fixture
def make_api_key(integration_settings):
    """Create API keys in the test database: ``make_api_key("ingest", "review", name=...)`` returns the key."""
    from dfmod.db import make_engine, make_session_factory, session_scope
    from dfmod.keys import create_key

    engine = make_engine(integration_settings.resolved_database_url, pool_size=1)
    factory = make_session_factory(engine)

    def make(*scopes: str, name: str | None = None, tenants: tuple[str, ...] = ()) -> str:
        with session_scope(factory) as session:
            key_name = name or f"test-{'-'.join(scopes)}-{uuid.uuid4().hex[:6]}"
            return create_key(session, key_name, scopes, tenants).plaintext

    yield make
    engine.dispose()


# --- a real HTTP receiver for verdict callbacks ------------------------------------------------------


@pytest.fixture
def callback_receiver():
    started: list[CallbackReceiver] = []

    def start(fail_first: int = 0, fail_status: int = 503) -> CallbackReceiver:
        receiver = CallbackReceiver(fail_first, fail_status)
        started.append(receiver)
        return receiver

    yield start
    for receiver in started:
        receiver.close()
