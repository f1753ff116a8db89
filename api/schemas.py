"""JSON shapes of the HTTP API."""

from __future__ import annotations

import math
from datetime import datetime, timezone
from typing import Annotated, Any, Literal

from fastapi import Path
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

from dfmod.db import ApiKey, Item, Review, Tenant, Verdict

# --- edge types: what the database columns and the stores can hold --------------------------------


def _storable_text(value: str) -> str:
    # Postgres text cannot hold NUL, and a lone surrogate cannot be encoded at all (nor sent back in a
    # response): refuse both here rather than fail later in the database or the serialiser.
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text (no lone surrogates)") from None
    return value


StorableText = Annotated[str, AfterValidator(_storable_text)]
"""Any string that can be stored and echoed: no NUL, no lone surrogates (length set per field)."""

# The columns' sizes (dfmod.db): String(255) for buckets and sources, String(1024) for keys.
BucketName = Annotated[StorableText, Field(min_length=1, max_length=255)]
ObjectKey = Annotated[StorableText, Field(min_length=1, max_length=1024)]
SourceLabel = Annotated[StorableText, Field(min_length=1, max_length=255)]
ItemId = Annotated[StorableText, Path(max_length=36, description="The item's id.")]


def _utc_instant(value: datetime) -> datetime:
    # A time without a zone is read as UTC, the zone every stored timestamp is in. A time whose UTC
    # equivalent leaves the calendar (0001-01-01T00:00:00+14:00) is not a time any item can have.
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    try:
        return value.astimezone(timezone.utc)
    except OverflowError:
        raise ValueError("the time is outside the representable calendar once converted to UTC") from None


QueryTime = Annotated[datetime, AfterValidator(_utc_instant)]
"""An ISO 8601 time for filters, normalised to UTC."""


class FaceOut(BaseModel):
    """A face the face stage found: its box in pixels of the image as uploaded (EXIF orientation applied)."""

    x0: int
    y0: int
    x1: int
    y1: int
    detector_score: float
    fake_probability: float


class VerdictOut(BaseModel):
    label: str
    fake_probability: float
    threshold: float
    model_version: str
    inference_ms: float | None = None
    batch_size: int | None = None
    device: str | None = None
    reused_from: str | None = None
    created_at: datetime
    faces: list[FaceOut] | None = Field(
        None, description="Face stage: every face found, most confident first; the verdict is the most-fake one's. "
        "Null for a verdict on the whole image.",
    )

    @classmethod
    def of(cls, verdict: Verdict) -> VerdictOut:
        faces = None
        if verdict.model_version.endswith("+faces"):
            faces = [
                FaceOut(x0=f.x0, y0=f.y0, x1=f.x1, y1=f.y1, detector_score=f.detector_score,
                        fake_probability=f.fake_probability)
                for f in verdict.item.faces
                if f.model_version == verdict.model_version
            ]
        return cls(
            label=verdict.label, fake_probability=verdict.fake_probability, threshold=verdict.threshold,
            model_version=verdict.model_version, inference_ms=verdict.inference_ms, batch_size=verdict.batch_size,
            device=verdict.device, reused_from=verdict.reused_from_item_id, created_at=verdict.created_at, faces=faces,
        )


class ItemOut(BaseModel):
    id: str
    status: str
    bucket: str
    key: str
    source: str
    ingest: str
    sha256: str | None = None
    size: int | None = None
    content_type: str | None = None
    reason: str | None = Field(None, description="Why a failed item failed (machine-readable).")
    reason_detail: str | None = None
    attempts: int
    created_at: datetime
    updated_at: datetime
    classified_at: datetime | None = None
    verdict: VerdictOut | None = Field(None, description="The newest verdict, once classified.")
    verdicts: list[VerdictOut] = Field(default_factory=list, description="One per model version.")

    @classmethod
    def of(cls, item: Item, with_verdicts: bool = True) -> ItemOut:
        verdicts = [VerdictOut.of(v) for v in sorted(item.verdicts, key=lambda v: v.created_at)] if with_verdicts else []
        return cls(
            id=item.id, status=item.status.value, bucket=item.bucket, key=item.key, source=item.source,
            ingest=item.ingest, sha256=item.sha256, size=item.size, content_type=item.content_type,
            reason=item.failure_reason if item.status.value == "failed" else None,
            reason_detail=item.failure_detail if item.status.value == "failed" else None,
            attempts=item.attempts, created_at=item.created_at, updated_at=item.updated_at,
            classified_at=item.classified_at, verdict=verdicts[-1] if verdicts else None, verdicts=verdicts,
        )


class Accepted(BaseModel):
    id: str
    status: str
    duplicate: bool = Field(
        False,
        description="True when there is nothing new to classify: the same object was already recorded (the same "
        "id comes back, 200), or identical bytes were (a new item, 202, whose verdict is copied from duplicate_of).",
    )
    duplicate_of: str | None = Field(
        None, description="The earlier item with identical bytes (sha256) whose verdict this item reuses."
    )


