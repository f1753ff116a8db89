"""dfmod.queue on real brokers: what enqueue sends (one task per id, countdown as an ETA), on Redis
in order through one publish batch and on the embedded broker one by one, and that a batch Redis refuses is an error
the caller sees (the items stay queued in the database for the sweep)."""

from __future__ import annotations

import base64
import json

import pytest
import redis
from kombu.exceptions import KombuError

from dfmod.queue import CLASSIFY_TASK, enqueue, make_celery
from dfmod.settings import Settings
from tests.utils.faults import RedisUserWithout


def _tasks_on_redis(client: redis.Redis, queue: str) -> list[tuple[str, list, dict]]:
    """(task name, args, headers) of the messages waiting on ``queue``, oldest first."""
    tasks = []
    for raw in reversed(client.lrange(queue, 0, -1)):  # LPUSH in, BRPOP out: the oldest is at the right
        payload = json.loads(raw)
        args = json.loads(base64.b64decode(payload["body"]))[0]
        tasks.append((payload["headers"]["task"], args, payload["headers"]))
    return tasks


def test_enqueue_on_redis_sends_one_task_per_id_in_order(redis_url):
    settings = Settings(broker_url=redis_url, queue="dfmod-test-enqueue")
    app = make_celery(settings)
    ids = [f"item-{index:03d}" for index in range(150)]
    assert enqueue(app, settings, ids) == 150
    tasks = _tasks_on_redis(redis.Redis.from_url(redis_url), settings.queue)
    assert [(name, args) for name, args, _ in tasks] == [(CLASSIFY_TASK, [item_id]) for item_id in ids]
    assert all(headers["eta"] is None for _, _, headers in tasks)
    # What Celery's tooling (flower, `celery inspect`) shows of each task.
    assert [(headers["argsrepr"], headers["kwargsrepr"]) for _, _, headers in tasks] == [(repr([i]), "{}") for i in ids]


def test_enqueue_declares_a_queue_redis_has_never_seen(redis_url):
    import uuid

    settings = Settings(broker_url=redis_url, queue=f"dfmod-test-new-{uuid.uuid4().hex[:8]}")
    client = redis.Redis.from_url(redis_url)
    assert enqueue(make_celery(settings), settings, ["a", "b"]) == 2
    try:
        assert client.exists(f"_kombu.binding.{settings.queue}")  # once per call, not per message
        assert [args for _, args, _ in _tasks_on_redis(client, settings.queue)] == [["a"], ["b"]]
    finally:
        client.delete(settings.queue, f"_kombu.binding.{settings.queue}", f"_kombu.binding_permanent.{settings.queue}")


def test_a_countdown_becomes_each_tasks_eta(redis_url):
    settings = Settings(broker_url=redis_url, queue="dfmod-test-enqueue")
    enqueue(make_celery(settings), settings, ["a", "b"], countdown=5.0)
    tasks = _tasks_on_redis(redis.Redis.from_url(redis_url), settings.queue)
    assert [args for _, args, _ in tasks] == [["a"], ["b"]]
    assert all(headers["eta"] for _, _, headers in tasks)


def test_enqueue_on_the_embedded_broker_sends_every_task(tmp_path):
    settings = Settings(data_dir=tmp_path, broker_url=None)
    app = make_celery(settings)
    assert enqueue(app, settings, [f"item-{index}" for index in range(20)]) == 20
    with app.connection_for_read() as connection:
        received = []
        queue = connection.SimpleQueue(settings.queue)
        while len(received) < 20:
            message = queue.get(timeout=5)
            received.append(message.payload[0][0])
            message.ack()
        queue.close()
    assert sorted(received) == sorted(f"item-{index}" for index in range(20))  # a folder of files: no order


@pytest.fixture
def redis_user_who_cannot_push(redis_url):
    with RedisUserWithout(redis_url, "dfmod-no-push", "lpush") as user:
        yield user.url


def test_a_publish_batch_redis_refuses_is_raised_to_the_caller(redis_user_who_cannot_push, redis_url):
    settings = Settings(broker_url=redis_user_who_cannot_push, queue="dfmod-test-enqueue")
    with pytest.raises((redis.exceptions.RedisError, KombuError)):
        enqueue(make_celery(settings), settings, ["a", "b", "c"])
    assert redis.Redis.from_url(redis_url).llen(settings.queue) == 0
