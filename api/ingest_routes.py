"""Ingest and status endpoints: uploads, S3/MinIO notifications, registrations, item lookups.

Every ingest path does the same three things and nothing more: validate cheaply (headers, sizes, buckets,
keys), record the item in the database (idempotently), enqueue its id. Classification happens in the
workers; the API never loads the model.

Uploads and registrations need a key with the ``ingest`` scope, and record into that key's tenant; reading
an item's status needs ``ingest`` (own tenant) or ``review`` (the key's tenants). S3 notifications
authenticate with their tenant's events token (``DFMOD_S3_EVENT_TOKEN`` is the default tenant's). A bucket
belongs to one tenant: registrations and events naming another tenant's bucket are refused.
"""

from __future__ import annotations

import hashlib
import mimetypes
import uuid
from datetime import datetime, timezone
from typing import Annotated, Any
from urllib.parse import unquote_plus

from fastapi import APIRouter, File, Form, Header, Request, UploadFile, status
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import selectinload

from api.auth import IngestKey, ReadKey, access, not_found
from api.deps import CeleryDep, SessionDep, SettingsDep, StorageDep
from api.schemas import (
    MAX_EVENT_RECORDS,
    Accepted,
    EventRecordResult,
    EventsOut,
    ItemId,
    ItemOut,
    RegisterIn,
    S3Notification,
    S3Record,
    SourceLabel,
)
from dfmod.db import Item, session_scope
from dfmod.errors import DfmodError, NotFound
from dfmod.imaging import probe_image
from dfmod.lifecycle import NewItem, record_and_enqueue
from dfmod.storage import BucketNotAllowed, ObjectTooLarge, StorageError, validate_key
from dfmod.tenants import events_enabled, may_ingest, tenant_for_events_token

router = APIRouter(prefix="/v1")

_EXTENSIONS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tif"}


def _accepted_response(request: Request, recorded) -> JSONResponse:
    item = recorded.item
    body = Accepted(
        id=item.id, status=item.status.value, duplicate=not recorded.created or recorded.duplicate_of is not None,
        duplicate_of=recorded.duplicate_of,
    )
    return JSONResponse(
        body.model_dump(), status_code=status.HTTP_202_ACCEPTED if recorded.created else status.HTTP_200_OK,
        headers={"Location": str(request.url_for("get_image", item_id=item.id))},
    )


@router.post(
    "/images",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=Accepted,
    responses={413: {}, 415: {}, 422: {}, 503: {}},
    summary="Upload an image for classification",
)
def upload_image(
    request: Request,
    key: IngestKey,
    settings: SettingsDep,
    session: SessionDep,
    storage: StorageDep,
    celery: CeleryDep,
    file: UploadFile = File(..., description="The image (JPEG, PNG, WebP, GIF, BMP, TIFF)."),
    source: Annotated[SourceLabel, Form(description="Free-form origin, e.g. the platform's name.")] = "upload",
):
    data = file.file.read(settings.max_upload_bytes + 1)
    limits = settings.image_limits
    probe = probe_image(data, limits)
    sha256 = hashlib.sha256(data).hexdigest()
    now = datetime.now(timezone.utc)
    object_key = f"uploads/{now:%Y/%m/%d}/{uuid.uuid4().hex}.{_EXTENSIONS.get(probe.format, 'bin')}"
    info = storage.put(settings.upload_bucket, object_key, data, content_type=probe.mime)
    [recorded] = record_and_enqueue(
        session, request.app.state.session_factory, celery, settings,
        [
            NewItem(
                bucket=settings.upload_bucket, key=object_key, version=info.version_id or "", etag=info.etag,
                sha256=sha256, size=len(data), content_type=probe.mime, source=source, ingest="upload",
                tenant_id=key.tenant_id,
            )
        ],
    )
    return _accepted_response(request, recorded)


