"""Two tenants through a real ``dfmod worker`` process on Redis, Postgres and an S3 server: each tenant's
verdicts reach its own receiver only, signed with its own secret only, and identical bytes sent by both are
classified once without either learning about the other's item."""

from __future__ import annotations

import json
import time
import uuid

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from api.main import create_app
from dfmod import tenants
from dfmod.db import make_engine, make_session_factory, session_scope
from tests.dfmod.test_callbacks import verify_dfmod_signature
from tests.utils.images import make_image_bytes
from tests.utils.records import bearer

pytestmark = pytest.mark.integration


def _wait(predicate, timeout: float, what: str, log=lambda: ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}\n{log()}")


def test_each_tenant_hears_only_of_its_own_items_signed_with_its_own_secret(
    integration_settings, worker_factory, callback_receiver, make_api_key, s3_buckets
):
    s3, _buckets = s3_buckets
    secret_key = tenants.generate_secret_key()
    events_queue = f"dfmod-events-test-{uuid.uuid4().hex[:6]}"
    settings = integration_settings.model_copy(update={"secret_key": SecretStr(secret_key), "events_queue": events_queue})
    worker = worker_factory(DFMOD_SECRET_KEY=secret_key, DFMOD_EVENTS_QUEUE=events_queue)
    receivers = {"a": callback_receiver(), "b": callback_receiver()}
    engine = make_engine(settings.resolved_database_url, pool_size=1)
    made, buckets = {}, {}
    with session_scope(make_session_factory(engine)) as session:
        for name in ("a", "b"):
            buckets[name] = f"proc-{name}-{uuid.uuid4().hex[:8]}"
            s3.create_bucket(Bucket=buckets[name])
            made[name] = tenants.create_tenant(
                session, tenants.secret_box(settings), f"proc-{name}", receivers[name].url, [buckets[name]]
            )
    engine.dispose()
    data = make_image_bytes(size=(200, 160), color=(130, 20, 90))
    s3.put_object(Bucket=buckets["b"], Key="media/same.jpg", Body=data)
    key_a = make_api_key("ingest", tenants=("proc-a",))
    key_b = make_api_key("ingest", tenants=("proc-b",))

    with TestClient(create_app(settings)) as client:
        item_a = client.post("/v1/images", files={"file": ("x.jpg", data, "image/jpeg")}, headers=bearer(key_a)).json()["id"]
        _wait(lambda: receivers["a"].requests, 90, "tenant A's verdict callback", worker.log)
        # Then B is notified of the same bytes in its own bucket, with its own events token.
        record = {"eventName": "ObjectCreated:Put",
                  "s3": {"bucket": {"name": buckets["b"]}, "object": {"key": "media/same.jpg", "eTag": "e"}}}
        accepted = client.post("/v1/events/s3", json={"Records": [record]},
                               headers={"Authorization": f"Bearer {made['b'].events_token}"})
        assert accepted.status_code == 202, accepted.text
        item_b = accepted.json()["records"][0]["id"]
        _wait(lambda: receivers["b"].requests, 90, "tenant B's verdict callback", worker.log)

        seen_by_b = client.get(f"/v1/images/{item_b}", headers=bearer(key_b)).json()
        seen_by_a = client.get(f"/v1/images/{item_a}", headers=bearer(key_a)).json()
        # One verdict for the bytes, reused for B, but B is never told whose it was.
        assert seen_by_b["verdict"]["fake_probability"] == seen_by_a["verdict"]["fake_probability"]
        assert seen_by_b["verdict"]["reused_from"] is None
        assert client.get(f"/v1/images/{item_a}", headers=bearer(key_b)).status_code == 404

    [(headers_a, body_a)] = receivers["a"].requests
    [(headers_b, body_b)] = receivers["b"].requests
    assert json.loads(body_a)["item"]["id"] == item_a and json.loads(body_b)["item"]["id"] == item_b
    assert item_a not in body_b.decode() and item_b not in body_a.decode()
    secret_a, secret_b = made["a"].callback_secret, made["b"].callback_secret
    assert verify_dfmod_signature(secret_a, headers_a["X-Dfmod-Signature"], body_a)
    assert verify_dfmod_signature(secret_b, headers_b["X-Dfmod-Signature"], body_b)
    assert not verify_dfmod_signature(secret_a, headers_b["X-Dfmod-Signature"], body_b)
    assert not verify_dfmod_signature(secret_b, headers_a["X-Dfmod-Signature"], body_a)
