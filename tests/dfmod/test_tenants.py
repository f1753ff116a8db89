"""dfmod.tenants on SQLite: who sees what (Access), encrypted callback secrets and the key that encrypts
them, bucket ownership, rotation windows."""

from __future__ import annotations

from datetime import timedelta

import pytest

from dfmod import migrate, tenants
from dfmod.db import DEFAULT_TENANT_ID, Tenant, make_engine, make_session_factory, session_scope, utcnow
from dfmod.keys import KeyProblem, create_key
from dfmod.settings import Settings


@pytest.fixture
def factory(tmp_path):
    settings = Settings(data_dir=tmp_path)
    migrate.upgrade(settings)
    engine = make_engine(settings.resolved_database_url)
    yield make_session_factory(engine)
    engine.dispose()


def test_access_rules_follow_scopes_and_tenants(factory):
    box = tenants.SecretBox([tenants.generate_secret_key()])
    with session_scope(factory) as session:
        a = tenants.create_tenant(session, box, "a").tenant.id
        b = tenants.create_tenant(session, box, "b").tenant.id
        ingest = tenants.Access.of(create_key(session, "ingest-a", ["ingest"], ["a"]).key)
        limited = tenants.Access.of(create_key(session, "review-ab", ["review"], ["a", "b"]).key)
        everyone = tenants.Access.of(create_key(session, "review-all", ["review"]).key)
        admin = tenants.Access.of(create_key(session, "admin", ["admin"]).key)
        legacy = tenants.Access.of(create_key(session, "legacy-ingest", ["ingest"]).key)
        with pytest.raises(KeyProblem, match="exactly one tenant"):
            create_key(session, "ingest-two", ["ingest"], ["a", "b"])
    assert ingest.can_read(a) and not ingest.can_read(b) and not ingest.can_review(a)
    assert limited.can_review(a) and limited.can_review(b) and not limited.can_review(DEFAULT_TENANT_ID)
    assert everyone.can_review(DEFAULT_TENANT_ID) and everyone.review_tenants is None
    assert admin.is_admin and not admin.can_review(a)  # global, but reviewing needs the review scope
    assert legacy.ingest_tenant == DEFAULT_TENANT_ID  # an ingest key without a tenant joins the default one


def test_a_dump_cannot_sign_and_the_encryption_key_rotates(factory):
    old_key, new_key = tenants.generate_secret_key(), tenants.generate_secret_key()
    with session_scope(factory) as session:
        made = tenants.create_tenant(session, tenants.SecretBox([old_key]), "p", "https://p.example/hook")
        stored = made.tenant.callback_secret_encrypted
    assert made.callback_secret not in stored
    with pytest.raises(tenants.TenantProblem):
        tenants.SecretBox([new_key]).decrypt(stored)
    # New key first, old key kept to read what is stored; re-encrypt; then the new key alone suffices.
    with session_scope(factory) as session:
        assert tenants.reencrypt_secrets(session, tenants.SecretBox([new_key, old_key])) == 1
    with session_scope(factory) as session:
        tenant = tenants.get_tenant(session, "p")
        target = tenants.callback_target(tenant, Settings(), tenants.SecretBox([new_key]), "any")
    assert target.url == "https://p.example/hook" and target.secrets == (made.callback_secret,)


def test_rotation_window_and_bucket_ownership(factory, tmp_path):
    box = tenants.SecretBox([tenants.generate_secret_key()])
    settings = Settings(data_dir=tmp_path, allowed_buckets="legacy-bucket")
    with session_scope(factory) as session:
        made = tenants.create_tenant(session, box, "p", "https://p.example/hook", buckets=["p-media"])
        now = utcnow()
        rotated = tenants.rotate_callback_secret(session, box, made.tenant, overlap_s=60, now=now)
        during = tenants.callback_target(made.tenant, settings, box, "s", now=now + timedelta(seconds=30))
        after = tenants.callback_target(made.tenant, settings, box, "s", now=now + timedelta(seconds=61))
        with pytest.raises(tenants.TenantProblem, match="belongs to another tenant"):
            tenants.create_tenant(session, box, "q", buckets=["p-media"])
    assert during.secrets == (rotated.callback_secret, made.callback_secret)
    assert after.secrets == (rotated.callback_secret,)
    directory = tenants.BucketDirectory(settings, factory)
    tenant_id = made.tenant.id
    assert directory.owner("p-media") == tenant_id and directory.owner("legacy-bucket") == DEFAULT_TENANT_ID
    assert tenants.may_ingest(directory, tenant_id, "p-media", "x.jpg")
    assert not tenants.may_ingest(directory, DEFAULT_TENANT_ID, "p-media", "x.jpg")
    # dfmod's own prefixes of the upload bucket belong to no tenant.
    assert not tenants.may_ingest(directory, DEFAULT_TENANT_ID, settings.upload_bucket, "uploads/2026/a.jpg")
    assert tenants.may_ingest(directory, DEFAULT_TENANT_ID, settings.upload_bucket, "other/a.jpg")
    assert directory.owner("nobody's") is None


def test_events_tokens_map_to_their_tenant_and_the_setting_to_the_default(factory):
    from pydantic import SecretStr

    settings = Settings(s3_event_token=SecretStr("legacy-token"))
    with session_scope(factory) as session:
        made = tenants.create_tenant(session, tenants.SecretBox([tenants.generate_secret_key()]), "p")
        assert session.get(Tenant, made.tenant.id).events_token_hash == tenants.hash_token(made.events_token)
        assert tenants.tenant_for_events_token(session, settings, made.events_token).name == "p"
        assert tenants.tenant_for_events_token(session, settings, "legacy-token").id == DEFAULT_TENANT_ID
        assert tenants.tenant_for_events_token(session, settings, "wrong") is None
        new = tenants.rotate_events_token(session, made.tenant).events_token
        assert tenants.tenant_for_events_token(session, settings, made.events_token) is None
        assert tenants.tenant_for_events_token(session, settings, new).name == "p"
        tenants.disable_tenant(session, made.tenant)
        assert tenants.tenant_for_events_token(session, settings, new) is None
