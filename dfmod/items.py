"""Recording items and re-enqueueing the stuck ones: the database side of ingest.

Shared by the API (uploads, S3 events, registrations) and the worker's periodic sweep. Recording is
idempotent: the same (bucket, key, version) recorded twice returns the first item, so a duplicated S3
notification or a retried registration creates one item and one task.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta

from celery import Celery
from sqlalchemy import or_, select, tuple_, update
from sqlalchemy.orm import Session, sessionmaker

from dfmod import telemetry
from dfmod.db import DEFAULT_TENANT_ID, Item, ItemStatus, insert_ignore, new_id, session_scope, utcnow
from dfmod.queue import enqueue
from dfmod.settings import Settings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class NewItem:
    bucket: str
    key: str
    version: str = ""
    etag: str | None = None
    sha256: str | None = None
    size: int | None = None
    content_type: str | None = None
    source: str = "upload"
    ingest: str = "upload"
    tenant_id: str = DEFAULT_TENANT_ID


@dataclass(frozen=True)
class Recorded:
    item: Item
    created: bool


def record_items(session: Session, new_items: list[NewItem]) -> list[Recorded]:
    """Insert the items that are not there yet; return every item (new or existing) in input order.

    An existing item may belong to another tenant than the one asking (an object named by two tenants):
    callers compare ``item.tenant_id`` and refuse rather than show it.
    """
    if not new_items:
        return []
    now = utcnow()
    proposed = {}
    rows = []
    for new in new_items:
        identity = (new.bucket, new.key, new.version)
        if identity in proposed:
            continue
        item_id = new_id()
        proposed[identity] = item_id
        rows.append(
            {
                "id": item_id, "tenant_id": new.tenant_id, "bucket": new.bucket, "key": new.key, "version": new.version, "etag": new.etag,
                "sha256": new.sha256, "size": new.size, "content_type": new.content_type, "source": new.source,
                "ingest": new.ingest, "status": ItemStatus.queued, "attempts": 0, "created_at": now,
                "updated_at": now,
            }
        )
    insert_ignore(session, Item, rows, ["bucket", "key", "version"])
    found = session.scalars(
        select(Item).where(tuple_(Item.bucket, Item.key, Item.version).in_(list(proposed)))
    ).all()
    by_identity = {(item.bucket, item.key, item.version): item for item in found}
    results = []
    reported: set[tuple[str, str, str]] = set()
    for new in new_items:
        identity = (new.bucket, new.key, new.version)
        item = by_identity[identity]
        # Only the first mention of an object in this call counts as its creation.
        created = item.id == proposed[identity] and identity not in reported
        reported.add(identity)
        results.append(Recorded(item, created))
    for created in (True, False):
        count = sum(1 for result in results if result.created is created)
        if count:
            telemetry.ITEMS_INGESTED.labels(ingest=new_items[0].ingest, created=str(created).lower()).inc(count)
    return results


def enqueue_items(
    factory: sessionmaker[Session], app: Celery, settings: Settings, item_ids: list[str]
) -> bool:
    """Send tasks for freshly recorded items and stamp ``enqueued_at``.

    A broker outage is not the caller's problem: the item is already in the database, still ``queued``
    with no ``enqueued_at``, and the sweep sends it once the broker is back. Returns whether it was sent.
    """
    if not item_ids:
        return True
    try:
        enqueue(app, settings, item_ids)
    except Exception:  # noqa: BLE001 - the database is the source of truth; the sweep catches up
        logger.warning("broker unavailable; %d item(s) left for the sweep", len(item_ids), exc_info=True)
        telemetry.TRANSIENT_ERRORS.labels(kind="broker").inc()
        return False
    with session_scope(factory) as session:
        session.execute(update(Item).where(Item.id.in_(item_ids)).values(enqueued_at=utcnow()))
    return True


def sweep_stuck_items(factory: sessionmaker[Session], app: Celery, settings: Settings, limit: int = 500) -> int:
    """Re-enqueue items left ``queued`` or ``processing`` longer than ``stuck_after_s``.

    Covers a lost broker message (Redis restarted, a worker died before its messages came back) and items
    whose first enqueue failed. Items are claimed by bumping ``updated_at`` in the same transaction that
    selects them (``SKIP LOCKED`` on Postgres), so sweeps running in several workers don't pile up
    duplicate tasks. Items past ``max_attempts`` fail for good instead.
    """
    cutoff = utcnow() - timedelta(seconds=settings.stuck_after_s)
    with session_scope(factory) as session:
        query = (
            select(Item)
            .where(
                Item.status.in_([ItemStatus.queued, ItemStatus.processing]),
                or_(Item.updated_at < cutoff, Item.enqueued_at.is_(None)),
            )
            .order_by(Item.updated_at)
            .limit(limit)
        )
        if session.get_bind().dialect.name == "postgresql":
            query = query.with_for_update(skip_locked=True)
        stuck = session.scalars(query).all()
        now = utcnow()
        to_enqueue = []
        for item in stuck:
            if item.enqueued_at is None and item.updated_at >= cutoff and item.status == ItemStatus.queued:
                # Recorded moments ago, the API may still be enqueueing it: leave it for a later sweep.
                if (now - item.created_at).total_seconds() < 5:
                    continue
            if item.attempts >= settings.max_attempts:
                item.status = ItemStatus.failed
                item.failure_reason = "too_many_attempts"
                item.failure_detail = f"gave up after {item.attempts} attempts"
                telemetry.ITEM_FAILURES.labels(reason="too_many_attempts").inc()
            else:
                item.status = ItemStatus.queued
                item.updated_at = now
                item.enqueued_at = now
                to_enqueue.append(item.id)
        if to_enqueue:
            # Sent inside the transaction: if the broker is down the claim rolls back and the next sweep retries.
            enqueue(app, settings, to_enqueue)
    if to_enqueue:
        telemetry.ITEMS_REQUEUED.inc(len(to_enqueue))
        logger.info("sweep re-enqueued %d stuck item(s)", len(to_enqueue))
    return len(to_enqueue)