class RegisterIn(BaseModel):
    bucket: BucketName
    key: ObjectKey
    source: SourceLabel | None = Field(None, description="Free-form origin, e.g. the platform's name.")


# --- S3 / MinIO notifications ---------------------------------------------------------------------

MAX_EVENT_RECORDS = 1000
"""Records one notification call may carry (S3 sends one per call; MinIO batches at most a few hundred)."""


def _no_float_size(value: Any) -> Any:
    # Object sizes are whole bytes: 1e308, Infinity and NaN are not sizes (JSON numbers arrive as floats).
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        raise ValueError("size must be a whole number of bytes")
    return value


class S3Bucket(BaseModel):
    name: BucketName


class S3Object(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    key: ObjectKey
    size: Annotated[int | None, BeforeValidator(_no_float_size)] = Field(None, ge=0, le=2**53)
    etag: Annotated[StorableText, Field(max_length=255)] | None = Field(None, alias="eTag")
    version_id: Annotated[StorableText, Field(max_length=255)] | None = Field(None, alias="versionId")
    content_type: Annotated[StorableText, Field(max_length=255)] | None = Field(None, alias="contentType")


class S3Entity(BaseModel):
    bucket: S3Bucket
    object: S3Object


class S3Record(BaseModel):
    """One record of an S3/MinIO notification; a record that does not fit is rejected on its own."""

    event_name: Annotated[StorableText, Field(max_length=128)] = Field("", alias="eventName")
    s3: S3Entity


class S3Notification(BaseModel):
    """The envelope: ``Records`` (each validated separately, see :class:`S3Record`) or a test event."""

    records: list[Any] | None = Field(None, alias="Records", max_length=MAX_EVENT_RECORDS)
    event: Annotated[StorableText, Field(max_length=128)] | None = Field(None, alias="Event")


class EventRecordResult(BaseModel):
    bucket: str | None = None
    key: str | None = None
    id: str | None = None
    status: str = Field(description="accepted, duplicate, ignored or rejected")
    reason: str | None = None


class EventsOut(BaseModel):
    error: str | None = Field(None, description="Set (e.g. all_records_rejected) when no record was accepted.")
    message: str | None = None
    accepted: int
    duplicates: int
    ignored: int
    rejected: int
    records: list[EventRecordResult]


# --- review ----------------------------------------------------------------------------------------

Decision = Literal["confirmed_fake", "overturned_real", "escalated"]


class ReviewOut(BaseModel):
    id: int
    decision: str = Field(description="confirmed_fake, overturned_real, escalated, or retracted (an undo).")
    note: str | None = None
    reviewer: str = Field(description="Name of the API key that made the review.")
    retracts: int | None = Field(None, description="For a retraction: the review it undoes.")
    retracted: bool = Field(False, description="True once a later retraction undid this review.")
    model_label: str | None = None
    model_score: float | None = None
    created_at: datetime

    @classmethod
    def of(cls, review: Review, retracted: bool = False) -> ReviewOut:
        return cls(
            id=review.id, decision=review.decision, note=review.note, reviewer=review.reviewer,
            retracts=review.retracts_id, retracted=retracted, model_label=review.model_label,
            model_score=review.model_score, created_at=review.created_at,
        )


class ItemSummary(BaseModel):
    id: str
    status: str
    source: str
    created_at: datetime
    score: float | None = Field(None, description="Fake probability of the newest verdict.")
    label: str | None = None
    threshold: float | None = None
    flagged: bool = Field(False, description="score >= threshold.")
    model_version: str | None = None
    decision: str | None = Field(None, description="Current review decision (latest review not retracted).")
    decided_by: str | None = None
    decided_at: datetime | None = None
    claimed_by: str | None = None
    claimed_until: datetime | None = None
    thumbnail_url: str | None = Field(None, description="Signed link to a thumbnail, valid a few minutes.")
    sha256: str | None = Field(None, description="SHA-256 of the bytes: equal for identical uploads (the review page marks them).")

    @classmethod
    def of(cls, item: Item, thumbnail_url: str | None = None) -> ItemSummary:
        return cls(
            id=item.id, status=item.status.value, source=item.source, created_at=item.created_at, score=item.score,
            label=item.label, threshold=item.threshold,
            flagged=item.score is not None and item.threshold is not None and item.score >= item.threshold,
            model_version=item.model_version, decision=item.decision, decided_by=item.decided_by,
            decided_at=item.decided_at, claimed_by=item.claimed_by, claimed_until=item.claimed_until,
            thumbnail_url=thumbnail_url, sha256=item.sha256,
        )


class ItemPage(BaseModel):
    items: list[ItemSummary]
    next_cursor: str | None = Field(None, description="Pass as ?cursor= for the next page; null on the last page.")


class ItemDetail(ItemSummary):
    bucket: str
    key: str
    ingest: str
    size: int | None = None
    content_type: str | None = None
    classified_at: datetime | None = None
    verdicts: list[VerdictOut] = Field(default_factory=list, description="One per model version, oldest first.")
    reviews: list[ReviewOut] = Field(default_factory=list, description="Every review, oldest first (append-only).")
    image_url: str = Field(description="Signed link to the full-size image, valid a few minutes.")
    heatmap_url: str | None = Field(None, description="Signed link to the heatmap: Grad-CAM on torch workers, an occlusion map otherwise (202 while it is made).")


class ReviewIn(BaseModel):
    decision: Decision
    note: Annotated[StorableText, Field(max_length=4000)] | None = None


class RetractIn(BaseModel):
    note: Annotated[StorableText, Field(max_length=4000)] | None = None


class ClaimIn(BaseModel):
    limit: int = Field(10, ge=1, le=500, description="How many items to lease (capped by DFMOD_CLAIM_MAX).")


class ClaimOut(BaseModel):
    items: list[ItemSummary]
    lease_s: int
    claimed_until: datetime | None = None


class ReleaseIn(BaseModel):
    ids: list[Annotated[StorableText, Field(max_length=36)]] = Field(max_length=500)


# --- keys ------------------------------------------------------------------------------------------


class KeyIn(BaseModel):
    name: Annotated[StorableText, Field(min_length=1, max_length=255)]
    scopes: list[Literal["ingest", "review", "admin"]] = Field(min_length=1)
    tenants: list[str] = Field(
        default_factory=list, max_length=100,
        description="Tenant names or ids: an ingest key's one tenant (default: default); a review key's tenants (none: global).",
    )


class KeyOut(BaseModel):
    id: str
    name: str
    prefix: str = Field(description="The key's first characters, to recognise it; the key itself is never shown again.")
    scopes: list[str]
    tenant: str | None = Field(None, description="The tenant an ingest key records into (null: a global key).")
    tenants: list[str] = Field(default_factory=list, description="The tenants the key may review (empty: all).")
    created_at: datetime
    last_used_at: datetime | None = None
    revoked_at: datetime | None = None

    @classmethod
    def of(cls, key: ApiKey) -> KeyOut:
        return cls(
            id=key.id, name=key.name, prefix=key.prefix, scopes=sorted(key.scope_set),
            tenant=key.tenant.name if key.tenant is not None else None,
            tenants=[tenant.name for tenant in key.review_tenants], created_at=key.created_at,
            last_used_at=key.last_used_at, revoked_at=key.revoked_at,
        )


class KeyCreated(KeyOut):
    key: str = Field(description="The API key. Shown once: only its hash is stored.")


class WhoAmI(BaseModel):
    id: str
    name: str
    scopes: list[str]
    tenant: str | None = None
    tenants: list[str] = Field(default_factory=list, description="Tenants this key may review (empty: all).")


# --- tenants ---------------------------------------------------------------------------------------


class TenantIn(BaseModel):
    name: str = Field(min_length=1, max_length=64, description="a-z 0-9 . _ -")
    callback_url: str | None = Field(None, max_length=2048)
    buckets: list[str] = Field(default_factory=list, max_length=100)
    threshold: float | None = Field(None, ge=0.0, le=1.0)
    review_band: float | None = Field(None, ge=0.0, le=1.0)


class TenantPatch(BaseModel):
    """Only the fields sent change; send null to clear a callback URL, threshold or band."""

    callback_url: str | None = Field(None, max_length=2048)
    threshold: float | None = Field(None, ge=0.0, le=1.0)
    review_band: float | None = Field(None, ge=0.0, le=1.0)
    add_buckets: list[str] = Field(default_factory=list, max_length=100)
    remove_buckets: list[str] = Field(default_factory=list, max_length=100)
    enabled: bool | None = None


class RotateSecretIn(BaseModel):
    overlap_s: int = Field(86400, ge=0, le=30 * 86400, description="How long the previous secret keeps signing too.")


class TenantOut(BaseModel):
    id: str
    name: str
    callback_url: str | None = None
    has_callback_secret: bool
    previous_secret_until: datetime | None = Field(None, description="End of a rotation's overlap (two signatures).")
    has_events_token: bool
    buckets: list[str]
    threshold: float | None = None
    review_band: float | None = None
    created_at: datetime
    disabled_at: datetime | None = None

    @classmethod
    def of(cls, tenant: Tenant) -> TenantOut:
        return cls(
            id=tenant.id, name=tenant.name, callback_url=tenant.callback_url,
            has_callback_secret=tenant.callback_secret_encrypted is not None,
            previous_secret_until=tenant.previous_secret_until, has_events_token=tenant.events_token_hash is not None,
            buckets=[row.bucket for row in tenant.buckets], threshold=tenant.threshold, review_band=tenant.review_band,
            created_at=tenant.created_at, disabled_at=tenant.disabled_at,
        )


class TenantCreated(TenantOut):
    events_token: str | None = Field(None, description="Bearer token of the tenant's S3 notifications. Shown once.")
    callback_secret: str | None = Field(None, description="HMAC key of the tenant's callbacks. Shown once.")
