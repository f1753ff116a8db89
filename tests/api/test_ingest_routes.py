"""The HTTP API on real Postgres, Redis and an S3 server: uploads, S3/MinIO events, registrations, errors,
health, metrics, and upload-to-verdict through a real worker."""

from __future__ import annotations

import time
from urllib.parse import quote_plus

import pytest
import redis
from fastapi.testclient import TestClient

from api.main import create_app
from dfmod.settings import Settings
from tests.utils.images import make_image_bytes
from tests.utils.records import bearer

pytestmark = pytest.mark.integration
AUTH = {"Authorization": "Bearer event-secret"}


@pytest.fixture
def client(integration_settings, make_api_key):
    # An ingest key on every request; the S3-event tests replace it with their event token.
    with TestClient(create_app(integration_settings), headers=bearer(make_api_key("ingest"))) as test_client:
        yield test_client


def _queue_length(settings: Settings) -> int:
    return redis.Redis.from_url(settings.broker_url).llen(settings.queue)


def _aws_record(bucket: str, key: str, etag: str = "abc123", event: str = "ObjectCreated:Put", version: str | None = None):
    obj = {"key": quote_plus(key, safe="/"), "size": 1234, "eTag": etag, "sequencer": "0055AED6DCD90281E5"}
    if version:
        obj["versionId"] = version
    return {
        "eventVersion": "2.1", "eventSource": "aws:s3", "awsRegion": "us-east-1", "eventName": event,
        "s3": {"s3SchemaVersion": "1.0", "bucket": {"name": bucket, "arn": f"arn:aws:s3:::{bucket}"}, "object": obj},
    }


def _minio_payload(bucket: str, key: str, etag: str = "d41d8cd98f00b204e9800998ecf8427e"):
    encoded = quote_plus(key, safe="/")
    return {
        "EventName": "s3:ObjectCreated:Put",
        "Key": f"{bucket}/{encoded}",
        "Records": [
            {
                "eventVersion": "2.0", "eventSource": "minio:s3", "awsRegion": "", "eventName": "s3:ObjectCreated:Put",
                "userIdentity": {"principalId": "minioadmin"},
                "s3": {
                    "s3SchemaVersion": "1.0", "configurationId": "Config",
                    "bucket": {"name": bucket, "ownerIdentity": {"principalId": "minioadmin"}, "arn": f"arn:aws:s3:::{bucket}"},
                    "object": {"key": encoded, "size": 2048, "eTag": etag, "contentType": "image/jpeg",
                               "userMetadata": {"content-type": "image/jpeg"}, "sequencer": "17A9C1A0D1B1B1B1"},
                },
                "source": {"host": "127.0.0.1", "port": "", "userAgent": "MinIO (linux; amd64)"},
            }
        ],
    }


def test_upload_is_stored_recorded_and_enqueued(client, integration_settings, s3_buckets):
    s3, (bucket, _extra) = s3_buckets
    response = client.post("/v1/images", files={"file": ("face.jpg", make_image_bytes(), "image/jpeg")}, data={"source": "platform-x"})
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["status"] == "queued" and body["id"]
    assert response.headers["location"].endswith(f"/v1/images/{body['id']}")
    item = client.get(f"/v1/images/{body['id']}").json()
    assert item["source"] == "platform-x" and item["bucket"] == bucket and item["content_type"] == "image/jpeg"
    assert s3.get_object(Bucket=bucket, Key=item["key"])["Body"].read() == make_image_bytes()
    assert _queue_length(integration_settings) == 1


def test_identical_bytes_uploaded_twice_say_duplicate_and_name_the_first_item(client):
    data = make_image_bytes(size=(96, 96), color=(1, 2, 3))
    first = client.post("/v1/images", files={"file": ("a.jpg", data, "image/jpeg")})
    second = client.post("/v1/images", files={"file": ("b.jpg", data, "image/jpeg")})
    other = client.post("/v1/images", files={"file": ("c.jpg", make_image_bytes(color=(9, 9, 9)), "image/jpeg")})
    assert first.status_code == 202 and first.json()["duplicate"] is False and first.json()["duplicate_of"] is None
    # A new item (its own id, 202) whose verdict will be the first one's: the answer says so.
    assert second.status_code == 202 and second.json()["id"] != first.json()["id"]
    assert second.json()["duplicate"] is True and second.json()["duplicate_of"] == first.json()["id"]
    assert other.json()["duplicate"] is False and other.json()["duplicate_of"] is None


