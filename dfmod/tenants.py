"""Tenants: the platforms dfmod serves, kept apart by construction.

A tenant owns its items, its ingest keys, its buckets (a bucket belongs to one tenant), its S3-events token
and its callback URL and secret. Shared by the API (``/v1/tenants``, every access check), the worker
(callback targets, per-tenant thresholds) and the CLI (``dfmod tenants ...``).

Who sees what is decided here, once (:class:`Access`), and every endpoint applies it:

* an ingest key records into, and reads, its own tenant's items only; another tenant's item is "not found";
* a review key reviews the tenants it is limited to, or every tenant when it is limited to none (global);
* a key with the admin scope is global.

Secrets: callback secrets are encrypted with ``DFMOD_SECRET_KEY`` (Fernet; several comma-separated keys
rotate the encryption key itself, the first encrypts), so a database dump alone cannot sign a callback.
Events tokens are high-entropy random strings stored as their SHA-256, like API keys. The embedded
``dfmod up`` keeps a generated encryption key in ``DATA_DIR/secret.key`` when ``DFMOD_SECRET_KEY`` is unset.

The default tenant (migration 0003) keeps the pre-tenant settings working: while it has no callback URL of
its own, ``DFMOD_CALLBACK_URL(S)``/``DFMOD_CALLBACK_SECRET`` are its callback, ``DFMOD_S3_EVENT_TOKEN`` is
an events token of its, and ``DFMOD_ALLOWED_BUCKETS`` (plus the upload bucket) are its buckets.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import select, true
from sqlalchemy.orm import Session, sessionmaker

from dfmod.db import (
    DEFAULT_TENANT_ID,
    DEFAULT_TENANT_NAME,
    ApiKey,
    Item,
    Tenant,
    TenantBucket,
    session_scope,
    utcnow,
)
from dfmod.errors import DfmodError
from dfmod.settings import Settings

EVENTS_TOKEN_PREFIX = "dfmodev_"
CALLBACK_SECRET_PREFIX = "whsec_"
# Prefixes of the upload bucket that dfmod writes itself (uploads, cached heatmaps): no tenant may register
# or be notified about them, so one tenant cannot claim another's upload by naming its key.
RESERVED_PREFIXES = ("uploads/", "heatmaps/")
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


class TenantProblem(DfmodError, ValueError):
    """A tenant operation that cannot be done; ``code`` is the API error code, ``http_status`` its HTTP status."""

    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(message, code=code, http_status=status)


# --- secrets ---------------------------------------------------------------------------------------


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class SecretBox:
    """Encrypts and decrypts tenants' callback secrets with the deployment's key(s) (Fernet)."""

    def __init__(self, keys: list[str]) -> None:
        from cryptography.fernet import Fernet, MultiFernet

        try:
            self._fernet = MultiFernet([Fernet(key.strip().encode()) for key in keys])
        except ValueError as exc:
            raise TenantProblem(
                "invalid_secret_key", "DFMOD_SECRET_KEY must be Fernet keys (32 url-safe base64 bytes), comma-separated"
            ) from exc

    def encrypt(self, secret: str) -> str:
        return self._fernet.encrypt(secret.encode()).decode()

    def rotate(self, token: str) -> str:
        """Re-encrypt under the first key (after ``DFMOD_SECRET_KEY`` gained a new first key)."""
        from cryptography.fernet import InvalidToken

        try:
            return self._fernet.rotate(token.encode()).decode()
        except InvalidToken as exc:
            raise TenantProblem(
                "secret_key_mismatch", "a callback secret cannot be decrypted with DFMOD_SECRET_KEY", 500
            ) from exc

    def decrypt(self, token: str) -> str:
        from cryptography.fernet import InvalidToken

        try:
            return self._fernet.decrypt(token.encode()).decode()
        except InvalidToken as exc:
            raise TenantProblem(
                "secret_key_mismatch", "a callback secret cannot be decrypted with DFMOD_SECRET_KEY", 500
            ) from exc


def generate_secret_key() -> str:
    from cryptography.fernet import Fernet

    return Fernet.generate_key().decode()


def secret_box(settings: Settings) -> SecretBox | None:
    """The box from ``DFMOD_SECRET_KEY``; embedded deployments get a key file under ``data_dir``; else None."""
    if settings.secret_key is not None:
        return SecretBox([k for k in settings.secret_key.get_secret_value().split(",") if k.strip()])
    if not settings.resolved_database_url.startswith("sqlite"):
        return None
    path = Path(settings.data_dir) / "secret.key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(generate_secret_key())
    return SecretBox([path.read_text().strip()])


def _require_box(box: SecretBox | None) -> SecretBox:
    if box is None:
        raise TenantProblem(
            "secret_key_missing", "set DFMOD_SECRET_KEY (a Fernet key, `dfmod tenants secret-key`) to store callback secrets", 400
        )
    return box


# --- access rules ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Access:
    """What one API key may see. ``review_tenants`` None means every tenant."""

    key_id: str
    scopes: frozenset[str]
    ingest_tenant: str | None
    review_tenants: frozenset[str] | None

    @classmethod
    def of(cls, key: ApiKey) -> Access:
        scopes = key.scope_set
        if "admin" in scopes:
            review = None
        elif key.review_tenants:
            review = frozenset(t.id for t in key.review_tenants)
        elif key.tenant_id is not None:
            review = frozenset([key.tenant_id])
        else:
            review = None
        return cls(key.id, scopes, key.tenant_id if "ingest" in scopes else None, review)

    @property
    def is_admin(self) -> bool:
        return "admin" in self.scopes

    def can_review(self, tenant_id: str) -> bool:
        return "review" in self.scopes and (self.review_tenants is None or tenant_id in self.review_tenants)

    def can_read(self, tenant_id: str) -> bool:
        """Item status (``GET /v1/images/{id}``): an ingest key its own tenant's; a review key its tenants'."""
        return (self.ingest_tenant is not None and tenant_id == self.ingest_tenant) or self.can_review(tenant_id)

    def review_filter(self):
        """SQL condition limiting reviewer queries to this key's tenants."""
        if self.review_tenants is None:
            return true()
        return Item.tenant_id.in_(sorted(self.review_tenants))


