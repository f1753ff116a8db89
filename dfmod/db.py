"""Database models and sessions: the source of truth for every tenant, item, verdict, review, API key and
callback.

The queue only carries item ids; what an item is, where its bytes live and what the model said about it
lives here. Writes are idempotent by construction: an item is unique on (bucket, key, version) and a
verdict on (item, model version), and both are written with ``INSERT ... ON CONFLICT DO NOTHING`` so a
message delivered twice yields one row.
"""

from __future__ import annotations

import enum
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import TypeVar

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    func,
    text,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, sessionmaker
from sqlalchemy.types import TypeDecorator

logger = logging.getLogger(__name__)
T = TypeVar("T")

# Stable constraint names, so Alembic revisions can refer to them on every backend.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def new_id() -> str:
    return str(uuid.uuid4())


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC timestamps on every backend (SQLite hands back naive datetimes otherwise)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime stored; use dfmod.db.utcnow()")
        return value.astimezone(timezone.utc) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


# The tenant that migration 0003 moves an existing deployment onto, and that the DFMOD_CALLBACK_* and
# DFMOD_S3_EVENT_TOKEN settings configure. A fixed id, so every process can name it without a lookup.
DEFAULT_TENANT_ID = "00000000-0000-0000-0000-000000000000"
DEFAULT_TENANT_NAME = "default"


class Tenant(Base):
    """A platform that dfmod serves: its items, keys, buckets, events token and callback are its own.

    Callback secrets are stored encrypted with ``DFMOD_SECRET_KEY`` (Fernet), so a database dump alone cannot
    sign a callback. During a rotation the previous secret stays valid until ``previous_secret_until`` and
    callbacks carry both signatures. The events token is stored as its SHA-256 (like API keys).
    """

    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    callback_url: Mapped[str | None] = mapped_column(String(2048))
    callback_secret_encrypted: Mapped[str | None] = mapped_column(Text)
    previous_secret_encrypted: Mapped[str | None] = mapped_column(Text)
    previous_secret_until: Mapped[datetime | None] = mapped_column(UTCDateTime())
    events_token_hash: Mapped[str | None] = mapped_column(String(64), unique=True)
    threshold: Mapped[float | None] = mapped_column(Float)
    review_band: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)
    disabled_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    buckets: Mapped[list[TenantBucket]] = relationship(
        back_populates="tenant", order_by="TenantBucket.bucket", cascade="all, delete-orphan"
    )

    @property
    def disabled(self) -> bool:
        return self.disabled_at is not None


