"""Who may call what: API-key authentication, scope checks and signed short-lived image links.

Keys travel in ``Authorization: Bearer KEY`` or ``X-API-Key: KEY``, never in a URL (URLs end up in access
logs). A missing or unknown key is 401 (so is a key of a disabled tenant), a key without the endpoint's scope is
403; rejections are logged with a fingerprint of the key (a SHA-256 prefix), never the key. Which tenants'
items a key may see is :class:`dfmod.tenants.Access`; an item outside them answers 404, as if it did not
exist. Each authenticated request counts against the key's rate limit (:mod:`api.ratelimit`).

Images are shown in ``<img>`` tags, which cannot send headers, so the API hands out links signed for one
item, one variant and a few minutes: ``?exp=UNIX&kid=KEY_ID&sig=HMAC``. The HMAC key is the stored hash of
the API key that asked for the link, so no extra secret needs configuring, every API replica can check
any link, and revoking the key kills its links.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from collections.abc import Callable
from typing import Annotated
from urllib.parse import urlencode

from fastapi import Depends, Request, status
from sqlalchemy.orm import Session

from api.deps import SessionDep
from api.ratelimit import READS, UPLOADS
from dfmod.db import ApiKey
from dfmod.errors import DfmodError, NotFound
from dfmod.keys import authenticate, hash_key
from dfmod.tenants import Access

logger = logging.getLogger(__name__)
_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="dfmod"'}


def presented_key(request: Request) -> str | None:
    authorization = request.headers.get("authorization", "").strip()
    if authorization.lower().startswith("bearer "):
        return authorization[7:].strip() or None
    return request.headers.get("x-api-key", "").strip() or None


def _fingerprint(plaintext: str) -> str:
    return hash_key(plaintext)[:12]


def _authenticate(request: Request, session: Session) -> ApiKey:
    plaintext = presented_key(request)
    if plaintext is None:
        raise DfmodError(
            "this endpoint needs an API key: send Authorization: Bearer KEY (create one with `dfmod keys create`)",
            code="unauthorized", http_status=status.HTTP_401_UNAUTHORIZED, headers=_CHALLENGE,
        )
    key = authenticate(session, plaintext)
    if key is None:
        logger.warning("rejected unknown or revoked API key (fingerprint %s) on %s", _fingerprint(plaintext), request.url.path)
        raise DfmodError(
            "unknown or revoked API key", code="unauthorized", http_status=status.HTTP_401_UNAUTHORIZED,
            headers=_CHALLENGE,
        )
    request.state.api_key_name = key.name
    return key


def _check_scope(request: Request, key: ApiKey, scopes: tuple[str, ...]) -> None:
    if not key.scope_set.intersection(scopes):
        logger.info("key %r (scopes %s) refused on %s", key.name, key.scopes, request.url.path)
        raise DfmodError(
            f"key {key.name!r} has scopes [{key.scopes}]; this endpoint needs {' or '.join(scopes)}",
            code="forbidden", http_status=status.HTTP_403_FORBIDDEN,
        )


def _rate_limit(request: Request, key: ApiKey, kind: str) -> None:
    limiter = getattr(request.app.state, "rate_limiter", None)
    if limiter is not None:
        limiter.hit(kind, key.id)


def require(*scopes: str, limit: str = READS) -> Callable[..., ApiKey]:
    """A dependency that returns the caller's key if it has any of ``scopes``, counted against ``limit``."""

    def dependency(request: Request, session: SessionDep) -> ApiKey:
        key = _authenticate(request, session)
        _check_scope(request, key, scopes)
        _rate_limit(request, key, limit)
        return key

    dependency.__name__ = f"require_{'_or_'.join(scopes)}"
    return dependency


def access(key: ApiKey) -> Access:
    return Access.of(key)


def not_found(item_id: str) -> NotFound:
    # The same answer whether the item does not exist or belongs to a tenant the key cannot see.
    return NotFound(f"no item {item_id}")


IngestKey = Annotated[ApiKey, Depends(require("ingest", limit=UPLOADS))]
ReviewKey = Annotated[ApiKey, Depends(require("review"))]
AdminKey = Annotated[ApiKey, Depends(require("admin"))]
ReadKey = Annotated[ApiKey, Depends(require("ingest", "review"))]


# --- signed links ----------------------------------------------------------------------------------


def _link_signature(key: ApiKey, item_id: str, variant: str, expires: int) -> str:
    message = f"{item_id}\n{variant}\n{expires}\n{key.id}".encode()
    return hmac.new(bytes.fromhex(key.key_hash), message, hashlib.sha256).hexdigest()


def signed_link(base: str, key: ApiKey, item_id: str, variant: str, ttl_s: int, extra: dict | None = None) -> str:
    expires = int(time.time()) + ttl_s
    query = {**(extra or {}), "exp": expires, "kid": key.id, "sig": _link_signature(key, item_id, variant, expires)}
    return f"{base}?{urlencode(query)}"


def link_or_key(request: Request, session: Session, item_id: str, variant: str) -> ApiKey:
    """Accept a review key in the headers, or a valid, unexpired link signed by a live review key."""
    if presented_key(request) is not None:
        return require("review")(request, session)
    params = request.query_params
    expires, kid, signature = params.get("exp"), params.get("kid"), params.get("sig")
    if not (expires and kid and signature):
        return require("review")(request, session)  # no credentials at all: the usual 401
    key = session.get(ApiKey, kid)
    try:
        expiry = int(expires)
    except ValueError:
        expiry = 0
    valid = (
        key is not None
        and key.revoked_at is None
        and (key.tenant is None or key.tenant.disabled_at is None)
        and "review" in key.scope_set
        and expiry >= time.time()
        and hmac.compare_digest(_link_signature(key, item_id, variant, expiry), signature)
    )
    if not valid:
        raise DfmodError(
            "this image link is invalid or has expired", code="invalid_link", http_status=status.HTTP_403_FORBIDDEN
        )
    _rate_limit(request, key, READS)
    return key
