"""A real ``dfmod worker`` process on Redis, Postgres and an S3 server: batches form under load, and a worker
killed with SIGKILL mid-batch loses nothing and duplicates nothing once it (or another) comes back."""

from __future__ import annotations

import signal
import time

import pytest
import redis
from sqlalchemy import func, select

from dfmod.db import Item, ItemStatus, Verdict, make_engine, make_session_factory, session_scope
from dfmod.lifecycle import NewItem, enqueue_items, record_items
from dfmod.queue import make_celery
from tests.utils.images import make_image_bytes

pytestmark = pytest.mark.integration


def _seed(settings, s3_buckets, count: int, size=(256, 256)) -> list[str]:
    client, (bucket, _extra) = s3_buckets
    for index in range(count):
        client.put_object(Bucket=bucket, Key=f"load/{index}.jpg", Body=make_image_bytes(size=size, color=((index * 37) % 256, (index * 91) % 256, 40)))
    factory = make_session_factory(make_engine(settings.resolved_database_url))
    with session_scope(factory) as session:
        recorded = record_items(session, [NewItem(bucket=bucket, key=f"load/{i}.jpg") for i in range(count)])
    ids = [r.item.id for r in recorded]
    assert enqueue_items(factory, make_celery(settings), settings, ids)
    return ids


def _wait_for(predicate, timeout: float, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()


def _status_counts(settings) -> dict[ItemStatus, int]:
    factory = make_session_factory(make_engine(settings.resolved_database_url))
    with session_scope(factory) as session:
        rows = session.execute(select(Item.status, func.count()).group_by(Item.status)).all()
    return {status: count for status, count in rows}


def _verdict_stats(settings):
    factory = make_session_factory(make_engine(settings.resolved_database_url))
    with session_scope(factory) as session:
        total = session.scalar(select(func.count()).select_from(Verdict))
        distinct_items = session.scalar(select(func.count(func.distinct(Verdict.item_id))))
        batch_sizes = session.scalars(select(Verdict.batch_size)).all()
    return total, distinct_items, batch_sizes


@pytest.mark.parametrize("pool,concurrency", [("solo", 1), ("threads", 2)])
def test_batches_of_more_than_one_form_under_load(integration_settings, s3_buckets, worker_factory, pool, concurrency):
    broker = redis.Redis.from_url(integration_settings.broker_url)
    ack_round_trips_before = _calls(broker, "zrem")  # each ack round trip is one ZREM of the unacked index
    ids = _seed(integration_settings, s3_buckets, 24)  # queued before the worker starts: a backlog
    worker = worker_factory(
        DFMOD_BATCH_SIZE=8, DFMOD_BATCH_WAIT_MS=500, DFMOD_WORKER_POOL=pool, DFMOD_WORKER_CONCURRENCY=concurrency
    )
    done = _wait_for(lambda: _status_counts(integration_settings).get(ItemStatus.classified, 0) == len(ids), 120)
    assert done, worker.log()
    total, distinct_items, batch_sizes = _verdict_stats(integration_settings)
    assert total == distinct_items == len(ids)
    assert max(batch_sizes) == 8, batch_sizes
    assert sum(1 for size in batch_sizes if size > 1) >= len(ids) // 2
    # The acks of a batch reach Redis together (Celery hands each one to its event loop separately).
    ack_round_trips = _calls(broker, "zrem") - ack_round_trips_before
    assert 1 <= ack_round_trips <= len(ids) // 4, ack_round_trips


def _calls(client: redis.Redis, command: str) -> int:
    return client.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0)


def test_worker_killed_mid_batch_loses_nothing_and_duplicates_nothing(integration_settings, s3_buckets, worker_factory):
    count = 48
    # Big images and batch 16 make each batch last long enough to be caught in the middle.
    overrides = dict(DFMOD_BATCH_SIZE=16, DFMOD_BATCH_WAIT_MS=300, DFMOD_VISIBILITY_TIMEOUT_S=4, DFMOD_STUCK_AFTER_S=30)
    _seed(integration_settings, s3_buckets, count, size=(1200, 1200))
    worker = worker_factory(**overrides)
    caught = _wait_for(lambda: _status_counts(integration_settings).get(ItemStatus.processing, 0) > 0, 60, 0.02)
    assert caught, worker.log()
    worker.stop(sig=signal.SIGKILL)
    counts = _status_counts(integration_settings)
    unfinished = counts.get(ItemStatus.processing, 0) + counts.get(ItemStatus.queued, 0)
    assert unfinished > 0, counts  # the kill really landed before the work was done

    worker_factory(**overrides)
    finished = _wait_for(
        lambda: _status_counts(integration_settings).get(ItemStatus.classified, 0) == count, 180, 0.5
    )
    counts = _status_counts(integration_settings)
    assert finished, counts
    total, distinct_items, _ = _verdict_stats(integration_settings)
    assert total == distinct_items == count  # every item once: nothing lost, nothing twice


def test_s3_events_in_aws_and_minio_shapes_end_in_verdicts(integration_settings, s3_buckets, worker_factory):
    """Objects land in a bucket, the notification (duplicated, URL-encoded key) reaches the API, a worker classifies."""
    from urllib.parse import quote_plus

    from fastapi.testclient import TestClient

    from api.main import create_app

    client_s3, (upload, extra) = s3_buckets
    keys = {"aws": (extra, "user 1/a+b photo.jpg"), "minio": (upload, "incoming/ünï code.jpg")}
    for bucket, key in keys.values():
        client_s3.put_object(Bucket=bucket, Key=key, Body=make_image_bytes(size=(200, 200), color=(len(key) * 9, 10, 99)))
    aws = {"Records": [{"eventName": "ObjectCreated:Put", "s3": {"bucket": {"name": keys["aws"][0]},
           "object": {"key": quote_plus(keys["aws"][1], safe="/"), "eTag": "e-aws", "size": 1}}}] * 2}
    minio = {"EventName": "s3:ObjectCreated:Put", "Records": [{"eventName": "s3:ObjectCreated:Put", "s3": {
        "bucket": {"name": keys["minio"][0]}, "object": {"key": quote_plus(keys["minio"][1], safe="/"), "eTag": "e-minio"}}}]}
    worker_factory()
    with TestClient(create_app(integration_settings)) as api:
        assert api.post("/v1/events/s3", json=aws, headers={"Authorization": "Bearer event-secret"}).json()["accepted"] == 1
        assert api.post("/v1/events/s3", json=minio, headers={"Authorization": "event-secret"}).json()["accepted"] == 1
        assert api.post("/v1/events/s3", json=aws, headers={"Authorization": "Bearer event-secret"}).json()["duplicates"] == 2
    done = _wait_for(lambda: _status_counts(integration_settings).get(ItemStatus.classified, 0) == 2, 60)
    assert done, _status_counts(integration_settings)
    factory = make_session_factory(make_engine(integration_settings.resolved_database_url))
    with session_scope(factory) as session:
        classified = {(item.bucket, item.key) for item in session.scalars(select(Item))}
    assert classified == set(keys.values())
    total, distinct_items, _ = _verdict_stats(integration_settings)
    assert total == distinct_items == 2
