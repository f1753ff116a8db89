"""Tenant administration (``admin`` scope): create, list, read, update, disable, rotate secrets.

The same operations exist on the command line (``dfmod tenants ...``); both go through :mod:`dfmod.tenants`,
whose :class:`~dfmod.tenants.TenantProblem` errors answer through the one error handler. Secrets (events
token, callback secret) appear in a response once, when made, after the request's transaction committed;
only their hash or ciphertext is stored.
"""

from __future__ import annotations

from fastapi import APIRouter, Query, status
from fastapi.responses import JSONResponse

from api.auth import AdminKey
from api.deps import SessionDep, SettingsDep
from api.schemas import RotateSecretIn, TenantCreated, TenantIn, TenantOut, TenantPatch
from dfmod import tenants

router = APIRouter(prefix="/v1/tenants")
_NO_STORE = {"Cache-Control": "no-store"}


def _created(made: tenants.TenantSecrets, code: int) -> JSONResponse:
    body = TenantCreated(
        **TenantOut.of(made.tenant).model_dump(), events_token=made.events_token, callback_secret=made.callback_secret
    )
    # The responses that carry secrets: keep them out of every cache.
    return JSONResponse(body.model_dump(mode="json"), status_code=code, headers=_NO_STORE)


@router.get("", response_model=list[TenantOut], summary="Tenants (never their secrets)")
def list_tenants(_admin: AdminKey, session: SessionDep, include_disabled: bool = Query(True)) -> list[TenantOut]:
    return [TenantOut.of(tenant) for tenant in tenants.list_tenants(session, include_disabled)]


@router.post(
    "", response_model=TenantCreated, status_code=status.HTTP_201_CREATED,
    summary="Create a tenant; its events token and callback secret are shown once",
)
def create_tenant(body: TenantIn, _admin: AdminKey, session: SessionDep, settings: SettingsDep) -> JSONResponse:
    made = tenants.create_tenant(
        session, tenants.secret_box(settings), body.name, body.callback_url, body.buckets, body.threshold,
        body.review_band,
    )
    return _created(made, status.HTTP_201_CREATED)


@router.get("/{name_or_id}", response_model=TenantOut, summary="One tenant")
def get_tenant(name_or_id: str, _admin: AdminKey, session: SessionDep) -> TenantOut:
    return TenantOut.of(tenants.get_tenant(session, name_or_id))


@router.patch("/{name_or_id}", response_model=TenantOut, summary="Change a tenant's callback URL, buckets, threshold, band")
def update_tenant(name_or_id: str, body: TenantPatch, _admin: AdminKey, session: SessionDep) -> TenantOut:
    sent = body.model_fields_set
    changes = {name: getattr(body, name) for name in ("callback_url", "threshold", "review_band") if name in sent}
    tenant = tenants.get_tenant(session, name_or_id)
    tenants.update_tenant(
        session, tenant, add_buckets=body.add_buckets, remove_buckets=body.remove_buckets, enabled=body.enabled,
        **changes,
    )
    return TenantOut.of(tenant)


@router.post("/{name_or_id}/disable", response_model=TenantOut, summary="Disable a tenant: its keys and token stop working")
def disable_tenant(name_or_id: str, _admin: AdminKey, session: SessionDep) -> TenantOut:
    return TenantOut.of(tenants.disable_tenant(session, tenants.get_tenant(session, name_or_id)))


@router.post(
    "/{name_or_id}/callback-secret:rotate", response_model=TenantCreated,
    summary="New callback secret (shown once); the previous one also signs until the overlap ends",
)
def rotate_callback_secret(
    name_or_id: str, _admin: AdminKey, session: SessionDep, settings: SettingsDep, body: RotateSecretIn | None = None,
) -> JSONResponse:
    tenant = tenants.get_tenant(session, name_or_id)
    made = tenants.rotate_callback_secret(session, tenants.secret_box(settings), tenant, (body or RotateSecretIn()).overlap_s)
    return _created(made, status.HTTP_200_OK)


@router.post(
    "/{name_or_id}/events-token:rotate", response_model=TenantCreated,
    summary="New events token (shown once); the old one stops working at once",
)
def rotate_events_token(name_or_id: str, _admin: AdminKey, session: SessionDep) -> JSONResponse:
    made = tenants.rotate_events_token(session, tenants.get_tenant(session, name_or_id))
    return _created(made, status.HTTP_200_OK)
