"""Trust-and-safety review on the database: item queries with keyset pagination, the claimable review
queue, append-only decisions (with retraction) and statistics.

Kept apart from the HTTP layer so the queue's locking can be exercised with real concurrent transactions.

"Flagged" means ``score >= threshold``, both copied from the item's newest verdict (the verdict stores the
threshold it applied). The review set is the flagged items plus those within ``review_band`` below their
threshold.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from sqlalchemy import and_, case, func, literal, or_, select, true, tuple_, update
from sqlalchemy.orm import Session

from dfmod.db import ApiKey, Item, ItemStatus, Review, Tenant, utcnow
from dfmod.errors import DfmodError
from dfmod.lifecycle import skip_locked

DECISIONS = ("confirmed_fake", "overturned_real", "escalated")
RETRACTED = "retracted"
ORDERS = ("newest", "oldest", "score_desc", "score_asc")


class ReviewProblem(DfmodError, ValueError):
    """A request the review layer refuses (400); ``code`` is the API error code."""

    http_status = 400

    def __init__(self, code: str, message: str, http_status: int | None = None) -> None:
        super().__init__(message, code=code, http_status=http_status)


class NotFound(ReviewProblem):
    http_status = 404


class Conflict(ReviewProblem):
    http_status = 409


class Forbidden(ReviewProblem):
    http_status = 403


# --- listing ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ItemFilters:
    label: str | None = None
    status: str | None = None
    min_score: float | None = None
    max_score: float | None = None
    model_version: str | None = None
    source: str | None = None
    reviewed: bool | None = None
    decision: str | None = None
    since: datetime | None = None  # created_at >= since
    until: datetime | None = None  # created_at < until
    in_review: bool | None = None  # flagged or within the review band


def item_band(band: float):
    """SQL: the item's review band, its tenant's if set, else ``band``."""
    tenant_band = select(Tenant.review_band).where(Tenant.id == Item.tenant_id).scalar_subquery()
    return func.coalesce(tenant_band, band)


def in_review_set(band: float):
    """SQL condition: the item's newest verdict is flagged, or within its review band below its threshold."""
    return and_(Item.score.is_not(None), Item.score >= Item.threshold - item_band(band))


def _where(filters: ItemFilters, band: float) -> list:
    conditions = []
    if filters.label is not None:
        conditions.append(Item.label == filters.label)
    if filters.status is not None:
        conditions.append(Item.status == ItemStatus(filters.status))
    if filters.min_score is not None:
        conditions.append(Item.score >= filters.min_score)
    if filters.max_score is not None:
        conditions.append(Item.score <= filters.max_score)
    if filters.model_version is not None:
        conditions.append(Item.model_version == filters.model_version)
    if filters.source is not None:
        conditions.append(Item.source == filters.source)
    if filters.reviewed is True:
        conditions.append(Item.decision.is_not(None))
    elif filters.reviewed is False:
        conditions.append(Item.decision.is_(None))
    if filters.decision is not None:
        conditions.append(Item.decision == filters.decision)
    if filters.since is not None:
        conditions.append(Item.created_at >= filters.since)
    if filters.until is not None:
        conditions.append(Item.created_at < filters.until)
    if filters.in_review is True:
        conditions.append(in_review_set(band))
    elif filters.in_review is False:
        conditions.append(or_(Item.score.is_(None), Item.score < Item.threshold - item_band(band)))
    return conditions


def _sort_column(order: str):
    return Item.score if order.startswith("score") else Item.created_at


