"""Key and settings administration over HTTP on real Postgres."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from api.main import create_app
from tests.utils.records import bearer

pytestmark = pytest.mark.integration


@pytest.fixture
def admin(integration_settings, make_api_key):
    with TestClient(create_app(integration_settings), headers=bearer(make_api_key("admin", name="root"))) as client:
        yield client


def test_create_list_use_and_revoke_a_key(admin):
    created = admin.post("/v1/keys", json={"name": "carol", "scopes": ["review", "ingest"]})
    assert created.status_code == 201 and created.headers["cache-control"] == "no-store"
    body = created.json()
    assert body["key"].startswith("dfmod_") and body["key"].startswith(body["prefix"])
    assert body["scopes"] == ["ingest", "review"]
    carol = bearer(body["key"])
    assert admin.get("/v1/whoami", headers=carol).json() == {
        "id": body["id"], "name": "carol", "scopes": ["ingest", "review"], "tenant": "default", "tenants": ["default"],
    }

    listed = {key["name"]: key for key in admin.get("/v1/keys").json()}
    assert set(listed) == {"root", "carol"} and "key" not in listed["carol"]
    assert listed["carol"]["last_used_at"] is not None  # touched by the whoami call

    duplicate = admin.post("/v1/keys", json={"name": "carol", "scopes": ["review"]})
    assert duplicate.status_code == 409 and duplicate.json()["error"] == "key_conflict"

    revoked = admin.post("/v1/keys/carol/revoke")
    assert revoked.status_code == 200 and revoked.json()["revoked_at"]
    assert admin.get("/v1/whoami", headers=carol).status_code == 401
    assert "carol" not in {key["name"] for key in admin.get("/v1/keys").json()}
    assert "carol" in {key["name"] for key in admin.get("/v1/keys?include_revoked=true").json()}
    # The name is free again once its key is revoked; revoking by id twice is harmless.
    assert admin.post("/v1/keys", json={"name": "carol", "scopes": ["review"]}).status_code == 201
    assert admin.post(f"/v1/keys/{body['id']}/revoke").status_code == 200
    assert admin.post("/v1/keys/nobody/revoke").json()["error"] == "not_found"


@pytest.mark.parametrize(
    "body", [{"name": "x", "scopes": []}, {"name": "x", "scopes": ["root"]}, {"name": "", "scopes": ["review"]}]
)
def test_invalid_keys_are_refused(admin, body):
    response = admin.post("/v1/keys", json=body)
    assert response.status_code == 422 and response.json()["error"] == "invalid_request"


def test_settings_are_shown_with_secrets_masked(integration_settings, make_api_key):
    settings = integration_settings.model_copy(
        update={
            "database_url": "postgresql+psycopg://dfmod:hunter2@db.internal:5432/dfmod",
            "rate_limit_storage_url": "redis://:limits-pw@redis.internal:6379/3",
            "secret_key": SecretStr("fernet-key-never-shown"),
        }
    )
    app = create_app(settings)
    # Swap the engine back to the test database: only the reported URL should carry the fake password.
    from dfmod.db import make_engine, make_session_factory

    app.state.engine = make_engine(integration_settings.resolved_database_url)
    app.state.session_factory = make_session_factory(app.state.engine)
    with TestClient(app, headers=bearer(make_api_key("admin"))) as client:
        shown = client.get("/v1/settings").json()
    text = str(shown)
    assert "hunter2" not in text and "event-secret" not in text
    assert "limits-pw" not in text and "fernet-key-never-shown" not in text and shown["secret_key"] == "**********"
    assert shown["s3_secret_access_key"] == shown["s3_event_token"] == "**********"
    assert shown["database_url"] == "postgresql+psycopg://***@db.internal:5432/dfmod"
    assert shown["batch_size"] == integration_settings.batch_size and shown["review_band"] == 0.0
