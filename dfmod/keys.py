"""API keys: creation, lookup, listing and revocation, shared by the API, the CLI and ``dfmod up``.

A key is ``dfmod_`` followed by 43 URL-safe characters (256 random bits). Only its SHA-256 is stored: with
that much entropy a slow password hash buys nothing, and a plain digest lets every request find its key
with one indexed lookup. The plaintext is returned once, at creation, and is never logged; logs and
listings show the short prefix instead.

Keys belong to tenants (see :mod:`dfmod.tenants`): an ingest key to exactly one (the default tenant when
none is named), a review key to the tenants it may review or to none (global), an admin key to none or one.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from dfmod.db import DEFAULT_TENANT_ID, ApiKey, ApiKeyTenant, Tenant, utcnow
from dfmod.errors import DfmodError

SCOPES = ("ingest", "review", "admin")
KEY_PREFIX = "dfmod_"
_PREFIX_LENGTH = len(KEY_PREFIX) + 6
# last_used_at is a convenience for `dfmod keys list`; refreshing it at most this often keeps reads read-only.
_TOUCH_EVERY = timedelta(minutes=1)


class KeyProblem(DfmodError, ValueError):
    """A key operation that cannot be done (unknown scope, duplicate name)."""

    code = "key_conflict"
    http_status = 409


class KeyNotFound(KeyProblem):
    """No key has that id or name."""

    code = "not_found"
    http_status = 404


@dataclass(frozen=True)
class CreatedKey:
    key: ApiKey
    plaintext: str


def hash_key(plaintext: str) -> str:
    return hashlib.sha256(plaintext.encode("utf-8")).hexdigest()


def normalise_scopes(scopes: list[str] | tuple[str, ...] | set[str]) -> str:
    cleaned = sorted({scope.strip().lower() for scope in scopes if scope.strip()})
    unknown = [scope for scope in cleaned if scope not in SCOPES]
    if unknown or not cleaned:
        raise KeyProblem(f"scopes must be one or more of {', '.join(SCOPES)}; got {', '.join(unknown) or 'none'}")
    return ",".join(cleaned)


def _resolve_tenants(session: Session, tenants: list[str] | tuple[str, ...]) -> list[Tenant]:
    found = []
    for name_or_id in dict.fromkeys(t.strip() for t in tenants if t.strip()):
        tenant = session.get(Tenant, name_or_id) or session.scalar(select(Tenant).where(Tenant.name == name_or_id))
        if tenant is None:
            raise KeyProblem(f"no tenant with id or name {name_or_id!r}", code="tenant_not_found", http_status=404)
        if tenant.disabled_at is not None:
            raise KeyProblem(f"tenant {tenant.name!r} is disabled")
        found.append(tenant)
    return found


def create_key(
    session: Session, name: str, scopes: list[str] | tuple[str, ...], tenants: list[str] | tuple[str, ...] = (),
) -> CreatedKey:
    """Add a key; the caller commits. Raises :class:`KeyProblem` if a live key already has ``name``.

    ``tenants`` (names or ids): an ingest key's one tenant (default: the default tenant); a review key's list
    of tenants (none: global); an admin key is global whatever its tenant.
    """
    name = name.strip()
    if not name or len(name) > 255:
        raise KeyProblem("a key needs a name of 1 to 255 characters")
    scope_text = normalise_scopes(scopes)
    if session.scalar(select(ApiKey.id).where(ApiKey.name == name, ApiKey.revoked_at.is_(None))):
        raise KeyProblem(f"a live key named {name!r} exists; revoke it first or pick another name")
    chosen = _resolve_tenants(session, tenants)
    if "ingest" in scope_text.split(","):
        if len(chosen) > 1:
            raise KeyProblem("an ingest key belongs to exactly one tenant; make one key per tenant")
        if not chosen:
            chosen = _resolve_tenants(session, [DEFAULT_TENANT_ID])
    plaintext = KEY_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(
        name=name, key_hash=hash_key(plaintext), prefix=plaintext[:_PREFIX_LENGTH], scopes=scope_text,
        tenant_id=chosen[0].id if len(chosen) == 1 else None,
    )
    session.add(key)
    session.flush()
    for tenant in chosen:
        session.add(ApiKeyTenant(key_id=key.id, tenant_id=tenant.id))
    session.flush()
    session.refresh(key)
    return CreatedKey(key, plaintext)


def authenticate(session: Session, plaintext: str) -> ApiKey | None:
    """The live key matching ``plaintext``, or None (unknown, malformed or revoked)."""
    if not plaintext.startswith(KEY_PREFIX) or len(plaintext) > 128:
        return None
    key = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(plaintext)))
    if key is None or key.revoked_at is not None:
        return None
    if key.tenant is not None and key.tenant.disabled_at is not None:
        return None  # a disabled tenant's keys stop working with it
    now = utcnow()
    if key.last_used_at is None or now - key.last_used_at > _TOUCH_EVERY:
        key.last_used_at = now
    return key


def list_keys(session: Session, include_revoked: bool = False) -> list[ApiKey]:
    query = select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)
    if not include_revoked:
        query = query.where(ApiKey.revoked_at.is_(None))
    return list(session.scalars(query))


def revoke_key(session: Session, name_or_id: str) -> ApiKey:
    """Revoke the live key with this id or name; revoking an already revoked id is a no-op (idempotent)."""
    key = session.get(ApiKey, name_or_id)
    if key is None:
        key = session.scalar(
            select(ApiKey).where(ApiKey.name == name_or_id, ApiKey.revoked_at.is_(None))
        ) or session.scalar(
            select(ApiKey).where(ApiKey.name == name_or_id).order_by(ApiKey.revoked_at.desc()).limit(1)
        )
    if key is None:
        raise KeyNotFound(f"no key with id or name {name_or_id!r}")
    if key.revoked_at is None:
        key.revoked_at = utcnow()
    return key


def rotate_key(
    session: Session, name: str, scopes: list[str] | tuple[str, ...], tenants: list[str] | tuple[str, ...] = (),
) -> CreatedKey:
    """Revoke the live key called ``name`` (if any) and create a new one: what ``dfmod up`` does at start."""
    live = session.scalar(select(ApiKey).where(ApiKey.name == name, ApiKey.revoked_at.is_(None)))
    if live is not None:
        live.revoked_at = utcnow()
        session.flush()
    return create_key(session, name, scopes, tenants)