@pytest.mark.parametrize(
    "payload,status,error",
    [
        (b"plain text, not a picture", 415, "not_an_image"),
        (make_image_bytes("PNG", size=(1, 1)), 422, "too_small"),
    ],
)
def test_bad_uploads_get_a_clear_json_error(client, integration_settings, payload, status, error):
    response = client.post("/v1/images", files={"file": ("x.jpg", payload, "image/jpeg")})
    assert response.status_code == status
    assert response.json()["error"] == error and response.json()["message"]
    assert _queue_length(integration_settings) == 0


def test_upload_over_the_size_limit_is_413(integration_settings, make_api_key):
    settings = integration_settings.model_copy(update={"max_upload_bytes": 1000})
    with TestClient(create_app(settings), headers=bearer(make_api_key("ingest"))) as small:
        response = small.post("/v1/images", files={"file": ("x.png", make_image_bytes("PNG", size=(400, 400)), "image/png")})
    assert response.status_code == 413 and response.json()["error"] == "too_large"


def test_upload_without_a_file_is_422(client):
    response = client.post("/v1/images", data={"source": "x"})
    assert response.status_code == 422 and response.json()["error"] == "invalid_request"


def test_aws_events_with_encoded_keys_and_duplicates_create_one_item_each(client, integration_settings, s3_buckets):
    _s3, (upload, extra) = s3_buckets
    key = "user uploads/ph%oto+1 (é).jpg"
    payload = {"Records": [_aws_record(extra, key), _aws_record(extra, key), _aws_record(extra, "other.png", etag="e2")]}
    response = client.post("/v1/events/s3", json=payload, headers=AUTH)
    assert response.status_code == 202, response.text
    body = response.json()
    assert (body["accepted"], body["duplicates"]) == (2, 1)
    assert body["records"][0]["key"] == key
    again = client.post("/v1/events/s3", json=payload, headers=AUTH).json()  # redelivered notification
    assert again["accepted"] == 0 and again["duplicates"] == 3
    assert _queue_length(integration_settings) == 2
    item = client.get(f"/v1/images/{body['records'][0]['id']}").json()
    assert item["key"] == key and item["ingest"] == "s3-event"
    # A new version (new ETag) of the same key is new content: a new item.
    newer = client.post("/v1/events/s3", json={"Records": [_aws_record(extra, key, etag="changed")]}, headers=AUTH)
    assert newer.json()["accepted"] == 1


def test_minio_event_with_bare_token_is_accepted(client, s3_buckets):
    _s3, (upload, _extra) = s3_buckets
    response = client.post("/v1/events/s3", json=_minio_payload(upload, "a b/c.jpg"), headers={"Authorization": "event-secret"})
    assert response.status_code == 202, response.text
    assert response.json()["records"][0]["key"] == "a b/c.jpg"


def test_event_records_are_sorted_into_ignored_and_rejected(client, s3_buckets):
    _s3, (upload, _extra) = s3_buckets
    payload = {
        "Records": [
            _aws_record(upload, "ok.jpg"),
            _aws_record(upload, "gone.jpg", event="ObjectRemoved:Delete"),
            _aws_record("someone-elses-bucket", "x.jpg"),
            _aws_record(upload, "../escape.jpg"),
            {"eventName": "ObjectCreated:Put", "s3": "nonsense"},
        ]
    }
    body = client.post("/v1/events/s3", json=payload, headers=AUTH).json()
    assert [r["status"] for r in body["records"]] == ["accepted", "ignored", "rejected", "rejected", "rejected"]
    assert [r["reason"] for r in body["records"][2:]] == ["bucket_not_allowed", "invalid_key", "malformed_record"]


@pytest.mark.parametrize(
    "headers,payload,status,error",
    [
        ({}, {"Records": []}, 401, "unauthorized"),
        ({"Authorization": "Bearer wrong"}, {"Records": []}, 401, "unauthorized"),
        (AUTH, {"Records": []}, 400, "malformed_event"),
        (AUTH, {"hello": "world"}, 400, "malformed_event"),
        (AUTH, [1, 2, 3], 400, "malformed_event"),
    ],
)
def test_event_auth_and_malformed_payloads(client, headers, payload, status, error):
    response = client.post("/v1/events/s3", json=payload, headers=headers)
    assert response.status_code == status and response.json()["error"] == error


def test_event_body_that_is_not_json_is_400(client):
    response = client.post("/v1/events/s3", content=b"{not json", headers={**AUTH, "Content-Type": "application/json"})
    assert response.status_code == 400 and response.json()["error"] == "malformed_event"


def test_all_records_for_unknown_buckets_is_400(client):
    response = client.post("/v1/events/s3", json={"Records": [_aws_record("unknown-bucket", "x.jpg")]}, headers=AUTH)
    assert response.status_code == 400 and response.json()["rejected"] == 1


