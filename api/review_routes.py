"""Reviewer endpoints: item queries, item detail with images and heatmaps, decisions, the claimable review
queue and statistics. All need a key with the ``review`` scope (images also accept a signed link), and all
see only the items of the key's tenants (:class:`dfmod.tenants.Access`): another tenant's item is a 404.

The database work lives in :mod:`dfmod.review`; this module validates input and, once a decision has
committed, enqueues its callback event. Errors raised below are rendered by :mod:`api.errors`.
"""

from __future__ import annotations

import io
import time
from datetime import datetime, timezone
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Header, Path, Query, Request, Response, status
from fastapi.responses import JSONResponse
from PIL import Image
from sqlalchemy import select
from sqlalchemy.orm import selectinload

from api.auth import ReviewKey, access, link_or_key, not_found, require, signed_link
from api.deps import CeleryDep, SessionDep, SettingsDep, StorageDep, after_commit
from api.schemas import (
    ClaimIn,
    ClaimOut,
    ItemDetail,
    ItemId,
    ItemPage,
    ItemSummary,
    QueryTime,
    ReleaseIn,
    RetractIn,
    ReviewIn,
    ReviewOut,
    StorableText,
    VerdictOut,
)
from dfmod import review as reviews
from dfmod.callbacks import EVENT_RETRACTION, EVENT_REVIEW, enqueue_events
from dfmod.db import ApiKey, Item, ItemStatus, Tenant
from dfmod.errors import Conflict, DfmodError, Unavailable
from dfmod.imaging import DecodeBudget, decode_image, probe_image
from dfmod.queue import HEATMAP_TASK, send_events
from dfmod.storage import ObjectNotFound, StorageError, heatmap_key, thumbnail_key
from dfmod.tenants import has_callback

router = APIRouter(prefix="/v1")
# An admin key may retract any decision of any tenant, without being a reviewer.
RetractKey = Annotated[ApiKey, Depends(require("review", "admin"))]

THUMBNAIL_SIDE = 256
# A reviewer's page polls for a pending heatmap; one task per item per this many seconds is plenty.
_HEATMAP_REQUEST_EVERY_S = 30.0
_IMAGE_HEADERS = {
    # The bytes are untrusted uploads: never let a browser sniff them into HTML or run anything in them.
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'none'; sandbox",
    "Cache-Control": "private, max-age=300",
}


def _utc(value: datetime | None) -> datetime | None:
    # A time without a zone is read as UTC, the zone every stored timestamp is in.
    if value is None:
        return None
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value


def _thumbnail_url(request: Request, key: ApiKey, item_id: str, ttl_s: int) -> str:
    base = str(request.url_for("item_image", item_id=item_id))
    return signed_link(base, key, item_id, "thumb", ttl_s, {"variant": "thumb"})


def _summary(request: Request, key: ApiKey, item: Item, ttl_s: int) -> ItemSummary:
    thumbnail = _thumbnail_url(request, key, item.id, ttl_s) if item.status == ItemStatus.classified else None
    return ItemSummary.of(item, thumbnail)


def _load_item(session, item_id: str, key: ApiKey) -> Item:
    item = session.scalars(
        select(Item).where(Item.id == item_id).options(selectinload(Item.verdicts), selectinload(Item.reviews))
    ).first()
    if item is None or not access(key).can_review(item.tenant_id):
        raise not_found(item_id)
    return item


def _visible_item(session, item_id: str, key: ApiKey) -> Item:
    item = session.get(Item, item_id)
    if item is None or not access(key).can_review(item.tenant_id):
        raise not_found(item_id)
    return item


def _wants_callback(session, settings, item: Item) -> bool:
    return has_callback(session.get(Tenant, item.tenant_id), settings, item.source)


def _detail(request: Request, key: ApiKey, item: Item, ttl_s: int) -> ItemDetail:
    retracted = {review.retracts_id for review in item.reviews if review.retracts_id is not None}
    summary = _summary(request, key, item, ttl_s)
    image_base = str(request.url_for("item_image", item_id=item.id))
    heatmap_url = None
    if item.model_version is not None:
        heatmap_url = signed_link(
            str(request.url_for("item_heatmap", item_id=item.id)), key, item.id, "heatmap", ttl_s
        )
    return ItemDetail(
        **summary.model_dump(), bucket=item.bucket, key=item.key, ingest=item.ingest,
        size=item.size, content_type=item.content_type, classified_at=item.classified_at,
        verdicts=[VerdictOut.of(v) for v in sorted(item.verdicts, key=lambda v: (v.created_at, v.id))],
        reviews=[ReviewOut.of(r, r.id in retracted) for r in sorted(item.reviews, key=lambda r: r.id)],
        image_url=signed_link(image_base, key, item.id, "full", ttl_s, {"variant": "full"}),
        heatmap_url=heatmap_url,
    )