# --- buckets ---------------------------------------------------------------------------------------


class BucketDirectory:
    """Which tenant owns a bucket: ``tenant_buckets`` rows, else the default tenant for the configured buckets.

    Cached for ``ttl_s`` (every API replica and worker asks on each registration, event and object read); a
    bucket not in the cache triggers a reload, so a bucket added a moment ago is found at once.
    """

    def __init__(self, settings: Settings, factory: sessionmaker[Session], ttl_s: float = 10.0) -> None:
        self.settings = settings
        self.factory = factory
        self.ttl_s = ttl_s
        self._owners: dict[str, str] = {}
        self._loaded_at = -1e9
        self._lock = threading.Lock()

    def _load(self) -> dict[str, str]:
        with session_scope(self.factory) as session:
            rows = dict(session.execute(select(TenantBucket.bucket, TenantBucket.tenant_id)).all())
        owners = {bucket: DEFAULT_TENANT_ID for bucket in self.settings.readable_buckets}
        owners.update(rows)
        return owners

    def owners(self, refresh_on_miss: str | None = None) -> dict[str, str]:
        with self._lock:
            stale = time.monotonic() - self._loaded_at > self.ttl_s
            if stale or (refresh_on_miss is not None and refresh_on_miss not in self._owners):
                self._owners = self._load()
                self._loaded_at = time.monotonic()
            return self._owners

    def owner(self, bucket: str) -> str | None:
        return self.owners(refresh_on_miss=bucket).get(bucket)

    def readable(self, bucket: str) -> bool:
        """For storage: dfmod may read objects of configured and tenant buckets, nothing else."""
        return bucket in self.settings.readable_buckets or self.owner(bucket) is not None


def may_ingest(directory: BucketDirectory, tenant_id: str, bucket: str, key: str) -> bool:
    """May ``tenant_id`` register (or be notified about) ``bucket/key``?"""
    if bucket == directory.settings.upload_bucket and key.startswith(RESERVED_PREFIXES):
        return False
    return directory.owner(bucket) == tenant_id


# --- tenants ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TenantSecrets:
    """Secrets shown once, at creation or rotation; only hashes or ciphertexts are stored."""

    tenant: Tenant
    events_token: str | None = None
    callback_secret: str | None = None


def _check_name(name: str) -> str:
    name = name.strip()
    if not _NAME.match(name):
        raise TenantProblem("invalid_tenant_name", "a tenant name is 1-64 of a-z 0-9 . _ -, starting with a letter or digit")
    return name


def _check_url(url: str | None) -> str | None:
    if url is None or url == "":
        return None
    if not url.startswith(("http://", "https://")) or len(url) > 2048:
        raise TenantProblem("invalid_callback_url", f"callback URLs must be http(s)://..., at most 2048 characters; got {url[:100]!r}")
    return url


