"""The item lifecycle: states, allowed transitions, claims and every write of ``Item.status``.

An item moves through four states::

    (recorded) -> queued -> processing -> classified
                    ^           |      \\-> failed
                    |           v
                    +------- queued     (a transient fault, or the sweep after a lost message)

``queued`` and ``processing`` items can also fail for good once they used ``max_attempts`` deliveries
(``too_many_attempts``), and a delivery of an item that already has the current model's verdict marks it
``classified`` without work. ``classified`` and ``failed`` are final.

This module is the only one that writes ``Item.status`` (a test scans the tree for others). Its callers:

* the API's ingest routes: :func:`record_and_enqueue` (record -> commit -> enqueue);
* the worker: :func:`claim_for_classification`, :func:`find_reusable_verdicts`, :func:`persist_results`,
  :func:`release_claims`;
* the sweep (a worker thread and ``dfmod sweep``): :func:`sweep_stuck_items`;
* the review queue reads states but leases items through its own columns (``claimed_*``), with the same
  :func:`skip_locked` claim.

Recording is idempotent: the same (bucket, key, version) recorded twice returns the first item, so a
duplicated S3 notification or a retried registration creates one item and one task.

A task is sent only after the transaction that wrote its item committed, and nothing writes the item
between the send and the worker's claim: the claim skips rows another transaction has locked
(:func:`skip_locked`, so that two workers given the same item do not wait for each other), so a write
after the send, racing the worker, made it skip the item and acknowledge its task, leaving the item for the
sweep minutes later (3 of 200 uploads at 10/s in ``dfmod bench`` of 2026-12-04, when ``enqueued_at`` was
stamped after the send). ``enqueued_at`` is stamped by the commit before the send and taken back if the
send fails, so the sweep still sends those at once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from celery import Celery
from sqlalchemy import Select, or_, select, tuple_, update
from sqlalchemy.orm import Session, sessionmaker

from dfmod import telemetry
from dfmod.db import (
    DEFAULT_TENANT_ID,
    Item,
    ItemStatus,
    Verdict,
    VerdictFace,
    insert_ignore,
    new_id,
    session_scope,
    utcnow,
)
from dfmod.errors import Unavailable
from dfmod.queue import enqueue
from dfmod.settings import Settings

logger = logging.getLogger(__name__)

FINAL_STATES = frozenset({ItemStatus.classified, ItemStatus.failed})
#: Every allowed move; anything else is a bug and raises :class:`IllegalTransition`.
TRANSITIONS: dict[ItemStatus, frozenset[ItemStatus]] = {
    ItemStatus.queued: frozenset({ItemStatus.queued, ItemStatus.processing, ItemStatus.classified, ItemStatus.failed}),
    ItemStatus.processing: frozenset(
        {ItemStatus.queued, ItemStatus.processing, ItemStatus.classified, ItemStatus.failed}
    ),
    ItemStatus.classified: frozenset(),
    ItemStatus.failed: frozenset(),
}
TOO_MANY_ATTEMPTS = "too_many_attempts"
# An item recorded this recently without ``enqueued_at`` is probably being enqueued by the API right now.
_ENQUEUE_GRACE_S = 5


class IllegalTransition(RuntimeError):
    """A status change the lifecycle does not allow (e.g. a final item put back to work)."""


def check_move(item_id: str, current: ItemStatus | None, to: ItemStatus) -> None:
    """Raise :class:`IllegalTransition` unless the lifecycle allows ``current`` -> ``to``."""
    if current is not None and to not in TRANSITIONS[ItemStatus(current)]:
        raise IllegalTransition(f"item {item_id}: {ItemStatus(current).value} -> {to.value} is not allowed")


def move(item: Item, to: ItemStatus, now: datetime | None = None) -> None:
    """Set ``item.status`` to ``to`` if the lifecycle allows it; the one place an ORM item's status is assigned
    (the worker's batches write theirs in bulk, through :func:`_bulk_update`, checked the same way)."""
    check_move(item.id, item.status, to)
    item.status = to
    item.updated_at = now or utcnow()


def _bulk_update(session: Session, rows: list[dict]) -> None:
    """UPDATE items by primary key (``rows``: dicts with ``id`` and the columns to set), as executemany.

    The worker's hot path: SQLAlchemy's ORM unit of work cost about 1.3 ms of CPU per item of a batch (attribute
    history, change tracking); an ORM bulk UPDATE by primary key is one statement per set of columns. Callers
    check each status move first (:func:`check_move`).
    """
    if rows:
        session.execute(update(Item), rows)


def skip_locked(query: Select, session: Session) -> Select:
    """Lock the selected rows, skipping rows another transaction holds (Postgres ``FOR UPDATE SKIP LOCKED``).

    Two workers (or two sweeps, or two reviewers) claiming at once then split the rows instead of waiting
    for each other or taking the same ones. SQLite serialises writers with its database lock instead.
    """
    if session.get_bind().dialect.name == "postgresql":
        return query.with_for_update(skip_locked=True)
    return query


def _exhausted(attempts: int, max_attempts: int) -> dict | None:
    """The ``too_many_attempts`` rule: the failure to write once an item used ``max_attempts`` deliveries."""
    if attempts < max_attempts:
        return None
    telemetry.ITEM_FAILURES.labels(reason=TOO_MANY_ATTEMPTS).inc()
    return {"failure_reason": TOO_MANY_ATTEMPTS, "failure_detail": f"gave up after {attempts} attempts"}


def give_up_if_exhausted(item: Item, max_attempts: int, now: datetime | None = None) -> bool:
    """Fail ``item`` for good by the ``too_many_attempts`` rule; True if it did."""
    failure = _exhausted(item.attempts, max_attempts)
    if failure is None:
        return False
    move(item, ItemStatus.failed, now)
    item.failure_reason, item.failure_detail = failure["failure_reason"], failure["failure_detail"]
    return True


# --- recording and enqueueing ----------------------------------------------------------------------


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
    #: Another item of the same tenant already holds these bytes (same sha256): its verdict will be reused.
    duplicate_of: str | None = None


def record_items(
    session: Session, new_items: list[NewItem], find_duplicates: bool = True, enqueued_at: datetime | None = None
) -> list[Recorded]:
    """Insert the items that are not there yet; return every item (new or existing) in input order.

    ``enqueued_at`` is stamped on the items it creates, for a caller that sends their tasks once this commits.

    With ``find_duplicates``, items whose bytes are known (uploads) name the earlier item of their tenant with
    the same sha256 in ``duplicate_of``: the worker will copy that item's verdict instead of classifying
    again. Another tenant's item is never named. An existing item may belong to another tenant than the one
    asking (an object named by two tenants): callers compare ``item.tenant_id`` and refuse rather than show it.
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
                "updated_at": now, "enqueued_at": enqueued_at,
            }
        )
    insert_ignore(session, Item, rows, ["bucket", "key", "version"])
    found = session.scalars(
        select(Item).where(tuple_(Item.bucket, Item.key, Item.version).in_(list(proposed)))
    ).all()
    by_identity = {(item.bucket, item.key, item.version): item for item in found}
    same_bytes = _first_items_by_sha(session, {i.sha256 for i in found if i.sha256}) if find_duplicates else {}
    results = []
    reported: set[tuple[str, str, str]] = set()
    for new in new_items:
        identity = (new.bucket, new.key, new.version)
        item = by_identity[identity]
        # Only the first mention of an object in this call counts as its creation.
        created = item.id == proposed[identity] and identity not in reported
        reported.add(identity)
        first = same_bytes.get((item.tenant_id, item.sha256)) if item.sha256 else None
        results.append(Recorded(item, created, duplicate_of=first if first and first != item.id else None))
    for created in (True, False):
        count = sum(1 for result in results if result.created is created)
        if count:
            telemetry.ITEMS_INGESTED.labels(ingest=new_items[0].ingest, created=str(created).lower()).inc(count)
    return results


def _first_items_by_sha(session: Session, shas: set[str]) -> dict[tuple[str, str], str]:
    """(tenant, sha256) -> the tenant's earliest item holding those bytes (the one its duplicates name)."""
    if not shas:
        return {}
    rows = session.execute(
        select(Item.tenant_id, Item.sha256, Item.id).where(Item.sha256.in_(shas)).order_by(Item.created_at, Item.id)
    ).all()
    first: dict[tuple[str, str], str] = {}
    for tenant_id, sha, item_id in rows:
        first.setdefault((tenant_id, sha), item_id)
    return first


def enqueue_items(
    factory: sessionmaker[Session], app: Celery, settings: Settings, item_ids: list[str], stamped: bool = False
) -> bool:
    """Send tasks for committed items, their ``enqueued_at`` stamped first (``stamped``: it already is).

    The stamp is committed before the send, never written after it (see the module's docstring). A broker
    outage is not the caller's problem: the item is already in the database, its stamp is taken back, and
    the sweep sends it once the broker is back. Returns whether it was sent.
    """
    if not item_ids:
        return True
    if not stamped:
        with session_scope(factory) as session:
            session.execute(update(Item).where(Item.id.in_(item_ids)).values(enqueued_at=utcnow()))
    try:
        enqueue(app, settings, item_ids)
    except Exception:  # the database is the source of truth; the sweep catches up
        logger.warning("broker unavailable; %d item(s) left for the sweep", len(item_ids), exc_info=True)
        telemetry.TRANSIENT_ERRORS.labels(kind="broker").inc()
        _unstamp(factory, item_ids)
        return False
    return True


def _unstamp(factory: sessionmaker[Session], item_ids: list[str]) -> None:
    """Take back the ``enqueued_at`` of items whose tasks were not sent: the sweep then sends them at once."""
    try:
        with session_scope(factory) as session:
            session.execute(
                update(Item).where(Item.id.in_(item_ids), Item.status == ItemStatus.queued).values(enqueued_at=None)
            )
    except Exception:  # still stamped: the sweep sends them once they count as stuck (stuck_after_s)
        logger.warning("could not unstamp %d unsent item(s)", len(item_ids), exc_info=True)


def record_and_enqueue(
    session: Session, factory: sessionmaker[Session], app: Celery, settings: Settings, new_items: list[NewItem]
) -> list[Recorded]:
    """Record items, commit, then enqueue the newly created ones: what every ingest path does.

    The commit comes first because a worker must find the item before it can find the task; the caller's
    session stays usable afterwards (its transaction rule commits whatever else it adds).
    """
    recorded = record_items(session, new_items, find_duplicates=settings.reuse_verdicts, enqueued_at=utcnow())
    session.commit()
    enqueue_items(factory, app, settings, [r.item.id for r in recorded if r.created], stamped=True)
    return recorded


# --- the sweep -------------------------------------------------------------------------------------


def sweep_stuck_items(factory: sessionmaker[Session], app: Celery, settings: Settings, limit: int = 500) -> int:
    """Re-enqueue items left ``queued`` or ``processing`` longer than ``stuck_after_s``.

    Covers a lost broker message (Redis restarted, a worker died before its messages came back) and items
    whose first enqueue failed. Items are claimed by bumping ``updated_at`` in the same transaction that
    selects them (:func:`skip_locked`), so sweeps running in several workers don't pile up duplicate
    tasks; their tasks are sent once that commits (a task sent while the sweep still held the rows was
    skipped by the worker that got it). Items past ``max_attempts`` fail for good instead.
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
        stuck = session.scalars(skip_locked(query, session)).all()
        now = utcnow()
        to_enqueue = []
        for item in stuck:
            if item.enqueued_at is None and item.updated_at >= cutoff and item.status == ItemStatus.queued:
                if (now - item.created_at).total_seconds() < _ENQUEUE_GRACE_S:
                    continue
            if give_up_if_exhausted(item, settings.max_attempts, now):
                continue
            move(item, ItemStatus.queued, now)
            item.enqueued_at = now
            to_enqueue.append(item.id)
    if to_enqueue and not enqueue_items(factory, app, settings, to_enqueue, stamped=True):
        # Unstamped again: the next sweep takes them at once.
        raise Unavailable(f"the broker is unavailable; {len(to_enqueue)} swept item(s) wait for the next sweep",
                          code="broker_unavailable")
    if to_enqueue:
        telemetry.ITEMS_REQUEUED.inc(len(to_enqueue))
        logger.info("sweep re-enqueued %d stuck item(s)", len(to_enqueue))
    return len(to_enqueue)


# --- the worker's side -----------------------------------------------------------------------------


@dataclass
class Claimed:
    """An item a worker now holds (``processing``, one attempt counted)."""

    id: str
    bucket: str
    key: str
    sha256: str | None
    enqueued_at: datetime | None
    source: str = ""
    tenant_id: str = DEFAULT_TENANT_ID


@dataclass
class ClaimResult:
    claimed: list[Claimed]
    gave_up: list[str]  # failed for good by the too_many_attempts rule


def claim_for_classification(
    session: Session, item_ids: list[str], model_version: str, max_attempts: int
) -> ClaimResult:
    """Claim items for one batch: ``processing``, attempt counted; skip finished ones.

    A redelivered task is a no-op: final items are skipped, and an item that already has this model's
    verdict (persisted, then its worker died before acknowledging) is marked ``classified`` without work.
    """
    columns = (Item.id, Item.status, Item.attempts, Item.bucket, Item.key, Item.sha256, Item.enqueued_at, Item.source,
               Item.tenant_id)
    rows = session.execute(skip_locked(select(*columns).where(Item.id.in_(item_ids)), session)).all()
    already = set(
        session.scalars(
            select(Verdict.item_id).where(Verdict.item_id.in_(item_ids), Verdict.model_version == model_version)
        )
    )
    now = utcnow()
    result = ClaimResult([], [])
    updates = []
    for row in rows:
        if row.status in FINAL_STATES:
            continue
        if row.id in already:
            check_move(row.id, row.status, ItemStatus.classified)
            updates.append({"id": row.id, "status": ItemStatus.classified, "updated_at": now})
            continue
        failure = _exhausted(row.attempts, max_attempts)
        if failure is not None:
            check_move(row.id, row.status, ItemStatus.failed)
            updates.append({"id": row.id, "status": ItemStatus.failed, "updated_at": now, **failure})
            result.gave_up.append(row.id)
            continue
        check_move(row.id, row.status, ItemStatus.processing)
        updates.append({"id": row.id, "status": ItemStatus.processing, "updated_at": now, "attempts": row.attempts + 1})
        result.claimed.append(
            Claimed(row.id, row.bucket, row.key, row.sha256, row.enqueued_at, row.source, row.tenant_id)
        )
    _bulk_update(session, updates)
    return result


@dataclass(frozen=True)
class ReusableVerdict:
    """A verdict this model already gave some bytes, with what is needed to copy it into another tenant."""

    fake_probability: float
    item_id: str
    tenant_id: str
    inference_ms: float | None
    batch_size: int | None
    device: str | None
    label: str = ""
    # Face stage: the faces of the verdict's item, as (x0, y0, x1, y1, detector_score, fake_probability).
    faces: tuple = ()


def find_reusable_verdicts(session: Session, model_version: str, shas: set[str]) -> dict[str, list[ReusableVerdict]]:
    """sha256 -> the verdicts this model gave those bytes, oldest first (one per item, any tenant)."""
    if not shas:
        return {}
    rows = session.execute(
        select(
            Verdict.sha256, Verdict.fake_probability, Verdict.item_id, Item.tenant_id, Verdict.inference_ms,
            Verdict.batch_size, Verdict.device, Verdict.label,
        )
        .join(Item, Item.id == Verdict.item_id)
        .where(Verdict.model_version == model_version, Verdict.sha256.in_(shas))
        .order_by(Verdict.id)
    ).all()
    faces: dict[str, list[tuple]] = {}
    if rows and model_version.endswith("+faces"):
        for face in session.scalars(
            select(VerdictFace)
            .where(VerdictFace.item_id.in_({row.item_id for row in rows}), VerdictFace.model_version == model_version)
            .order_by(VerdictFace.face_index)
        ):
            faces.setdefault(face.item_id, []).append(
                (face.x0, face.y0, face.x1, face.y1, face.detector_score, face.fake_probability)
            )
    known: dict[str, list[ReusableVerdict]] = {}
    for sha, *fields in rows:
        verdict = ReusableVerdict(*fields)
        known.setdefault(sha, []).append(replace(verdict, faces=tuple(faces.get(verdict.item_id, ()))))
    return known


@dataclass(frozen=True)
class VerdictData:
    fake_probability: float
    label: str
    threshold: float
    model_version: str
    inference_ms: float | None = None
    batch_size: int | None = None
    device: str | None = None
    reused_from: str | None = None
    # Face stage: one dict per face (face_index, x0, y0, x1, y1, detector_score, fake_probability).
    faces: list[dict] | None = None


@dataclass
class ItemResult:
    """What one claimed item came to; exactly one of ``verdict``, ``failure`` and ``retry`` is set."""

    item_id: str
    sha256: str | None = None
    size: int | None = None
    verdict: VerdictData | None = None
    failure: tuple[str, str] | None = None  # (reason, detail)
    retry: str | None = None  # why it goes back to the queue


def persist_results(session: Session, results: list[ItemResult]) -> None:
    """Write verdicts (``ON CONFLICT DO NOTHING``) and the final status of each item, in one transaction."""
    now = utcnow()
    verdict_rows = [
        {
            "item_id": r.item_id, "label": r.verdict.label, "fake_probability": r.verdict.fake_probability,
            "threshold": r.verdict.threshold, "model_version": r.verdict.model_version, "sha256": r.sha256,
            "inference_ms": r.verdict.inference_ms, "batch_size": r.verdict.batch_size, "device": r.verdict.device,
            "reused_from_item_id": r.verdict.reused_from, "created_at": now,
        }
        for r in results
        if r.verdict is not None
    ]
    insert_ignore(session, Verdict, verdict_rows, ["item_id", "model_version"])
    face_rows = [
        {"item_id": r.item_id, "model_version": r.verdict.model_version, **face}
        for r in results
        if r.verdict is not None and r.verdict.faces
        for face in r.verdict.faces
    ]
    if face_rows:
        insert_ignore(session, VerdictFace, face_rows, ["item_id", "model_version", "face_index"])
    statuses = dict(
        session.execute(select(Item.id, Item.status).where(Item.id.in_([r.item_id for r in results]))).tuples().all()
    )
    updates = []
    for result in results:
        status = statuses.get(result.item_id)
        if status is None or status in FINAL_STATES:  # deleted, or finished by another delivery meanwhile
            continue
        row: dict = {"id": result.item_id, "updated_at": now}
        if result.sha256:
            row["sha256"] = result.sha256
        if result.size is not None:
            row["size"] = result.size
        if result.verdict is not None:
            row |= {
                "status": ItemStatus.classified, "classified_at": now, "failure_reason": None, "failure_detail": None,
                # The newest verdict, copied for the reviewers' queries (dfmod.review).
                "score": result.verdict.fake_probability, "label": result.verdict.label,
                "threshold": result.verdict.threshold, "model_version": result.verdict.model_version,
            }
        elif result.failure is not None:
            reason, detail = result.failure
            row |= {"status": ItemStatus.failed, "failure_reason": reason, "failure_detail": detail[:2000]}
        elif result.retry is not None:
            row |= {"status": ItemStatus.queued, "failure_detail": f"retrying: {result.retry}"[:2000], "enqueued_at": now}
        else:
            continue
        check_move(result.item_id, status, row["status"])
        updates.append(row)
    _bulk_update(session, updates)


def release_claims(session: Session, item_ids: list[str], reason: str) -> list[str]:
    """Put items a failed batch still holds (``processing``) back to ``queued``; returns their ids.

    The attempt stays counted, so an item that keeps breaking its batch still ends ``too_many_attempts``.
    """
    now = utcnow()
    released = []
    for item in session.scalars(select(Item).where(Item.id.in_(item_ids), Item.status == ItemStatus.processing)):
        move(item, ItemStatus.queued, now)
        item.failure_detail = f"retrying: {reason}"[:2000]
        item.enqueued_at = now
        released.append(item.id)
    return released
