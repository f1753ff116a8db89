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
from typing import Any
from urllib.parse import unquote_plus

from fastapi import APIRouter, File, Form, Header, Request, UploadFile, status
from fastapi.responses import JSONResponse
from sqlalchemy import select
from sqlalchemy.orm import selectinload

from api.auth import IngestKey, ReadKey, access, not_found
from api.deps import CeleryDep, SessionDep, SettingsDep, StorageDep
from api.schemas import Accepted, EventRecordResult, EventsOut, ItemOut, RegisterIn
from dfmod.db import Item
from dfmod.errors import DfmodError, NotFound
from dfmod.imaging import probe_image
from dfmod.db import session_scope
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
    source: str = Form("upload", max_length=255, description="Free-form origin, e.g. the platform's name."),
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
    if not isinstance(record, dict):
        return None, EventRecordResult(status="rejected", reason="malformed_record")
    event_name = str(record.get("eventName", ""))
    s3 = record.get("s3")
    if not isinstance(s3, dict) or not isinstance(s3.get("bucket"), dict) or not isinstance(s3.get("object"), dict):
        return None, EventRecordResult(status="rejected", reason="malformed_record")
    bucket = s3["bucket"].get("name")
    raw_key = s3["object"].get("key")
    if not isinstance(bucket, str) or not isinstance(raw_key, str) or not bucket or not raw_key:
        return None, EventRecordResult(status="rejected", reason="malformed_record")
    # S3 and MinIO URL-encode keys in notifications, with '+' for spaces.
    key = unquote_plus(raw_key)
    if not event_name.removeprefix("s3:").startswith("ObjectCreated:"):
        return None, EventRecordResult(bucket=bucket, key=key, status="ignored", reason=f"event {event_name or '?'}")
    if not may_ingest(request.app.state.buckets, tenant_id, bucket, key):
        return None, EventRecordResult(bucket=bucket, key=key, status="rejected", reason="bucket_not_allowed")
    try:
        validate_key(key)
    except StorageError as exc:
        return None, EventRecordResult(bucket=bucket, key=key, status="rejected", reason=exc.reason)
    obj = s3["object"]
    etag = str(obj.get("eTag") or obj.get("etag") or "").strip('"') or None
    version_id = obj.get("versionId") or obj.get("versionid") or None
    size = obj.get("size")
    new = NewItem(
        bucket=bucket, key=key, version=str(version_id or etag or ""), etag=etag,
        size=int(size) if isinstance(size, (int, float)) else None,
        content_type=obj.get("contentType") if isinstance(obj.get("contentType"), str) else None,
        source=f"s3:{bucket}", ingest="s3-event", tenant_id=tenant_id,
    )
    return new, None


@router.post(
    "/events/s3",
    response_model=EventsOut,
    responses={400: {}, 401: {}, 404: {}},
    summary="S3 / MinIO bucket notifications (ObjectCreated:*)",
)
async def s3_events(
    request: Request, settings: SettingsDep, authorization: str | None = Header(None),
):
    from starlette.concurrency import run_in_threadpool

    tenant_id = await run_in_threadpool(_event_tenant, request, settings, authorization)
    try:
        payload = await request.json()
    except ValueError as exc:
        raise DfmodError("body is not JSON", code="malformed_event") from exc
    if isinstance(payload, dict) and "Records" not in payload and payload.get("Event") == "s3:TestEvent":
        return EventsOut(accepted=0, duplicates=0, ignored=1, rejected=0, records=[EventRecordResult(status="ignored", reason="test event")])
    records = payload.get("Records") if isinstance(payload, dict) else None
    if not isinstance(records, list) or not records:
        raise DfmodError("expected an S3 notification with Records[]", code="malformed_event")
    # Database and broker calls are blocking: run them off the event loop.
    return await run_in_threadpool(_record_events, request, settings, records, tenant_id)


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
    for (index, new), rec in zip(to_record, recorded):
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
    if counts["accepted"]:
        code = status.HTTP_202_ACCEPTED
    return JSONResponse(body.model_dump(mode="json"), status_code=code)


@router.get("/images/{item_id}", response_model=ItemOut, responses={404: {}}, summary="An item's status and verdict")
def get_image(item_id: str, key: ReadKey, session: SessionDep) -> ItemOut:
    item = session.scalars(select(Item).where(Item.id == item_id).options(selectinload(Item.verdicts))).first()
    if item is None or not access(key).can_read(item.tenant_id):
        raise not_found(item_id)
    return ItemOut.of(item)
