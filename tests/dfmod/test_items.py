"""Recording items idempotently and sweeping stuck ones, on Postgres and SQLite."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select, update

from dfmod import migrate
from dfmod.db import Item, ItemStatus, make_engine, make_session_factory, session_scope, utcnow
from dfmod.items import NewItem, record_items, sweep_stuck_items
from dfmod.queue import make_celery
from dfmod.settings import Settings


@pytest.fixture(params=["postgres", "sqlite"])
def database_url(request, tmp_path):
    if request.param == "postgres":
        return request.getfixturevalue("clean_postgres")
    url = f"sqlite:///{tmp_path}/items.db"
    migrate.upgrade(Settings(database_url=url, data_dir=tmp_path))
    return url


def test_recording_the_same_object_twice_yields_one_item(database_url):
    factory = make_session_factory(make_engine(database_url))
    new = NewItem(bucket="b", key="k.jpg", version="etag1", ingest="s3-event")
    with session_scope(factory) as session:
        first = record_items(session, [new, new])
    with session_scope(factory) as session:
        again = record_items(session, [new, NewItem(bucket="b", key="k.jpg", version="etag2")])
    assert first[0].created and not first[1].created and first[0].item.id == first[1].item.id
    assert not again[0].created and again[0].item.id == first[0].item.id
    assert again[1].created  # a new version of the same key is a new item
    with session_scope(factory) as session:
        assert len(session.scalars(select(Item)).all()) == 2


def test_sweep_requeues_stuck_items_and_gives_up_after_max_attempts(clean_postgres, redis_url):
    import redis

    settings = Settings(database_url=clean_postgres, broker_url=redis_url, stuck_after_s=60, max_attempts=3, queue="sweep-q")
    factory = make_session_factory(make_engine(clean_postgres))
    with session_scope(factory) as session:
        recorded = record_items(session, [NewItem(bucket="b", key=f"{i}.jpg") for i in range(4)])
    ids = [r.item.id for r in recorded]
    old = utcnow() - timedelta(minutes=10)
    with session_scope(factory) as session:
        session.execute(update(Item).where(Item.id.in_(ids[:3])).values(updated_at=old, enqueued_at=old, created_at=old))
        session.execute(update(Item).where(Item.id == ids[1]).values(status=ItemStatus.processing, updated_at=old))
        session.execute(update(Item).where(Item.id == ids[2]).values(attempts=3, updated_at=old))
        # ids[3] was enqueued just now: not stuck.
        session.execute(update(Item).where(Item.id == ids[3]).values(enqueued_at=utcnow()))
    assert sweep_stuck_items(factory, make_celery(settings), settings) == 2
    assert redis.Redis.from_url(redis_url).llen("sweep-q") == 2
    with session_scope(factory) as session:
        items = {item.id: item for item in session.scalars(select(Item))}
    assert items[ids[0]].status == items[ids[1]].status == ItemStatus.queued
    assert items[ids[2]].status == ItemStatus.failed and items[ids[2]].failure_reason == "too_many_attempts"
    # Swept items are stamped, so an immediate second sweep does not enqueue them again.
    assert sweep_stuck_items(factory, make_celery(settings), settings) == 0