def _check_fraction(name: str, value: float | None) -> float | None:
    if value is not None and not (0.0 <= value <= 1.0):
        raise TenantProblem("invalid_request", f"{name} must be between 0 and 1")
    return value


def get_tenant(session: Session, name_or_id: str) -> Tenant:
    tenant = session.get(Tenant, name_or_id) or session.scalar(select(Tenant).where(Tenant.name == name_or_id))
    if tenant is None:
        raise TenantProblem("tenant_not_found", f"no tenant with id or name {name_or_id!r}", 404)
    return tenant


def list_tenants(session: Session, include_disabled: bool = True) -> list[Tenant]:
    query = select(Tenant).order_by(Tenant.name)
    if not include_disabled:
        query = query.where(Tenant.disabled_at.is_(None))
    return list(session.scalars(query))


def _set_buckets(session: Session, tenant: Tenant, add: list[str], remove: list[str]) -> None:
    for bucket in remove:
        row = session.get(TenantBucket, bucket)
        if row is not None and row.tenant_id == tenant.id:
            session.delete(row)
    for bucket in add:
        bucket = bucket.strip()
        if not bucket or len(bucket) > 255:
            raise TenantProblem("invalid_bucket", "a bucket name is 1 to 255 characters")
        row = session.get(TenantBucket, bucket)
        if row is not None and row.tenant_id != tenant.id:
            # Say that it is taken, not by whom.
            raise TenantProblem("bucket_taken", f"bucket {bucket!r} belongs to another tenant", 409)
        if row is None:
            session.add(TenantBucket(bucket=bucket, tenant_id=tenant.id, created_at=utcnow()))
    session.flush()
    session.expire(tenant, ["buckets"])


def create_tenant(
    session: Session, box: SecretBox | None, name: str, callback_url: str | None = None,
    buckets: list[str] | None = None, threshold: float | None = None, review_band: float | None = None,
) -> TenantSecrets:
    """Add a tenant with a fresh events token and callback secret (returned once); the caller commits."""
    name = _check_name(name)
    if session.scalar(select(Tenant.id).where(Tenant.name == name)):
        raise TenantProblem("tenant_exists", f"a tenant named {name!r} exists", 409)
    callback_secret = CALLBACK_SECRET_PREFIX + secrets.token_urlsafe(32)
    events_token = EVENTS_TOKEN_PREFIX + secrets.token_urlsafe(32)
    now = utcnow()
    tenant = Tenant(
        name=name, callback_url=_check_url(callback_url),
        callback_secret_encrypted=_require_box(box).encrypt(callback_secret),
        events_token_hash=hash_token(events_token),
        threshold=_check_fraction("threshold", threshold), review_band=_check_fraction("review_band", review_band),
        created_at=now, updated_at=now,
    )
    session.add(tenant)
    session.flush()
    _set_buckets(session, tenant, buckets or [], [])
    return TenantSecrets(tenant, events_token, callback_secret)


_UNSET = object()


def update_tenant(
    session: Session, tenant: Tenant, *, callback_url=_UNSET, threshold=_UNSET, review_band=_UNSET,
    add_buckets: list[str] | None = None, remove_buckets: list[str] | None = None, enabled: bool | None = None,
) -> Tenant:
    """Change what was given; an empty callback URL or a None threshold/band clears it."""
    if callback_url is not _UNSET:
        tenant.callback_url = _check_url(callback_url)
    if threshold is not _UNSET:
        tenant.threshold = _check_fraction("threshold", threshold)
    if review_band is not _UNSET:
        tenant.review_band = _check_fraction("review_band", review_band)
    if enabled is True:
        tenant.disabled_at = None
    elif enabled is False and tenant.disabled_at is None:
        tenant.disabled_at = utcnow()
    _set_buckets(session, tenant, add_buckets or [], remove_buckets or [])
    tenant.updated_at = utcnow()
    return tenant


def disable_tenant(session: Session, tenant: Tenant) -> Tenant:
    """Its keys and events token stop working (401); its items stay, visible to global reviewers."""
    return update_tenant(session, tenant, enabled=False)


