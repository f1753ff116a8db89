"""Issue 15's recoveries with real worker processes: a Redis restart while a partial batch is buffered
(later partial batches still flush on time), and a Postgres outage between claim and persist (the batch
finishes on its first attempt; nothing is left for the sweep).

Neither touches the machine's shared services: Redis is a private ``redis-server`` started here, and the
database outage is a proxy in front of Postgres that resets every connection and refuses new ones."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import func, select
from sqlalchemy.engine import make_url

from dfmod.db import Item, ItemStatus, Verdict, make_engine, make_session_factory, session_scope
from dfmod.lifecycle import NewItem, enqueue_items, record_items
from dfmod.queue import make_celery
from tests.utils.faults import PrivateRedis, TcpProxy
from tests.utils.images import make_image_bytes

pytestmark = pytest.mark.integration
# The sweep never runs during these tests: whatever recovers, recovers without it.
NO_SWEEP = {"DFMOD_STUCK_AFTER_S": 3600, "DFMOD_SWEEP_INTERVAL_S": 3600}


def _submit(settings, s3_buckets, names: list[str], size=(160, 160), fmt: str = "JPEG") -> list[str]:
    client, (bucket, _extra) = s3_buckets
    for index, name in enumerate(names):
        color = ((hash(name) + index * 41) % 256, (index * 97) % 256, 77)
        client.put_object(Bucket=bucket, Key=name, Body=make_image_bytes(fmt, size=size, color=color))
    engine = make_engine(settings.resolved_database_url)
    factory = make_session_factory(engine)
    with session_scope(factory) as session:
        ids = [r.item.id for r in record_items(session, [NewItem(bucket=bucket, key=name) for name in names])]
    assert enqueue_items(factory, make_celery(settings), settings, ids)
    engine.dispose()
    return ids


def _items(settings, ids: list[str]) -> list[Item]:
    engine = make_engine(settings.resolved_database_url)
    with session_scope(make_session_factory(engine)) as session:
        items = list(session.scalars(select(Item).where(Item.id.in_(ids))))
    engine.dispose()
    return items


def _wait_classified(settings, ids: list[str], timeout: float) -> float | None:
    """Seconds until every item in ``ids`` is classified, or None on timeout."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if all(item.status == ItemStatus.classified for item in _items(settings, ids)):
            return time.monotonic() - started
        time.sleep(0.1)
    return None


def test_partial_batches_keep_flushing_on_time_after_redis_restarts(
    integration_settings, s3_buckets, worker_factory, tmp_path
):
    redis = PrivateRedis(tmp_path)
    try:
        wait_s = 1.5
        settings = integration_settings.model_copy(update={"broker_url": redis.url})
        worker = worker_factory(
            DFMOD_BROKER_URL=redis.url, DFMOD_BATCH_SIZE=8, DFMOD_BATCH_WAIT_MS=int(wait_s * 1000), **NO_SWEEP
        )
        before = _wait_classified(settings, _submit(settings, s3_buckets, ["before/0.jpg", "before/1.jpg"]), 30)
        assert before is not None, worker.log()

        # Two messages sit in the buffer (a partial batch waits wait_s) when Redis goes away and comes back empty.
        buffered = _submit(settings, s3_buckets, ["buffered/0.jpg", "buffered/1.jpg"])
        time.sleep(0.4)
        redis.restart(down_s=1.0)
        deadline = time.monotonic() + 60
        while "flush timer re-armed" not in worker.log_path.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert worker.log_path.read_text().count("Connected to redis") >= 2, worker.log()
        assert _wait_classified(settings, buffered, 30) is not None, worker.log()

        # After the reconnect, partial batches (2 of 8) still go after about wait_s, not when 8 arrived.
        for round_ in range(3):
            elapsed = _wait_classified(
                settings, _submit(settings, s3_buckets, [f"after{round_}/0.jpg", f"after{round_}/1.jpg"]), 30
            )
            assert elapsed is not None and elapsed < wait_s + 5, (round_, elapsed, worker.log())
        print(f"upload-to-verdict before the restart {before:.2f}s, after it {elapsed:.2f}s (batch wait {wait_s}s)")
    finally:
        redis.stop()


def test_a_database_outage_between_claim_and_persist_loses_no_batch(integration_settings, s3_buckets, worker_factory):
    url = make_url(integration_settings.database_url)
    proxy = TcpProxy(url.host or "127.0.0.1", url.port or 5432)
    try:
        proxied = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
        worker = worker_factory(DFMOD_DATABASE_URL=proxied, DFMOD_BATCH_SIZE=16, DFMOD_BATCH_WAIT_MS=300, **NO_SWEEP)
        all_ids: list[str] = []
        for round_ in range(3):  # until the outage lands inside a batch (a batch can finish before the drop)
            # Big PNGs (no DCT shortcut) keep the batch between claim and persist long enough to be caught there.
            ids = _submit(
                integration_settings, s3_buckets, [f"db{round_}/{i}.png" for i in range(16)], size=(1400, 1400),
                fmt="PNG",
            )
            all_ids += ids
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if any(item.status == ItemStatus.processing for item in _items(integration_settings, ids)):
                    break
                time.sleep(0.02)
            else:
                pytest.fail(f"no batch was claimed:\n{worker.log()}")
            proxy.drop()  # every worker connection reset; new ones refused
            time.sleep(3)
            proxy.restore()
            elapsed = _wait_classified(integration_settings, ids, 90)
            assert elapsed is not None, worker.log()
            if "database unavailable" in worker.log_path.read_text():
                break
        assert "database unavailable" in worker.log_path.read_text()  # the outage did land inside a batch
        items = _items(integration_settings, all_ids)
        assert [item.attempts for item in items] == [1] * len(all_ids)  # first claim: no sweep, no retry
        engine = make_engine(integration_settings.resolved_database_url)
        with session_scope(make_session_factory(engine)) as session:
            assert session.scalar(select(func.count()).select_from(Verdict)) == len(all_ids)
        engine.dispose()
        print(f"all {len(ids)} images classified {elapsed:.1f}s after the database came back")
    finally:
        proxy.close()