def encode_cursor(order: str, item: Item) -> str:
    value = item.score if order.startswith("score") else item.created_at.astimezone(timezone.utc).isoformat()
    raw = json.dumps({"o": order, "v": value, "id": item.id}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(order: str, cursor: str):
    """(sort value, id) from a cursor made by :func:`encode_cursor` for the same ``order``."""
    try:
        raw = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        if raw["o"] != order:
            raise ReviewProblem("invalid_cursor", f"this cursor belongs to another order, not order={order}")
        item_id = raw["id"]
        if not isinstance(item_id, str) or len(item_id) > 36:
            raise ValueError("bad item id")
        if order.startswith("score"):
            value = float(raw["v"])
            if not 0.0 <= value <= 1.0:  # also refuses NaN and infinities
                raise ValueError("score out of range")
        else:
            value = datetime.fromisoformat(raw["v"])
            if value.tzinfo is None:
                raise ValueError("naive timestamp")
            value = value.astimezone(timezone.utc)
    except ReviewProblem:
        raise
    except (ValueError, KeyError, TypeError, OverflowError, RecursionError, binascii.Error) as exc:
        raise ReviewProblem("invalid_cursor", "the cursor is malformed; start again without one") from exc
    return value, item_id


def list_items(
    session: Session, filters: ItemFilters, order: str = "newest", limit: int = 50, cursor: str | None = None,
    band: float = 0.0, visible=None,
) -> tuple[list[Item], str | None]:
    """One page of items and the cursor of the next (None on the last page).

    Keyset pagination on (sort value, id): a page starts strictly after the last row of the previous one,
    so rows inserted meanwhile never shift a page (no duplicates, no skips among the rows that existed);
    ties on score are broken by id. Ordering by score lists classified items only.
    """
    if order not in ORDERS:
        raise ReviewProblem("invalid_request", f"order must be one of {', '.join(ORDERS)}", http_status=422)
    column = _sort_column(order)
    descending = order in ("newest", "score_desc")
    query = select(Item).where(*_where(filters, band), true() if visible is None else visible)
    if order.startswith("score"):
        query = query.where(Item.score.is_not(None))
    if cursor:
        value, last_id = decode_cursor(order, cursor)
        key = tuple_(column, Item.id)
        # Typed literals: the bound timestamp must go through the column's UTC type on every backend.
        after = tuple_(literal(value, column.type), literal(last_id, Item.id.type))
        query = query.where(key < after if descending else key > after)
    if descending:
        query = query.order_by(column.desc(), Item.id.desc())
    else:
        query = query.order_by(column.asc(), Item.id.asc())
    rows = list(session.scalars(query.limit(limit + 1)))
    next_cursor = encode_cursor(order, rows[limit - 1]) if len(rows) > limit else None
    return rows[:limit], next_cursor


# --- the review queue ------------------------------------------------------------------------------


def claim_items(
    session: Session, key: ApiKey, limit: int, lease_s: int, band: float, now: datetime | None = None, visible=None,
) -> list[Item]:
    """Lease the next ``limit`` unreviewed items of the review set, highest score first, to ``key``.

    One ``UPDATE ... WHERE id IN (SELECT ... FOR UPDATE SKIP LOCKED)`` on Postgres: rows another reviewer's
    open transaction is claiming are skipped rather than waited for or handed out twice, and rows whose
    claim committed meanwhile fail the re-checked lease condition. SQLite runs the same single statement,
    which it serialises with its database write lock. Items already leased to ``key`` come back with it
    (a reloaded page finds its queue), with their lease renewed. The caller commits.
    """
    now = now or utcnow()
    until = now + timedelta(seconds=lease_s)
    claimable = and_(
        Item.status == ItemStatus.classified,
        in_review_set(band),
        Item.decision.is_(None),
        or_(Item.claimed_until.is_(None), Item.claimed_until <= now, Item.claimed_key_id == key.id),
        true() if visible is None else visible,
    )
    pick = select(Item.id).where(claimable).order_by(Item.score.desc(), Item.id).limit(limit)
    pick = skip_locked(pick, session)
    claimed_ids = session.scalars(
        update(Item)
        .where(Item.id.in_(pick))
        .values(claimed_key_id=key.id, claimed_by=key.name, claimed_until=until)
        .returning(Item.id),
        execution_options={"synchronize_session": False},
    ).all()
    if not claimed_ids:
        return []
    return list(
        session.scalars(
            select(Item)
            .where(Item.id.in_(claimed_ids))
            .order_by(Item.score.desc(), Item.id)
            .execution_options(populate_existing=True)
        )
    )


def release_items(session: Session, key: ApiKey, item_ids: list[str]) -> int:
    """Give back leases held by ``key`` (a reviewer signing off); returns how many were released."""
    result = session.execute(
        update(Item)
        .where(Item.id.in_(item_ids), Item.claimed_key_id == key.id)
        .values(claimed_key_id=None, claimed_by=None, claimed_until=None),
        execution_options={"synchronize_session": False},
    )
    return result.rowcount or 0


# --- decisions -------------------------------------------------------------------------------------


def _lock_item(session: Session, item_id: str, visible=None) -> Item:
    # Decisions on one item are serialised on its row, so "the latest review" is well defined.
    item = session.scalar(
        select(Item)
        .where(Item.id == item_id, true() if visible is None else visible)
        .with_for_update()
        .execution_options(populate_existing=True)
    )
    if item is None:
        raise NotFound("not_found", f"no item {item_id}")
    return item


def _current_review(session: Session, item: Item) -> Review | None:
    """The latest review that is neither a retraction nor retracted."""
    reviews = list(session.scalars(select(Review).where(Review.item_id == item.id).order_by(Review.id)))
    retracted = {review.retracts_id for review in reviews if review.decision == RETRACTED}
    effective = [r for r in reviews if r.decision != RETRACTED and r.id not in retracted]
    return effective[-1] if effective else None


def _apply_current_decision(session: Session, item: Item) -> None:
    current = _current_review(session, item)
    item.decision = current.decision if current else None
    item.decided_at = current.created_at if current else None
    item.decided_by = current.reviewer if current else None


def _check_claim(item: Item, key: ApiKey, now: datetime) -> None:
    if item.claimed_key_id is not None and item.claimed_key_id != key.id and item.claimed_until and item.claimed_until > now:
        raise Conflict(
            "claimed_by_other",
            f"item {item.id} is claimed by {item.claimed_by!r} until {item.claimed_until.isoformat()}; only they may decide it",
        )


def record_review(
    session: Session, item_id: str, key: ApiKey, decision: str, note: str | None, request_id: str | None = None,
    visible=None, now: datetime | None = None,
) -> tuple[Review, bool]:
    """Append a review and make it the item's current decision; returns (review, created).

    A repeated ``request_id`` from the same key returns the first review instead of appending another. An
    item claimed by another key (lease not expired) cannot be decided.
    """
    if decision not in DECISIONS:
        raise ReviewProblem("invalid_decision", f"decision must be one of {', '.join(DECISIONS)}")
    item = _lock_item(session, item_id, visible)
    if request_id:
        earlier = session.scalar(select(Review).where(Review.key_id == key.id, Review.request_id == request_id))
        if earlier is not None:
            if earlier.item_id != item_id:
                raise Conflict("idempotency_key_reused", "this Idempotency-Key was used for another item")
            return earlier, False
    if item.score is None:
        raise Conflict("not_classified", f"item {item_id} has no verdict yet; nothing to review")
    _check_claim(item, key, now or utcnow())
    review = Review(
        item_id=item.id, decision=decision, note=note, reviewer=key.name, key_id=key.id, request_id=request_id,
        model_label=item.label, model_score=item.score, created_at=utcnow(),
    )
    session.add(review)
    session.flush()
    _apply_current_decision(session, item)
    return review, True


def retract_review(
    session: Session, item_id: str, review_id: int, key: ApiKey, note: str | None = None, visible=None,
) -> Review:
    """Undo the item's current decision by appending a retraction; the previous decision (if any) is current again.

    Only the key that made the decision, or an admin key, may retract it.
    """
    item = _lock_item(session, item_id, visible)
    target = session.get(Review, review_id)
    if target is None or target.item_id != item.id:
        raise NotFound("not_found", f"item {item_id} has no review {review_id}")
    if target.decision == RETRACTED:
        raise Conflict("not_retractable", "a retraction cannot itself be retracted")
    if session.scalar(select(Review.id).where(Review.retracts_id == target.id)):
        raise Conflict("already_retracted", f"review {review_id} is already retracted")
    current = _current_review(session, item)
    if current is None or current.id != target.id:
        raise Conflict("not_current", f"review {review_id} is not the item's latest decision")
    if target.key_id != key.id and "admin" not in key.scope_set:
        raise Forbidden("not_author", f"review {review_id} was made by {target.reviewer!r}; only they or an admin may retract it")
    retraction = Review(
        item_id=item.id, decision=RETRACTED, note=note, reviewer=key.name, key_id=key.id, retracts_id=target.id,
        model_label=item.label, model_score=item.score, created_at=utcnow(),
    )
    session.add(retraction)
    session.flush()
    _apply_current_decision(session, item)
    return retraction


# --- statistics ------------------------------------------------------------------------------------


def _day(session: Session):
    if session.get_bind().dialect.name == "postgresql":
        return func.to_char(func.timezone("UTC", Item.created_at), "YYYY-MM-DD")
    return func.substr(Item.created_at, 1, 10)  # SQLite stores UTC as 'YYYY-MM-DD HH:MM:SS...'


def stats(
    session: Session, band: float, since: datetime | None = None, until: datetime | None = None,
    now: datetime | None = None, visible=None,
) -> dict:
    """Counts by label, status, decision and day; model/reviewer agreement; backlogs."""
    now = now or utcnow()
    window = [*_where(ItemFilters(since=since, until=until), band), true() if visible is None else visible]

    def grouped(column) -> dict[str, int]:
        rows = session.execute(select(column, func.count()).where(*window).group_by(column)).all()
        return {(value.value if hasattr(value, "value") else value): count for value, count in rows if value is not None}

    flagged = case((and_(Item.score.is_not(None), Item.score >= Item.threshold), 1), else_=0)
    reviewed = case((Item.decision.is_not(None), 1), else_=0)
    day = _day(session)
    per_day = session.execute(
        select(day, func.count(), func.sum(flagged), func.sum(reviewed)).where(*window).group_by(day).order_by(day)
    ).all()

    agree_expr = or_(
        and_(Item.label == "fake", Item.decision == "confirmed_fake"),
        and_(Item.label == "real", Item.decision == "overturned_real"),
    )
    judged = session.execute(
        select(func.count(), func.sum(case((agree_expr, 1), else_=0))).where(
            *window, Item.decision.in_(["confirmed_fake", "overturned_real"])
        )
    ).one()
    judged_total, agreed = judged[0] or 0, judged[1] or 0

    def count(*conditions) -> int:
        return session.scalar(select(func.count()).select_from(Item).where(*window, *conditions)) or 0

    return {
        "total": count(),
        "by_label": grouped(Item.label),
        "by_status": grouped(Item.status),
        "by_decision": {**grouped(Item.decision), "unreviewed": count(in_review_set(band), Item.decision.is_(None))},
        "by_day": [
            {"day": str(d), "items": n, "flagged": int(f or 0), "reviewed": int(r or 0)} for d, n, f, r in per_day
        ],
        "agreement": {
            "judged": judged_total,
            "agreed": agreed,
            "disagreed": judged_total - agreed,
            "rate": round(agreed / judged_total, 4) if judged_total else None,
        },
        "backlog": {
            "classify": count(Item.status.in_([ItemStatus.queued, ItemStatus.processing])),
            "review": count(in_review_set(band), Item.decision.is_(None)),
            "claimed": count(in_review_set(band), Item.decision.is_(None), Item.claimed_until > now),
            "escalated": count(Item.decision == "escalated"),
        },
    }
