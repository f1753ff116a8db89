"""Per-key rate limits on the real app, counted in real Redis: 429 with Retry-After, per key, shared by
every API replica, and off unless configured."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from tests.utils.images import make_image_bytes
from tests.utils.records import bearer

pytestmark = pytest.mark.integration


def _upload(client, key):
    return client.post("/v1/images", files={"file": ("a.jpg", make_image_bytes(), "image/jpeg")}, headers=bearer(key))


def test_uploads_over_the_limit_get_429_with_retry_after_across_replicas(integration_settings, make_api_key, redis_url):
    settings = integration_settings.model_copy(
        update={"rate_limit_uploads": "3/minute", "rate_limit_reads": "1000/minute", "rate_limit_storage_url": redis_url}
    )
    first_key, second_key = make_api_key("ingest"), make_api_key("ingest")
    # Two app instances stand for two API replicas: the counter lives in Redis, not in either.
    with TestClient(create_app(settings)) as replica_1, TestClient(create_app(settings)) as replica_2:
        assert [_upload(replica, first_key).status_code for replica in (replica_1, replica_2, replica_1)] == [202] * 3
        refused = _upload(replica_2, first_key)
        assert refused.status_code == 429
        assert refused.json()["error"] == "rate_limited"
        assert 1 <= int(refused.headers["retry-after"]) <= 60
        # The limit is the key's own: another key of the same tenant is not held back.
        assert _upload(replica_1, second_key).status_code == 202
        # Reads count separately from uploads.
        assert replica_1.get("/v1/whoami", headers=bearer(first_key)).status_code == 200


def test_reads_have_their_own_limit(integration_settings, make_api_key, redis_url):
    settings = integration_settings.model_copy(update={"rate_limit_reads": "2/minute", "rate_limit_storage_url": redis_url})
    key = make_api_key("review")
    with TestClient(create_app(settings)) as client:
        assert [client.get("/v1/stats", headers=bearer(key)).status_code for _ in range(3)] == [200, 200, 429]


def test_no_limit_unless_configured(integration_settings, make_api_key):
    key = make_api_key("review")
    with TestClient(create_app(integration_settings)) as client:
        assert client.app.state.rate_limiter.enabled is False
        assert {client.get("/v1/stats", headers=bearer(key)).status_code for _ in range(30)} == {200}


def test_a_bad_limit_is_refused_at_start():
    from pydantic import ValidationError

    from dfmod.settings import Settings

    with pytest.raises(ValidationError, match="rate limit"):
        Settings(rate_limit_uploads="lots")
