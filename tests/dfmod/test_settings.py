"""The one settings object: env prefix, URL-chosen backends, validation."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from dfmod.settings import Settings


def test_embedded_defaults_live_under_data_dir(tmp_path):
    settings = Settings(data_dir=tmp_path)
    assert settings.resolved_database_url == f"sqlite:///{tmp_path.resolve()}/dfmod.db"
    assert settings.broker_is_embedded
    assert not settings.storage_is_s3
    assert settings.local_storage_root == (tmp_path / "objects").resolve()
    assert settings.readable_buckets == {"uploads"}


def test_environment_is_read_with_the_dfmod_prefix(monkeypatch):
    monkeypatch.setenv("DFMOD_DATABASE_URL", "postgresql+psycopg://u:p@db/dfmod")
    monkeypatch.setenv("DFMOD_BROKER_URL", "redis://redis:6379/0")
    monkeypatch.setenv("DFMOD_STORAGE_URL", "s3://uploads")
    monkeypatch.setenv("DFMOD_ALLOWED_BUCKETS", "platform-a, platform-b")
    monkeypatch.setenv("DFMOD_BATCH_SIZE", "256")
    monkeypatch.setenv("DFMOD_S3_EVENT_TOKEN", "s3cret")
    settings = Settings()
    assert settings.batch_size == 256 and settings.upload_bucket == "uploads"
    assert settings.readable_buckets == {"uploads", "platform-a", "platform-b"}
    assert not settings.broker_is_embedded
    assert "s3cret" not in repr(settings)  # secrets never print


@pytest.mark.parametrize(
    "field,value", [("database_url", "mysql://x"), ("broker_url", "amqp://x"), ("batch_size", 0), ("device", "tpu")]
)
def test_invalid_values_are_rejected(field, value):
    with pytest.raises(ValidationError):
        Settings(**{field: value})