@router.post(
    "/images:register",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=Accepted,
    responses={400: {}, 403: {}, 404: {}, 503: {}},
    summary="Classify an object already stored in a configured bucket",
)
def register_image(
    request: Request, key: IngestKey, body: RegisterIn, settings: SettingsDep, session: SessionDep, storage: StorageDep,
    celery: CeleryDep,
):
    # Checked before the object is looked at, so another tenant's bucket cannot even be probed.
    if not may_ingest(request.app.state.buckets, key.tenant_id, body.bucket, body.key):
        raise _bucket_not_allowed(body.bucket)
    validate_key(body.key)
    info = storage.head(body.bucket, body.key)
    if info.size > settings.max_upload_bytes:
        raise ObjectTooLarge(f"{info.size} bytes exceeds the limit of {settings.max_upload_bytes}")
    [recorded] = record_and_enqueue(
        session, request.app.state.session_factory, celery, settings,
        [
            NewItem(
                bucket=body.bucket, key=body.key, version=info.version_id or info.etag or "", etag=info.etag,
                size=info.size, content_type=info.content_type or mimetypes.guess_type(body.key)[0],
                source=body.source or "register", ingest="register", tenant_id=key.tenant_id,
            )
        ],
    )
    if recorded.item.tenant_id != key.tenant_id:  # the object is another tenant's item already
        raise _bucket_not_allowed(body.bucket)
    return _accepted_response(request, recorded)


def _bucket_not_allowed(bucket: str) -> BucketNotAllowed:
    return BucketNotAllowed(f"bucket {bucket!r} is not one of this tenant's buckets")


def _event_tenant(request: Request, settings, authorization: str | None) -> str:
    """The tenant whose events token was presented (its id), or the 404/401 answer."""
    presented = (authorization or "").strip()
    # MinIO sends its auth_token verbatim, so accept both "Bearer TOKEN" and a bare "TOKEN".
    if presented.lower().startswith("bearer "):
        presented = presented[7:].strip()
    with session_scope(request.app.state.session_factory) as session:
        tenant = tenant_for_events_token(session, settings, presented) if presented else None
        if tenant is None and not events_enabled(session, settings):
            raise NotFound(
                "no events token is configured: set DFMOD_S3_EVENT_TOKEN or create a tenant", code="events_disabled"
            )
        if tenant is None:
            raise DfmodError("missing or wrong event token", code="unauthorized", http_status=status.HTTP_401_UNAUTHORIZED)
        return tenant.id


def _parse_record(request: Request, record: Any, tenant_id: str) -> tuple[NewItem | None, EventRecordResult | None]:
    """One notification record -> an item to record, or the reason it is ignored or rejected."""
    try:
        parsed = S3Record.model_validate(record)
    except ValidationError:
        return None, EventRecordResult(status="rejected", reason="malformed_record")
    bucket, obj = parsed.s3.bucket.name, parsed.s3.object
    # S3 and MinIO URL-encode keys in notifications, with '+' for spaces.
    key = unquote_plus(obj.key)
    if not parsed.event_name.removeprefix("s3:").startswith("ObjectCreated:"):
        return None, EventRecordResult(
            bucket=bucket, key=key, status="ignored", reason=f"event {parsed.event_name[:128] or '?'}"
        )
    try:
        validate_key(key)
    except StorageError as exc:
        return None, EventRecordResult(bucket=bucket, status="rejected", reason=exc.reason)
    if not may_ingest(request.app.state.buckets, tenant_id, bucket, key):
        return None, EventRecordResult(bucket=bucket, key=key, status="rejected", reason="bucket_not_allowed")
    etag = (obj.etag or "").strip('"') or None
    new = NewItem(
        bucket=bucket, key=key, version=obj.version_id or etag or "", etag=etag, size=obj.size,
        content_type=obj.content_type, source=f"s3:{bucket}", ingest="s3-event", tenant_id=tenant_id,
    )
    return new, None


