"""Key and settings administration (``admin`` scope), and ``/v1/whoami`` for any valid key.

The same operations exist on the command line (``dfmod keys ...``); both go through :mod:`dfmod.keys`.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, status
from fastapi.responses import JSONResponse

from api.auth import AdminKey, require
from api.deps import SessionDep, SettingsDep
from api.schemas import KeyCreated, KeyIn, KeyOut, WhoAmI
from dfmod import keys
from dfmod.db import ApiKey

router = APIRouter(prefix="/v1")


@router.get("/whoami", response_model=WhoAmI, summary="The calling key's name and scopes")
def whoami(key: ApiKey = Depends(require(*keys.SCOPES))) -> WhoAmI:
    return WhoAmI(
        id=key.id, name=key.name, scopes=sorted(key.scope_set), tenant=key.tenant.name if key.tenant else None,
        tenants=[tenant.name for tenant in key.review_tenants],
    )


@router.get("/keys", response_model=list[KeyOut], summary="API keys (never the keys themselves)")
def list_keys(
    _admin: AdminKey, session: SessionDep, include_revoked: bool = Query(False)
) -> list[KeyOut]:
    return [KeyOut.of(key) for key in keys.list_keys(session, include_revoked)]


@router.post("/keys", response_model=KeyCreated, status_code=status.HTTP_201_CREATED, summary="Create a key (shown once)")
def create_key(body: KeyIn, _admin: AdminKey, session: SessionDep) -> JSONResponse:
    # The request's session commits before this answer (the one carrying the key) goes out.
    created = keys.create_key(session, body.name, body.scopes, body.tenants)
    out = KeyCreated(**KeyOut.of(created.key).model_dump(), key=created.plaintext)
    # The one response that carries a key: keep it out of every cache.
    return JSONResponse(out.model_dump(mode="json"), status_code=201, headers={"Cache-Control": "no-store"})


@router.post("/keys/{name_or_id}/revoke", response_model=KeyOut, summary="Revoke a key by id or name")
def revoke_key(name_or_id: str, _admin: AdminKey, session: SessionDep) -> KeyOut:
    return KeyOut.of(keys.revoke_key(session, name_or_id))


@router.get("/settings", summary="The effective settings (secrets masked)")
def effective_settings(_admin: AdminKey, settings: SettingsDep) -> dict:
    values = settings.model_dump(mode="json")
    # Passwords inside URLs are secrets too.
    for name in ("database_url", "broker_url", "rate_limit_storage_url"):
        value = values.get(name)
        if isinstance(value, str) and "@" in value and "://" in value:
            scheme, rest = value.split("://", 1)
            values[name] = f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
    return values
