"""The API during outages, on real services behind a fault proxy: a database that is down answers JSON 503
with Retry-After (the key lookup included), and an S3 store that stops answering ends an upload in a 503
within the API's bounded S3 budget."""

from __future__ import annotations

import time
from urllib.parse import urlparse

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import make_url

from api.main import create_app
from tests.utils.faults import TcpProxy
from tests.utils.images import make_image_bytes
from tests.utils.records import bearer

pytestmark = pytest.mark.integration


def _upload(client: TestClient):
    return client.post("/v1/images", files={"file": ("x.jpg", make_image_bytes(), "image/jpeg")})


def test_a_database_outage_is_a_json_503_with_retry_after(integration_settings, make_api_key):
    key = make_api_key("ingest", "review")
    url = make_url(integration_settings.database_url)
    proxy = TcpProxy(url.host or "127.0.0.1", url.port or 5432)
    settings = integration_settings.model_copy(
        update={"database_url": url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)}
    )
    try:
        with TestClient(create_app(settings), headers=bearer(key), raise_server_exceptions=False) as client:
            assert _upload(client).status_code == 202
            proxy.drop()
            for response in (_upload(client), client.get("/v1/whoami"), client.get("/v1/items")):
                assert response.status_code == 503, response.text
                assert response.json()["error"] == "database_unavailable" and response.json()["message"]
                assert int(response.headers["Retry-After"]) > 0
            proxy.restore()
            assert _upload(client).status_code == 202
    finally:
        proxy.close()


def test_an_upload_to_a_stalled_s3_store_ends_in_a_bounded_503(integration_settings, make_api_key):
    key = make_api_key("ingest")
    endpoint = urlparse(integration_settings.s3_endpoint_url)
    proxy = TcpProxy(endpoint.hostname, endpoint.port)
    settings = integration_settings.model_copy(
        update={"s3_endpoint_url": f"http://127.0.0.1:{proxy.port}", "api_s3_timeout_s": 1.0, "api_s3_max_attempts": 2}
    )
    try:
        with TestClient(create_app(settings), headers=bearer(key), raise_server_exceptions=False) as client:
            assert _upload(client).status_code == 202
            proxy.stall()
            started = time.monotonic()
            response = _upload(client)
            elapsed = time.monotonic() - started
            assert response.status_code == 503 and response.json()["error"] == "storage_unavailable", response.text
            assert response.headers["Retry-After"]
            # Two attempts of one second each, plus botocore's backoff: far from the 20 s stall.
            assert elapsed < 8, elapsed
            proxy.restore()
    finally:
        proxy.close()