class TenantBucket(Base):
    """A bucket whose objects a tenant may register or be notified about; a bucket belongs to one tenant."""

    __tablename__ = "tenant_buckets"

    bucket: Mapped[str] = mapped_column(String(255), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    tenant: Mapped[Tenant] = relationship(back_populates="buckets")


class ApiKeyTenant(Base):
    """The tenants a key may review; a key with none is global (see dfmod.tenants.Access)."""

    __tablename__ = "api_key_tenants"

    key_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id", ondelete="CASCADE"), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True)


class ItemStatus(str, enum.Enum):
    queued = "queued"
    processing = "processing"
    classified = "classified"
    failed = "failed"


class Item(Base):
    """One image submitted for moderation, wherever it came from (upload, S3 event, registration)."""

    __tablename__ = "items"
    __table_args__ = (
        UniqueConstraint("bucket", "key", "version", name="uq_items_bucket_key_version"),
        Index("ix_items_status_updated", "status", "updated_at"),
        Index("ix_items_sha256", "sha256"),
        Index("ix_items_created", "created_at", "id"),
        Index("ix_items_score", "score", "id"),
        Index("ix_items_decision_score", "decision", "score"),
        Index("ix_items_tenant_created", "tenant_id", "created_at", "id"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    # The server default keeps pre-tenant code working during a rolling upgrade (migration 0003).
    tenant_id: Mapped[str] = mapped_column(
        ForeignKey("tenants.id"), default=DEFAULT_TENANT_ID, server_default=DEFAULT_TENANT_ID
    )
    bucket: Mapped[str] = mapped_column(String(255))
    key: Mapped[str] = mapped_column(String(1024))
    # S3 version id, else the ETag, else "": one item per distinct object version, so a re-upload under the
    # same key is a new item while a duplicated notification for the same version is not.
    version: Mapped[str] = mapped_column(String(255), default="")
    etag: Mapped[str | None] = mapped_column(String(255))
    sha256: Mapped[str | None] = mapped_column(String(64))
    size: Mapped[int | None] = mapped_column(BigInteger)
    content_type: Mapped[str | None] = mapped_column(String(255))
    source: Mapped[str] = mapped_column(String(255), default="upload")
    ingest: Mapped[str] = mapped_column(String(32), default="upload")
    status: Mapped[ItemStatus] = mapped_column(
        Enum(ItemStatus, name="item_status", native_enum=False, length=16), default=ItemStatus.queued
    )
    failure_reason: Mapped[str | None] = mapped_column(String(64))
    failure_detail: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)
    enqueued_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    classified_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    # The newest verdict, copied here by the worker so reviewers can filter, sort and page on one table
    # with one index instead of joining and ranking verdicts per item.
    score: Mapped[float | None] = mapped_column(Float)
    label: Mapped[str | None] = mapped_column(String(16))
    threshold: Mapped[float | None] = mapped_column(Float)
    model_version: Mapped[str | None] = mapped_column(String(128))
    # The current review decision: that of the latest review that was not retracted (reviews table).
    decision: Mapped[str | None] = mapped_column(String(32))
    decided_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    decided_by: Mapped[str | None] = mapped_column(String(255))
    # Review-queue lease: who claimed the item and until when (see dfmod.review.claim_items).
    claimed_key_id: Mapped[str | None] = mapped_column(String(36))
    claimed_by: Mapped[str | None] = mapped_column(String(255))
    claimed_until: Mapped[datetime | None] = mapped_column(UTCDateTime())

    verdicts: Mapped[list[Verdict]] = relationship(
        back_populates="item", order_by="Verdict.created_at", cascade="all, delete-orphan"
    )
    reviews: Mapped[list[Review]] = relationship(
        back_populates="item", order_by="Review.id", cascade="all, delete-orphan"
    )
    # Face stage: every face of every model version (read-only here; the worker inserts them in bulk).
    faces: Mapped[list[VerdictFace]] = relationship(viewonly=True, order_by="VerdictFace.face_index")


class Verdict(Base):
    """What one model version said about one item. Unique per (item, model version)."""

    __tablename__ = "verdicts"
    __table_args__ = (
        UniqueConstraint("item_id", "model_version", name="uq_verdicts_item_model"),
        Index("ix_verdicts_model_sha", "model_version", "sha256"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    item_id: Mapped[str] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"))
    label: Mapped[str] = mapped_column(String(16))
    fake_probability: Mapped[float] = mapped_column(Float)
    threshold: Mapped[float] = mapped_column(Float)
    model_version: Mapped[str] = mapped_column(String(128))
    # Copied from the item so "same bytes, same model" is one index lookup.
    sha256: Mapped[str | None] = mapped_column(String(64))
    inference_ms: Mapped[float | None] = mapped_column(Float)
    batch_size: Mapped[int | None] = mapped_column(Integer)
    device: Mapped[str | None] = mapped_column(String(16))
    reused_from_item_id: Mapped[str | None] = mapped_column(String(36))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, server_default=func.now())

    item: Mapped[Item] = relationship(back_populates="verdicts")


class VerdictFace(Base):
    """One face the face stage found in an item's image, under one model version: its box (pixels of the
    decoded image), the face detector's score and the face's own fake probability. The verdict's score is the
    most-fake face's; reviewers see every face. Unique per (item, model version, face index)."""

    __tablename__ = "verdict_faces"
    __table_args__ = (UniqueConstraint("item_id", "model_version", "face_index", name="uq_verdict_faces_item_model_face"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    item_id: Mapped[str] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"))
    model_version: Mapped[str] = mapped_column(String(128))
    face_index: Mapped[int] = mapped_column(Integer)
    x0: Mapped[int] = mapped_column(Integer)
    y0: Mapped[int] = mapped_column(Integer)
    x1: Mapped[int] = mapped_column(Integer)
    y1: Mapped[int] = mapped_column(Integer)
    detector_score: Mapped[float] = mapped_column(Float)
    fake_probability: Mapped[float] = mapped_column(Float)


class ApiKey(Base):
    """An API key: a name, its scopes and the SHA-256 of the key (the key itself is shown once, never stored)."""

    __tablename__ = "api_keys"
    __table_args__ = (
        # A name names one live key; revoked keys keep theirs for the history of who reviewed what.
        Index(
            "uq_api_keys_active_name", "name", unique=True,
            postgresql_where=text("revoked_at IS NULL"), sqlite_where=text("revoked_at IS NULL"),
        ),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(255))
    # The tenant an ingest key records items into; None for global (admin, review) keys.
    tenant_id: Mapped[str | None] = mapped_column(ForeignKey("tenants.id"))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    scopes: Mapped[str] = mapped_column(String(255))  # comma-separated, sorted
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    tenant: Mapped[Tenant | None] = relationship(lazy="joined")
    review_tenants: Mapped[list[Tenant]] = relationship(secondary="api_key_tenants", lazy="selectin", order_by="Tenant.name")

    @property
    def scope_set(self) -> frozenset[str]:
        return frozenset(part for part in self.scopes.split(",") if part)


class Review(Base):
    """One reviewer decision on one item. Append-only: a retraction is a new row pointing at the one it undoes."""

    __tablename__ = "reviews"
    __table_args__ = (
        Index("ix_reviews_item", "item_id", "id"),
        # A client retrying a decision (Idempotency-Key) gets the first review back, not a second one.
        UniqueConstraint("key_id", "request_id", name="uq_reviews_key_request"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    item_id: Mapped[str] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"))
    decision: Mapped[str] = mapped_column(String(32))  # confirmed_fake, overturned_real, escalated, retracted
    note: Mapped[str | None] = mapped_column(Text)
    reviewer: Mapped[str] = mapped_column(String(255))  # the key's name when the review was made
    key_id: Mapped[str | None] = mapped_column(String(36))
    retracts_id: Mapped[int | None] = mapped_column(Integer)
    request_id: Mapped[str | None] = mapped_column(String(64))
    # The model's view at decision time, so agreement statistics survive later re-classification.
    model_label: Mapped[str | None] = mapped_column(String(16))
    model_score: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    item: Mapped[Item] = relationship(back_populates="reviews")


class CallbackDelivery(Base):
    """One HTTP attempt to deliver one callback event: the audit trail of what platforms were told."""

    __tablename__ = "callback_deliveries"
    __table_args__ = (
        Index("ix_callback_deliveries_event", "event_id", "attempt"),
        Index("ix_callback_deliveries_item", "item_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    event_id: Mapped[str] = mapped_column(String(36))
    event_type: Mapped[str] = mapped_column(String(32))
    item_id: Mapped[str] = mapped_column(String(36))
    url: Mapped[str] = mapped_column(String(2048))
    attempt: Mapped[int] = mapped_column(Integer)
    status_code: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    delivered: Mapped[bool] = mapped_column(Boolean, default=False)
    final: Mapped[bool] = mapped_column(Boolean, default=False)  # delivered, or given up on
    duration_ms: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


# --- engine and sessions ---------------------------------------------------------------------------


def make_engine(url: str, pool_size: int = 5) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record) -> None:  # pragma: no cover - trivial
            cursor = dbapi_connection.cursor()
            # WAL lets the API read while the worker writes; foreign keys are off by default in SQLite.
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        return engine
    return create_engine(url, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True)


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A transaction: committed if the block succeeds, rolled back if it raises."""
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def insert_ignore(session: Session, model, values: list[dict], index_elements: list[str]) -> None:
    """``INSERT ... ON CONFLICT DO NOTHING`` on Postgres and SQLite: the idempotent write."""
    if not values:
        return
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    elif dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    else:  # pragma: no cover - only the two supported backends
        raise RuntimeError(f"unsupported database dialect {dialect}")
    # Rows as executemany parameters, not .values(rows): the statement then compiles once and stays in
    # SQLAlchemy's cache, and "insertmanyvalues" still sends the rows as one multi-row INSERT.
    session.execute(insert(model).on_conflict_do_nothing(index_elements=index_elements), values)


#: Errors that mean "the database is not reachable right now", not "this statement is wrong".
TRANSIENT_DATABASE_ERRORS = (OperationalError, InterfaceError)


def retry_database(operation: Callable[[], T], within_s: float, what: str = "database step") -> T:
    """Run ``operation`` (one whole transaction), retrying through a database outage with backoff.

    A restart or failover of Postgres breaks the pooled connections; the retry runs on fresh ones
    (``pool_pre_ping``). Gives up, re-raising the last error, once ``within_s`` seconds have passed.
    """
    from dfmod import telemetry

    deadline = time.monotonic() + within_s
    delay = 0.25
    attempt = 1
    while True:
        try:
            return operation()
        except TRANSIENT_DATABASE_ERRORS as exc:
            if time.monotonic() + delay > deadline:
                raise
            logger.warning(
                "%s: database unavailable (attempt %d, %s); retrying in %.2fs",
                what, attempt, type(exc).__name__, delay,
            )
            telemetry.TRANSIENT_ERRORS.labels(kind="database").inc()
            time.sleep(delay)
            delay = min(delay * 2, 4.0)
            attempt += 1
