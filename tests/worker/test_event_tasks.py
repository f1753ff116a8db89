"""The worker's event tasks in a real ``dfmod worker`` process on Redis, Postgres and an S3 server: an upload's
verdict reaches a platform's callback receiver through retries, a reviewer's decision follows it, and a
heatmap is made on demand, all on the events queue while the classify queue stays pure."""

from __future__ import annotations

import json
import time
import uuid

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import select

from api.main import create_app
from dfmod.db import CallbackDelivery, make_engine, make_session_factory, session_scope
from dfmod.settings import Settings
from tests.dfmod.test_callbacks import verify_dfmod_signature
from tests.utils.images import make_image_bytes
from tests.utils.records import bearer

pytestmark = pytest.mark.integration
SECRET = "worker-callback-secret"


def _wait(predicate, timeout: float, what: str, log=lambda: ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}\n{log()}")


def test_verdict_callback_review_callback_and_heatmap_through_a_real_worker(
    integration_settings, worker_factory, callback_receiver, make_api_key
):
    receiver = callback_receiver(fail_first=2)
    events_queue = f"dfmod-events-test-{uuid.uuid4().hex[:6]}"
    worker = worker_factory(
        DFMOD_CALLBACK_URL=receiver.url, DFMOD_CALLBACK_SECRET=SECRET, DFMOD_CALLBACK_BACKOFF_S=0.2,
        DFMOD_EVENTS_QUEUE=events_queue,
    )
    settings = integration_settings.model_copy(
        update={
            "callback_url": receiver.url, "callback_secret": Settings(callback_secret=SECRET).callback_secret,
            "events_queue": events_queue,
        }
    )
    broker = redis.Redis.from_url(settings.broker_url)
    with TestClient(create_app(settings), headers=bearer(make_api_key("ingest", "review"))) as client:
        item_id = client.post(
            "/v1/images", files={"file": ("f.jpg", make_image_bytes(size=(240, 180)), "image/jpeg")}, data={"source": "platform-x"}
        ).json()["id"]

        # Two 503s, then delivered: three attempts of one verdict event, each recorded.
        _wait(lambda: len(receiver.requests) >= 3, 90, "the verdict callback", worker.log)
        headers, body = receiver.requests[2]
        assert verify_dfmod_signature(SECRET, headers["X-Dfmod-Signature"], body)
        event = json.loads(body)
        assert event["type"] == "verdict.created" and event["item"]["id"] == item_id
        assert event["item"]["source"] == "platform-x" and event["verdict"]["model_version"] == "test-random-0001"
        assert [h["X-Dfmod-Attempt"] for h, _ in receiver.requests] == ["1", "2", "3"]
        assert len({h["X-Dfmod-Event-Id"] for h, _ in receiver.requests}) == 1
        engine = make_engine(settings.resolved_database_url, pool_size=1)
        factory = make_session_factory(engine)

        def attempts():
            with session_scope(factory) as session:
                return [
                    (row.event_type, row.attempt, row.status_code, row.delivered)
                    for row in session.scalars(select(CallbackDelivery).order_by(CallbackDelivery.id))
                ]

        _wait(lambda: len(attempts()) == 3, 10, "the third attempt's record")
        assert attempts() == [
            ("verdict.created", 1, 503, False), ("verdict.created", 2, 503, False), ("verdict.created", 3, 200, True),
        ]

        # A reviewer decides: the platform hears about it too.
        assert client.post(f"/v1/items/{item_id}/reviews", json={"decision": "escalated"}).status_code == 201
        _wait(lambda: len(receiver.requests) >= 4, 30, "the review callback", worker.log)
        review_event = json.loads(receiver.requests[3][1])
        assert review_event["type"] == "review.decided" and review_event["review"]["decision"] == "escalated"

        # The heatmap: 202 while the worker makes it, then the PNG.
        heatmap_url = client.get(f"/v1/items/{item_id}").json()["heatmap_url"]
        assert client.get(heatmap_url).status_code == 202
        ready = _wait(
            lambda: (response := client.get(heatmap_url)).status_code == 200 and response, 60, "the heatmap", worker.log
        )
        assert ready.headers["content-type"] == "image/png"
        engine.dispose()

    # Nothing left behind, and no event task ever went through the classify queue the autoscaler reads.
    _wait(lambda: broker.llen(events_queue) == 0, 10, "an empty events queue")
    assert broker.llen(settings.queue) == 0
    assert "dfmod.callback" in worker.log() and "dfmod.heatmap" in worker.log()
