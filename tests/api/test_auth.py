"""Who may call what, on real Postgres: every endpoint against no key, a revoked key, an unknown key and
each scope; and keys never reach the logs."""

from __future__ import annotations

import logging

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from dfmod.db import make_engine, make_session_factory, session_scope
from dfmod.keys import revoke_key
from tests.utils.images import make_image_bytes
from tests.utils.records import bearer, seed_items

pytestmark = pytest.mark.integration
ITEM = "{item}"

# (method, path, body kind, scopes that may call it)
ENDPOINTS = [
    ("POST", "/v1/images", "upload", {"ingest"}),
    ("POST", "/v1/images:register", "register", {"ingest"}),
    ("GET", f"/v1/images/{ITEM}", None, {"ingest", "review"}),
    ("GET", "/v1/items", None, {"review"}),
    ("GET", f"/v1/items/{ITEM}", None, {"review"}),
    ("GET", f"/v1/items/{ITEM}/image?variant=thumb", None, {"review"}),
    ("GET", f"/v1/items/{ITEM}/heatmap", None, {"review"}),
    ("POST", f"/v1/items/{ITEM}/reviews", {"decision": "escalated"}, {"review"}),
    ("POST", f"/v1/items/{ITEM}/reviews/1/retract", {}, {"review", "admin"}),
    ("POST", "/v1/queue/claim", {"limit": 1}, {"review"}),
    ("POST", "/v1/queue/release", {"ids": []}, {"review"}),
    ("GET", "/v1/stats", None, {"review"}),
    ("GET", "/v1/keys", None, {"admin"}),
    ("POST", "/v1/keys", {"name": "made-in-matrix", "scopes": ["review"]}, {"admin"}),
    ("POST", "/v1/keys/nobody/revoke", None, {"admin"}),
    ("GET", "/v1/settings", None, {"admin"}),
    ("GET", "/v1/whoami", None, {"ingest", "review", "admin"}),
]
CALLERS = ["none", "unknown", "revoked", "ingest", "review", "admin"]


@pytest.fixture
def setup(integration_settings, make_api_key, s3_buckets):
    s3, (bucket, extra) = s3_buckets
    s3.put_object(Bucket=bucket, Key="seed/auth.jpg", Body=make_image_bytes())
    s3.put_object(Bucket=extra, Key="seed/register.jpg", Body=make_image_bytes())
    [item_id] = seed_items(integration_settings, [{"score": 0.9, "key": "seed/auth.jpg"}])
    keys = {scope: make_api_key(scope) for scope in ("ingest", "review", "admin")}
    keys["revoked"] = make_api_key("ingest", "review", "admin", name="to-revoke")
    engine = make_engine(integration_settings.resolved_database_url)
    with session_scope(make_session_factory(engine)) as session:
        revoke_key(session, "to-revoke")
    engine.dispose()
    keys["unknown"] = "dfmod_" + "x" * 43
    with TestClient(create_app(integration_settings)) as client:
        yield client, keys, item_id, extra


def _call(client, method, path, body, headers, extra_bucket):
    if body == "upload":
        return client.post(path, files={"file": ("a.jpg", make_image_bytes(), "image/jpeg")}, headers=headers)
    if body == "register":
        return client.post(path, json={"bucket": extra_bucket, "key": "seed/register.jpg"}, headers=headers)
    return client.request(method, path, json=body, headers=headers)


@pytest.mark.parametrize("method,path,body,allowed", ENDPOINTS, ids=[f"{m} {p}" for m, p, _b, _a in ENDPOINTS])
def test_scope_matrix(setup, method, path, body, allowed):
    client, keys, item_id, extra = setup
    path = path.replace(ITEM, item_id)
    outcomes = {}
    for caller in CALLERS:
        headers = {} if caller == "none" else bearer(keys[caller])
        response = _call(client, method, path, body, headers, extra)
        outcomes[caller] = response.status_code
        if caller in ("none", "unknown", "revoked"):
            assert response.status_code == 401, (caller, response.text)
            assert response.json()["error"] == "unauthorized"
            assert response.headers["www-authenticate"].startswith("Bearer")
        elif caller in allowed:
            assert response.status_code not in (401, 403), (caller, response.text)
        else:
            assert response.status_code == 403, (caller, response.text)
            assert response.json()["error"] == "forbidden"
    assert {c for c, code in outcomes.items() if code not in (401, 403)} == allowed


def test_the_key_may_also_come_in_x_api_key_and_never_in_the_url(setup):
    client, keys, _item_id, _extra = setup
    assert client.get("/v1/stats", headers={"X-API-Key": keys["review"]}).status_code == 200
    assert client.get(f"/v1/stats?key={keys['review']}").status_code == 401
    assert client.get(f"/v1/stats?api_key={keys['review']}").status_code == 401


def test_open_endpoints_need_no_key(setup):
    client, _keys, _item_id, _extra = setup
    for path in ("/healthz", "/readyz", "/metrics", "/review"):
        assert client.get(path).status_code == 200, path


def test_keys_are_never_logged_in_clear(setup, caplog):
    client, keys, _item_id, _extra = setup
    caplog.set_level(logging.DEBUG)
    wrong = "dfmod_" + "w" * 43
    client.get("/v1/stats", headers=bearer(wrong))
    client.get("/v1/stats", headers=bearer(keys["ingest"]))  # right key, wrong scope
    client.get("/v1/stats", headers=bearer(keys["revoked"]))
    text = caplog.text
    assert "rejected unknown or revoked API key" in text  # the rejection is logged ...
    for secret in (wrong, keys["ingest"], keys["revoked"], keys["ingest"][6:20]):
        assert secret not in text  # ... but never the key, nor a piece of it long enough to matter