@router.post(
    "/events/s3",
    response_model=EventsOut,
    responses={400: {}, 401: {}, 404: {}, 413: {}},
    summary="S3 / MinIO bucket notifications (ObjectCreated:*)",
)
async def s3_events(
    request: Request, settings: SettingsDep, authorization: str | None = Header(None),
):
    from starlette.concurrency import run_in_threadpool

    tenant_id = await run_in_threadpool(_event_tenant, request, settings, authorization)
    body = await request.body()  # bounded by the body-limit middleware
    try:
        payload = S3Notification.model_validate_json(body)
    except ValidationError as exc:
        if "too_long" in {error["type"] for error in exc.errors()}:
            raise DfmodError(
                f"at most {MAX_EVENT_RECORDS} records per call; split the notification", code="too_many_records",
                http_status=status.HTTP_413_CONTENT_TOO_LARGE,
            ) from exc
        raise DfmodError(
            "expected an S3 notification: a JSON object with Records[] (nested at most 200 levels deep)",
            code="malformed_event",
        ) from exc
    if payload.records is None and payload.event == "s3:TestEvent":
        return EventsOut(accepted=0, duplicates=0, ignored=1, rejected=0, records=[EventRecordResult(status="ignored", reason="test event")])
    if not payload.records:
        raise DfmodError("expected an S3 notification with Records[]", code="malformed_event")
    # Database and broker calls are blocking: run them off the event loop.
    return await run_in_threadpool(_record_events, request, settings, payload.records, tenant_id)


def _record_events(request: Request, settings, records: list, tenant_id: str) -> JSONResponse:
    results: list[EventRecordResult | None] = []
    to_record: list[tuple[int, NewItem]] = []
    for index, record in enumerate(records):
        new, result = _parse_record(request, record, tenant_id)
        results.append(result)
        if new is not None:
            to_record.append((index, new))
    factory = request.app.state.session_factory
    with session_scope(factory) as session:
        recorded = record_and_enqueue(
            session, factory, request.app.state.celery, settings, [new for _, new in to_record]
        )
    for (index, new), rec in zip(to_record, recorded, strict=True):
        if rec.item.tenant_id != tenant_id:  # another tenant's item already: refuse, and name nothing
            results[index] = EventRecordResult(bucket=new.bucket, key=new.key, status="rejected", reason="bucket_not_allowed")
            continue
        results[index] = EventRecordResult(
            bucket=new.bucket, key=new.key, id=rec.item.id, status="accepted" if rec.created else "duplicate"
        )
    final = [r for r in results if r is not None]
    counts = {name: sum(1 for r in final if r.status == name) for name in ("accepted", "duplicate", "ignored", "rejected")}
    body = EventsOut(
        accepted=counts["accepted"], duplicates=counts["duplicate"], ignored=counts["ignored"],
        rejected=counts["rejected"], records=final,
    )
    # All records rejected: tell the sender clearly (4xx) rather than pretending it worked.
    code = status.HTTP_400_BAD_REQUEST if counts["rejected"] == len(final) else status.HTTP_200_OK
    if code == status.HTTP_400_BAD_REQUEST:
        # The error shape too, so a sender that only reads "error" sees that nothing was accepted.
        body.error = "all_records_rejected"
        body.message = f"none of the {len(final)} record(s) was accepted; see records[].reason"
    if counts["accepted"]:
        code = status.HTTP_202_ACCEPTED
    return JSONResponse(body.model_dump(mode="json", exclude_none=True), status_code=code)


@router.get("/images/{item_id}", response_model=ItemOut, responses={404: {}}, summary="An item's status and verdict")
def get_image(item_id: ItemId, key: ReadKey, session: SessionDep) -> ItemOut:
    item = session.scalars(select(Item).where(Item.id == item_id).options(selectinload(Item.verdicts))).first()
    if item is None or not access(key).can_read(item.tenant_id):
        raise not_found(item_id)
    return ItemOut.of(item)