@router.get("/items", response_model=ItemPage, summary="Query items: filters, ordering, keyset pagination")
def list_items(
    request: Request,
    key: ReviewKey,
    session: SessionDep,
    settings: SettingsDep,
    label: Literal["real", "fake"] | None = Query(None, description="The newest verdict's label."),
    status_: Literal["queued", "processing", "classified", "failed"] | None = Query(None, alias="status"),
    min_score: float | None = Query(None, ge=0.0, le=1.0, description="Fake probability at least this."),
    max_score: float | None = Query(None, ge=0.0, le=1.0, description="Fake probability at most this."),
    model_version: Annotated[StorableText, Query(max_length=128)] | None = None,
    source: Annotated[StorableText, Query(max_length=255)] | None = None,
    reviewed: bool | None = Query(None, description="true: has a current decision; false: has none."),
    decision: Literal["confirmed_fake", "overturned_real", "escalated"] | None = Query(None),
    in_review: bool | None = Query(None, description="true: flagged or within the review band."),
    since: QueryTime | None = Query(None, description="Created at or after (ISO 8601; UTC if no zone)."),
    until: QueryTime | None = Query(None, description="Created before (ISO 8601; UTC if no zone)."),
    order: Literal["newest", "oldest", "score_desc", "score_asc"] = Query("newest"),
    limit: int = Query(50, ge=1, le=500),
    cursor: str | None = Query(None, max_length=1000, description="next_cursor of the previous page."),
) -> ItemPage:
    if min_score is not None and max_score is not None and min_score > max_score:
        raise DfmodError("min_score is above max_score", code="invalid_request", http_status=422)
    filters = reviews.ItemFilters(
        label=label, status=status_, min_score=min_score, max_score=max_score, model_version=model_version,
        source=source, reviewed=reviewed, decision=decision, since=_utc(since), until=_utc(until), in_review=in_review,
    )
    items, next_cursor = reviews.list_items(
        session, filters, order, limit, cursor, band=settings.review_band, visible=access(key).review_filter()
    )
    ttl = settings.image_link_ttl_s
    return ItemPage(items=[_summary(request, key, item, ttl) for item in items], next_cursor=next_cursor)


@router.get("/items/{item_id}", response_model=ItemDetail, summary="An item with every verdict, review and image link")
def get_item(item_id: ItemId, request: Request, key: ReviewKey, session: SessionDep, settings: SettingsDep) -> ItemDetail:
    return _detail(request, key, _load_item(session, item_id, key), settings.image_link_ttl_s)


@router.get(
    "/items/{item_id}/image", name="item_image", summary="The item's image (thumbnail or full size)",
    responses={200: {"content": {"image/*": {}}}, 403: {}, 404: {}, 422: {}},
)
def item_image(
    item_id: ItemId, request: Request, session: SessionDep, settings: SettingsDep, storage: StorageDep,
    variant: Literal["thumb", "full"] = Query("full"),
) -> Response:
    item = _visible_item(session, item_id, link_or_key(request, session, item_id, variant))
    if variant == "thumb":
        # Made once and kept next to the heatmaps: a reviewer's page never costs a full decode per view.
        try:
            cached = storage.get(settings.upload_bucket, thumbnail_key(item.id), settings.max_upload_bytes)
            return Response(cached, media_type="image/jpeg", headers=_IMAGE_HEADERS)
        except ObjectNotFound:
            pass
    data = storage.get(item.bucket, item.key, settings.max_upload_bytes)
    limits = settings.image_limits
    if variant == "full":
        return Response(data, media_type=probe_image(data, limits).mime, headers=_IMAGE_HEADERS)
    image = decode_image(data, limits, target=(THUMBNAIL_SIDE, THUMBNAIL_SIDE), budget=_decode_budget(request))
    image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=82)
    thumbnail = buffer.getvalue()
    try:
        storage.put(settings.upload_bucket, thumbnail_key(item.id), thumbnail, content_type="image/jpeg")
    except StorageError:
        pass  # served anyway; the next view makes it again
    return Response(thumbnail, media_type="image/jpeg", headers=_IMAGE_HEADERS)


def _decode_budget(request: Request) -> DecodeBudget:
    """One decode budget per API process, shared by its request threads."""
    state = request.app.state
    budget = getattr(state, "decode_budget", None)
    if budget is None:
        budget = state.decode_budget = DecodeBudget(state.settings.decode_budget_pixels)
    return budget