def rotate_callback_secret(
    session: Session, box: SecretBox | None, tenant: Tenant, overlap_s: int = 86400, now: datetime | None = None,
) -> TenantSecrets:
    """A new current secret; the old one keeps signing (second signature) for ``overlap_s`` seconds."""
    if overlap_s < 0:
        raise TenantProblem("invalid_request", "the overlap cannot be negative")
    box = _require_box(box)
    now = now or utcnow()
    secret = CALLBACK_SECRET_PREFIX + secrets.token_urlsafe(32)
    if tenant.callback_secret_encrypted and overlap_s > 0:
        tenant.previous_secret_encrypted = tenant.callback_secret_encrypted
        tenant.previous_secret_until = now + timedelta(seconds=overlap_s)
    else:
        tenant.previous_secret_encrypted = None
        tenant.previous_secret_until = None
    tenant.callback_secret_encrypted = box.encrypt(secret)
    tenant.updated_at = now
    return TenantSecrets(tenant, callback_secret=secret)


def reencrypt_secrets(session: Session, box: SecretBox | None) -> int:
    """Re-encrypt every stored callback secret with the first ``DFMOD_SECRET_KEY``; returns how many.

    Rotating the encryption key: put the new key first and keep the old one after it, run this, then drop
    the old key.
    """
    box = _require_box(box)
    count = 0
    for tenant in session.scalars(select(Tenant)):
        for column in ("callback_secret_encrypted", "previous_secret_encrypted"):
            value = getattr(tenant, column)
            if value:
                setattr(tenant, column, box.rotate(value))
                count += 1
    return count


def rotate_events_token(session: Session, tenant: Tenant) -> TenantSecrets:
    """A new events token; the old one stops working at once (update the bucket notification first)."""
    token = EVENTS_TOKEN_PREFIX + secrets.token_urlsafe(32)
    tenant.events_token_hash = hash_token(token)
    tenant.updated_at = utcnow()
    return TenantSecrets(tenant, events_token=token)


def tenant_for_events_token(session: Session, settings: Settings, token: str) -> Tenant | None:
    """The live tenant whose events token this is (``DFMOD_S3_EVENT_TOKEN`` is the default tenant's)."""
    import hmac

    if not token or len(token) > 256:
        return None
    tenant = session.scalar(select(Tenant).where(Tenant.events_token_hash == hash_token(token)))
    if tenant is None and settings.s3_event_token is not None:
        if hmac.compare_digest(token.encode(), settings.s3_event_token.get_secret_value().encode()):
            tenant = session.get(Tenant, DEFAULT_TENANT_ID)
    if tenant is None or tenant.disabled:
        return None
    return tenant


def events_enabled(session: Session, settings: Settings) -> bool:
    return settings.s3_event_token is not None or session.scalar(
        select(Tenant.id).where(Tenant.events_token_hash.is_not(None)).limit(1)
    ) is not None


# --- callbacks -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CallbackTarget:
    url: str
    secrets: tuple[str, ...]  # current first; the previous one while its overlap lasts


def has_callback(tenant: Tenant | None, settings: Settings, source: str) -> bool:
    if tenant is None:
        return False
    if tenant.callback_url:
        return True
    return tenant.id == DEFAULT_TENANT_ID and settings.callback_url_for(source) is not None


def callback_target(
    tenant: Tenant | None, settings: Settings, box: SecretBox | None, source: str, now: datetime | None = None,
) -> CallbackTarget | None:
    """Where an item's events go and the secrets that sign them: the item's tenant's, never another's."""
    if tenant is None or tenant.disabled:
        return None
    if tenant.callback_url:
        if not tenant.callback_secret_encrypted:
            return None
        box = _require_box(box)
        signing = [box.decrypt(tenant.callback_secret_encrypted)]
        now = now or utcnow()
        if tenant.previous_secret_encrypted and tenant.previous_secret_until and tenant.previous_secret_until > now:
            signing.append(box.decrypt(tenant.previous_secret_encrypted))
        return CallbackTarget(tenant.callback_url, tuple(signing))
    if tenant.id == DEFAULT_TENANT_ID:
        url = settings.callback_url_for(source)
        if url is not None and settings.callback_secret is not None:
            return CallbackTarget(url, (settings.callback_secret.get_secret_value(),))
    return None


def load_tenants(session: Session) -> dict[str, Tenant]:
    """Every tenant by id (the worker reads thresholds and callback settings from them)."""
    return {tenant.id: tenant for tenant in session.scalars(select(Tenant))}


def default_tenant(session: Session) -> Tenant:
    tenant = session.get(Tenant, DEFAULT_TENANT_ID)
    if tenant is None:  # a database made before 0003 and migrated by hand; make it whole
        now = utcnow()
        tenant = Tenant(id=DEFAULT_TENANT_ID, name=DEFAULT_TENANT_NAME, created_at=now, updated_at=now)
        session.add(tenant)
        session.flush()
    return tenant
