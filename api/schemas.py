"""JSON shapes of the HTTP API."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field

from dfmod.db import Item, Verdict


class ErrorBody(BaseModel):
    error: str = Field(description="Machine-readable code, e.g. not_an_image, too_large, bucket_not_allowed.")
    message: str


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

    @classmethod
    def of(cls, verdict: Verdict) -> "VerdictOut":
        return cls(
            label=verdict.label, fake_probability=verdict.fake_probability, threshold=verdict.threshold,
            model_version=verdict.model_version, inference_ms=verdict.inference_ms, batch_size=verdict.batch_size,
            device=verdict.device, reused_from=verdict.reused_from_item_id, created_at=verdict.created_at,
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
    def of(cls, item: Item, with_verdicts: bool = True) -> "ItemOut":
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
    duplicate: bool = Field(False, description="True when this object was already recorded.")


class RegisterIn(BaseModel):
    bucket: str = Field(min_length=1, max_length=255)
    key: str = Field(min_length=1, max_length=1024)
    source: str | None = Field(None, max_length=255, description="Free-form origin, e.g. the platform's name.")


class EventRecordResult(BaseModel):
    bucket: str | None = None
    key: str | None = None
    id: str | None = None
    status: str = Field(description="accepted, duplicate, ignored or rejected")
    reason: str | None = None


class EventsOut(BaseModel):
    accepted: int
    duplicates: int
    ignored: int
    rejected: int
    records: list[EventRecordResult]