@router.get(
    "/items/{item_id}/heatmap", name="item_heatmap", summary="Heatmap of where the model looked (Grad-CAM or occlusion map; 202 while pending)",
    responses={200: {"content": {"image/png": {}}}, 202: {}, 403: {}, 404: {}, 409: {}},
)
def item_heatmap(
    item_id: ItemId, request: Request, session: SessionDep, settings: SettingsDep, storage: StorageDep,
    celery: CeleryDep, model_version: str | None = Query(None, max_length=128),
) -> Response:
    item = _visible_item(session, item_id, link_or_key(request, session, item_id, "heatmap"))
    version = model_version or item.model_version
    if version is None:
        raise Conflict(f"item {item_id} has no verdict yet", code="not_classified")
    try:
        png = storage.get(settings.upload_bucket, heatmap_key(item_id, version), settings.max_upload_bytes)
        return Response(png, media_type="image/png", headers=_IMAGE_HEADERS)
    except ObjectNotFound:
        pass
    requested: dict = request.app.state.heatmaps_requested
    now = time.monotonic()
    if now - requested.get((item_id, version), -_HEATMAP_REQUEST_EVERY_S) >= _HEATMAP_REQUEST_EVERY_S:
        try:
            send_events(celery, settings, HEATMAP_TASK, [[item_id, version]])
        except Exception as exc:  # any broker fault: tell the reviewer, not a 500
            raise Unavailable("cannot queue the heatmap now", code="broker_unavailable") from exc
        requested[(item_id, version)] = now
    return JSONResponse(
        {"status": "pending", "model_version": version, "message": "the heatmap is being made; ask again shortly"},
        status_code=status.HTTP_202_ACCEPTED, headers={"Retry-After": "1"},
    )


@router.post(
    "/items/{item_id}/reviews", response_model=ReviewOut, status_code=status.HTTP_201_CREATED,
    responses={200: {"description": "A repeated Idempotency-Key: the first review"}, 404: {}, 409: {}},
    summary="Record a decision (append-only; the latest one is the item's current decision)",
)
def add_review(
    item_id: ItemId, body: ReviewIn, key: ReviewKey, session: SessionDep, settings: SettingsDep, celery: CeleryDep,
    idempotency_key: str | None = Header(None, max_length=64),
):
    review, created = reviews.record_review(
        session, item_id, key, body.decision, body.note, idempotency_key, visible=access(key).review_filter()
    )
    if created and _wants_callback(session, settings, review.item):
        # The delivery task must find the review: send it once the request's transaction has committed.
        after_commit(session, lambda: enqueue_events(celery, settings, [(EVENT_REVIEW, item_id, str(review.id))]))
    out = ReviewOut.of(review)
    return JSONResponse(out.model_dump(mode="json"), status_code=status.HTTP_201_CREATED if created else status.HTTP_200_OK)


@router.post(
    "/items/{item_id}/reviews/{review_id}/retract", response_model=ReviewOut, status_code=status.HTTP_201_CREATED,
    responses={403: {}, 404: {}, 409: {}},
    summary="Undo the item's current decision (appends a retraction); by its author or an admin key",
)
def retract_review(
    item_id: ItemId, review_id: Annotated[int, Path(ge=1, le=2**31 - 1)], key: RetractKey, session: SessionDep, settings: SettingsDep, celery: CeleryDep,
    body: RetractIn | None = None,
) -> ReviewOut:
    retraction = reviews.retract_review(
        session, item_id, review_id, key, body.note if body else None, visible=access(key).review_filter()
    )
    if _wants_callback(session, settings, retraction.item):
        after_commit(
            session, lambda: enqueue_events(celery, settings, [(EVENT_RETRACTION, item_id, str(retraction.id))])
        )
    return ReviewOut.of(retraction)


@router.post("/queue/claim", response_model=ClaimOut, summary="Lease the next unreviewed flagged items, highest score first")
def claim(request: Request, body: ClaimIn, key: ReviewKey, session: SessionDep, settings: SettingsDep) -> ClaimOut:
    limit = min(body.limit, settings.claim_max)
    items = reviews.claim_items(
        session, key, limit, settings.claim_lease_s, settings.review_band, visible=access(key).review_filter()
    )
    ttl = settings.image_link_ttl_s
    return ClaimOut(
        items=[_summary(request, key, item, ttl) for item in items], lease_s=settings.claim_lease_s,
        claimed_until=items[0].claimed_until if items else None,
    )


@router.post("/queue/release", summary="Give back items this key has claimed")
def release(body: ReleaseIn, key: ReviewKey, session: SessionDep) -> dict:
    return {"released": reviews.release_items(session, key, body.ids)}


@router.get("/stats", summary="Counts by label, status, decision and day; agreement; backlogs")
def stats(
    key: ReviewKey, session: SessionDep, settings: SettingsDep,
    since: QueryTime | None = Query(None, description="Items created at or after (ISO 8601; UTC if no zone)."),
    until: QueryTime | None = Query(None, description="Items created before."),
) -> dict:
    return reviews.stats(session, settings.review_band, _utc(since), _utc(until), visible=access(key).review_filter())