def test_register_existing_object(client, integration_settings, s3_buckets):
    s3, (_upload, extra) = s3_buckets
    s3.put_object(Bucket=extra, Key="existing/p.jpg", Body=make_image_bytes())
    first = client.post("/v1/images:register", json={"bucket": extra, "key": "existing/p.jpg", "source": "backfill"})
    assert first.status_code == 202, first.text
    second = client.post("/v1/images:register", json={"bucket": extra, "key": "existing/p.jpg"})
    assert second.status_code == 200 and second.json()["duplicate"] and second.json()["id"] == first.json()["id"]
    assert _queue_length(integration_settings) == 1
    assert client.post("/v1/images:register", json={"bucket": extra, "key": "nope.jpg"}).status_code == 404
    denied = client.post("/v1/images:register", json={"bucket": "not-allowed", "key": "a.jpg"})
    assert denied.status_code == 403 and denied.json()["error"] == "bucket_not_allowed"
    assert client.post("/v1/images:register", json={"bucket": extra, "key": "a/../b.jpg"}).status_code == 400


def test_unknown_item_is_404(client):
    response = client.get("/v1/images/00000000-0000-0000-0000-000000000000")
    assert response.status_code == 404 and response.json()["error"] == "not_found"


def test_health_readiness_and_metrics(client, integration_settings):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"] == {"database": "ok", "broker": "ok", "storage": "ok"}
    client.get("/v1/images/nope")
    text = client.get("/metrics").text
    assert 'dfmod_http_requests_total{method="GET",route="/v1/images/{item_id}",status="404"}' in text


def test_readiness_fails_when_a_dependency_is_down(integration_settings):
    from dfmod.loopback import free_port

    broken = integration_settings.model_copy(
        update={"broker_url": f"redis://127.0.0.1:{free_port()}/0", "s3_endpoint_url": f"http://127.0.0.1:{free_port()}", "s3_max_attempts": 1}
    )
    with TestClient(create_app(broken)) as client:
        response = client.get("/readyz")
    assert response.status_code == 503
    checks = response.json()["checks"]
    assert checks["database"] == "ok" and checks["broker"].startswith("error") and checks["storage"].startswith("error")


def test_upload_to_verdict_through_a_real_worker(client, integration_settings, worker_factory):
    worker_factory()
    ids = [
        client.post("/v1/images", files={"file": (f"{i}.jpg", make_image_bytes(color=(i * 60, 20, 20)), "image/jpeg")}).json()["id"]
        for i in range(3)
    ]
    bad = client.post("/v1/images", files={"file": ("t.jpg", make_image_bytes()[:200], "image/jpeg")})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        items = [client.get(f"/v1/images/{item_id}").json() for item_id in ids]
        if all(item["status"] == "classified" for item in items):
            break
        time.sleep(0.3)
    for item in items:
        assert item["status"] == "classified", item
        verdict = item["verdict"]
        assert verdict["label"] in ("real", "fake") and 0 <= verdict["fake_probability"] <= 1
        assert verdict["threshold"] == 0.5 and verdict["model_version"] == "test-random-0001"
    # A truncated JPEG passes the header check at upload and fails in the worker, with its reason.
    if bad.status_code == 202:
        bad_id = bad.json()["id"]
        for _ in range(100):
            failed = client.get(f"/v1/images/{bad_id}").json()
            if failed["status"] == "failed":
                break
            time.sleep(0.2)
        assert failed["status"] == "failed" and failed["reason"] in ("truncated", "corrupt")
    else:
        assert bad.status_code == 422


def test_readiness_can_require_a_live_worker_heartbeat_in_the_broker(integration_settings):
    from dfmod.consumers import beat

    settings = integration_settings.model_copy(update={"ready_requires_worker": True})
    with TestClient(create_app(settings)) as client:
        alone = client.get("/readyz")
        assert alone.status_code == 503 and alone.json()["checks"]["worker"].startswith("error: no worker")
        beat(settings, "events-only@test", [settings.events_queue])
        assert client.get("/readyz").status_code == 503  # consuming callbacks only is not classifying
        beat(settings, "classifier@test", [settings.queue])
        ready = client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["checks"]["worker"] == "ok"


def test_consumer_heartbeats_with_the_embedded_broker_expire(tmp_path, monkeypatch):
    from dfmod import consumers

    settings = Settings(data_dir=tmp_path)
    assert consumers.live_consumers(settings, settings.queue) == 0
    consumers.beat(settings, "w1@host", [settings.queue])
    assert consumers.live_consumers(settings, settings.queue) == 1
    monkeypatch.setattr(consumers, "HEARTBEAT_TTL_S", 0)
    assert consumers.live_consumers(settings, settings.queue) == 0
