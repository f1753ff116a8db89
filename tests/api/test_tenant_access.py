"""Tenants kept apart, on a real ``dfmod api`` process over real Postgres, Redis and an S3 server.

The access matrix: two tenants (A and B) x {A's ingest key, A's review key limited to A, a global review key,
an admin key} x every endpoint, against an item of A and an item of B; each answer is exactly the one the
README's table promises (200/201/202, 401, 403, 404). Then: A's events token, key and callback secret cannot
create, read, review or sign anything of B.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from urllib.parse import urlparse

import httpx
import pytest
from pydantic import SecretStr
from sqlalchemy import func, select

from api.auth import signed_link
from dfmod import tenants
from dfmod.callbacks import EVENT_VERDICT, SIGNATURE_HEADER, deliver, verify_signature
from dfmod.db import ApiKey, Item, Review, make_engine, make_session_factory, session_scope
from tests.utils.images import make_image_bytes
from tests.utils.processes import ApiProcess
from tests.utils.records import bearer, seed_items

pytestmark = pytest.mark.integration
OWN, OTHER = "own", "other"
CALLERS = ("ingest_a", "review_a", "review_all", "admin")


@pytest.fixture
def world(integration_settings, integration_env, make_api_key, s3_buckets, callback_receiver, tmp_path):
    """Tenants A and B, each with a bucket, an object, a classified item, a callback receiver and keys."""
    s3, (upload_bucket, _extra) = s3_buckets
    suffix = uuid.uuid4().hex[:8]
    secret_key = tenants.generate_secret_key()
    settings = integration_settings.model_copy(update={"secret_key": SecretStr(secret_key)})
    engine = make_engine(settings.resolved_database_url)
    factory = make_session_factory(engine)
    receivers = {"a": callback_receiver(), "b": callback_receiver()}
    made, buckets, ids = {}, {}, {}
    with session_scope(factory) as session:
        for name in ("a", "b"):
            buckets[name] = f"tenant-{name}-{suffix}"
            s3.create_bucket(Bucket=buckets[name])
            for key in ("seed/item.jpg", "seed/register.jpg", "seed/event.jpg"):
                s3.put_object(Bucket=buckets[name], Key=key, Body=make_image_bytes(color=(10, 200, 30)))
            made[name] = tenants.create_tenant(
                session, tenants.secret_box(settings), f"platform-{name}-{suffix}", receivers[name].url, [buckets[name]]
            )
    for name in ("a", "b"):
        [ids[name]] = seed_items(
            settings, [{"score": 0.9, "bucket": buckets[name], "key": "seed/item.jpg", "tenant_id": made[name].tenant.id}]
        )
    keys = {
        "ingest_a": make_api_key("ingest", tenants=(made["a"].tenant.name,)),
        "ingest_b": make_api_key("ingest", tenants=(made["b"].tenant.name,)),
        "review_a": make_api_key("review", name="reviewer-a", tenants=(made["a"].tenant.name,)),
        "review_all": make_api_key("review", name="reviewer-all"),
        "admin": make_api_key("admin", name="the-admin"),
    }
    api = ApiProcess({**integration_env, "DFMOD_SECRET_KEY": secret_key}, tmp_path / "api.log")
    with httpx.Client(base_url=api.url, follow_redirects=True, timeout=60) as client:
        yield {
            "client": client, "settings": settings, "factory": factory, "keys": keys, "ids": ids, "made": made,
            "buckets": buckets, "receivers": receivers,
            "upload_bucket": upload_bucket,
        }
    api.stop()
    engine.dispose()


def _review(world, item: str, key: str) -> int:
    response = world["client"].post(f"/v1/items/{item}/reviews", json={"decision": "escalated"}, headers=bearer(key))
    assert response.status_code == 201, response.text
    return response.json()["id"]


# Each endpoint: how to call it for a target item (of A, or of B), and what each caller gets for each target.
# A request that names no item has the same answer for both targets.
def _upload(world, item, headers):
    return world["client"].post("/v1/images", files={"file": ("a.jpg", make_image_bytes(), "image/jpeg")}, headers=headers)


def _register(world, item, headers):
    tenant = "a" if item == world["ids"]["a"] else "b"
    body = {"bucket": world["buckets"][tenant], "key": "seed/register.jpg"}
    return world["client"].post("/v1/images:register", json=body, headers=headers)


def _get(path):
    return lambda world, item, headers: world["client"].get(path.format(item=item), headers=headers)


def _post(path, body):
    return lambda world, item, headers: world["client"].post(path.format(item=item), json=body, headers=headers)


def _retract(world, item, headers):
    # The decision to undo was made by the global reviewer, so only an admin (or that reviewer) may undo it.
    review_id = _review(world, item, world["keys"]["review_all"])
    return world["client"].post(f"/v1/items/{item}/reviews/{review_id}/retract", json={}, headers=headers)


#                    caller:      ingest_a     review_a      review_all    admin
EVERY = {"own": (202, 403, 403, 403), "other": (202, 403, 403, 403)}
ENDPOINTS = {
    "POST /v1/images": (_upload, EVERY),
    "POST /v1/images:register": (_register, {OWN: (202, 403, 403, 403), OTHER: (403, 403, 403, 403)}),
    "GET /v1/images/{id}": (_get("/v1/images/{item}"), {OWN: (200, 200, 200, 403), OTHER: (404, 404, 200, 403)}),
    "GET /v1/items": (_get("/v1/items"), {OWN: (403, 200, 200, 403), OTHER: (403, 200, 200, 403)}),
    "GET /v1/items/{id}": (_get("/v1/items/{item}"), {OWN: (403, 200, 200, 403), OTHER: (403, 404, 200, 403)}),
    "GET /v1/items/{id}/image": (
        _get("/v1/items/{item}/image?variant=thumb"), {OWN: (403, 200, 200, 403), OTHER: (403, 404, 200, 403)},
    ),
    "GET /v1/items/{id}/heatmap": (
        _get("/v1/items/{item}/heatmap"), {OWN: (403, 202, 202, 403), OTHER: (403, 404, 202, 403)},
    ),
    "POST /v1/items/{id}/reviews": (
        _post("/v1/items/{item}/reviews", {"decision": "confirmed_fake"}),
        {OWN: (403, 201, 201, 403), OTHER: (403, 404, 201, 403)},
    ),
    "POST /v1/items/{id}/reviews/{rid}/retract": (
        _retract, {OWN: (403, 403, 201, 201), OTHER: (403, 404, 201, 201)},
    ),
    "POST /v1/queue/claim": (_post("/v1/queue/claim", {"limit": 5}), {OWN: (403, 200, 200, 403), OTHER: (403, 200, 200, 403)}),
    "POST /v1/queue/release": (
        _post("/v1/queue/release", {"ids": ["{item}"]}), {OWN: (403, 200, 200, 403), OTHER: (403, 200, 200, 403)},
    ),
    "GET /v1/stats": (_get("/v1/stats"), {OWN: (403, 200, 200, 403), OTHER: (403, 200, 200, 403)}),
    "GET /v1/tenants": (_get("/v1/tenants"), {OWN: (403, 403, 403, 200), OTHER: (403, 403, 403, 200)}),
    "GET /v1/keys": (_get("/v1/keys"), {OWN: (403, 403, 403, 200), OTHER: (403, 403, 403, 200)}),
    "GET /v1/settings": (_get("/v1/settings"), {OWN: (403, 403, 403, 200), OTHER: (403, 403, 403, 200)}),
    "GET /v1/whoami": (_get("/v1/whoami"), {OWN: (200, 200, 200, 200), OTHER: (200, 200, 200, 200)}),
}


@pytest.mark.parametrize("endpoint", list(ENDPOINTS))
def test_access_matrix(world, endpoint):
    call, expected = ENDPOINTS[endpoint]
    observed = {}
    for target, item in ((OWN, world["ids"]["a"]), (OTHER, world["ids"]["b"])):
        # No key, and an unknown key: 401 everywhere, whatever the item.
        for headers in ({}, bearer("dfmod_" + "u" * 43)):
            response = call(world, item, headers)
            assert response.status_code == 401, (endpoint, target, response.text)
        for caller, _status in zip(CALLERS, expected[target], strict=True):
            response = call(world, item, bearer(world["keys"][caller]))
            observed[(target, caller)] = response.status_code
            if response.status_code == 404:
                # "Not found", exactly as for an id that does not exist: nothing about the other tenant.
                assert response.json() == {"error": "not_found", "message": f"no item {item}"}
    wanted = {(target, caller): status for target in (OWN, OTHER) for caller, status in zip(CALLERS, expected[target], strict=True)}
    assert observed == wanted


def test_review_queries_show_only_the_keys_tenants(world):
    client, keys, ids = world["client"], world["keys"], world["ids"]
    limited, everyone = bearer(keys["review_a"]), bearer(keys["review_all"])
    assert [item["id"] for item in client.get("/v1/items", headers=limited).json()["items"]] == [ids["a"]]
    assert {item["id"] for item in client.get("/v1/items", headers=everyone).json()["items"]} == {ids["a"], ids["b"]}
    assert client.get("/v1/stats", headers=limited).json()["total"] == 1
    assert client.get("/v1/stats", headers=everyone).json()["total"] == 2
    claimed = client.post("/v1/queue/claim", json={"limit": 10}, headers=limited).json()["items"]
    assert [item["id"] for item in claimed] == [ids["a"]]
    # B's item was not claimable by A's reviewer, so the global reviewer gets it (and A's is leased already).
    claimed = client.post("/v1/queue/claim", json={"limit": 10}, headers=everyone).json()["items"]
    assert [item["id"] for item in claimed] == [ids["b"]]


def test_a_tenants_token_key_and_secret_reach_nothing_of_another_tenant(world):
    client, keys, ids, buckets, made = world["client"], world["keys"], world["ids"], world["buckets"], world["made"]
    token_a = made["a"].events_token

    def count_items(tenant: str) -> int:
        with session_scope(world["factory"]) as session:
            return session.scalar(select(func.count()).select_from(Item).where(Item.tenant_id == made[tenant].tenant.id))

    before_b = count_items("b")

    # Events: A's token on B's bucket records nothing; on A's own bucket it records into A.
    def record(bucket: str, key: str) -> dict:
        return {"eventName": "ObjectCreated:Put", "s3": {"bucket": {"name": bucket}, "object": {"key": key, "eTag": "e1"}}}

    refused = client.post("/v1/events/s3", json={"Records": [record(buckets["b"], "seed/event.jpg")]},
                          headers={"Authorization": f"Bearer {token_a}"})
    assert refused.status_code == 400 and refused.json()["records"][0]["reason"] == "bucket_not_allowed"
    accepted = client.post("/v1/events/s3", json={"Records": [record(buckets["a"], "seed/event.jpg")]},
                           headers={"Authorization": f"Bearer {token_a}"})
    assert accepted.status_code == 202, accepted.text
    # The same object notified with B's token afterwards: B cannot take over A's item either.
    stolen = client.post("/v1/events/s3", json={"Records": [record(buckets["a"], "seed/event.jpg")]},
                         headers={"Authorization": f"Bearer {made['b'].events_token}"})
    assert stolen.status_code == 400
    assert "id" not in stolen.json()["records"][0] or stolen.json()["records"][0]["id"] is None
    # The uploads dfmod stores for every tenant cannot be claimed by naming their keys.
    upload = client.post("/v1/images", files={"file": ("b.jpg", make_image_bytes(), "image/jpeg")},
                         headers=bearer(keys["ingest_b"])).json()
    with session_scope(world["factory"]) as session:
        upload_key = session.get(Item, upload["id"]).key
    grab = client.post("/v1/images:register", json={"bucket": world["upload_bucket"], "key": upload_key},
                       headers=bearer(keys["ingest_a"]))
    assert grab.status_code == 403 and grab.json()["error"] == "bucket_not_allowed"
    assert client.get(f"/v1/images/{upload['id']}", headers=bearer(keys["ingest_a"])).status_code == 404
    # Identical bytes uploaded by A afterwards: a new item of A's, and nothing names (or hints at) B's.
    same = client.post("/v1/images", files={"file": ("a.jpg", make_image_bytes(), "image/jpeg")},
                       headers=bearer(keys["ingest_a"]))
    assert same.status_code == 202 and same.json()["duplicate"] is False and same.json()["duplicate_of"] is None
    again = client.post("/v1/images", files={"file": ("a.jpg", make_image_bytes(), "image/jpeg")},
                        headers=bearer(keys["ingest_a"])).json()
    assert again["duplicate"] is True and again["duplicate_of"] == same.json()["id"]  # within A: named

    # Keys: A's ingest key cannot create in B's bucket nor read B's items; A's reviewer cannot review them.
    assert client.post("/v1/images:register", json={"bucket": buckets["b"], "key": "seed/register.jpg"},
                       headers=bearer(keys["ingest_a"])).status_code == 403
    assert client.get(f"/v1/images/{ids['b']}", headers=bearer(keys["ingest_a"])).status_code == 404
    assert client.post(f"/v1/items/{ids['b']}/reviews", json={"decision": "overturned_real"},
                       headers=bearer(keys["review_a"])).status_code == 404
    # A reviewer's signed image link only opens items of its own tenants, even one correctly signed for B's item.
    with session_scope(world["factory"]) as session:
        reviewer_a = session.scalar(select(ApiKey).where(ApiKey.name == "reviewer-a"))
        link = urlparse(signed_link(f"http://testserver/v1/items/{ids['b']}/image", reviewer_a, ids["b"], "full", 60,
                                    {"variant": "full"}))
    assert client.get(f"{link.path}?{link.query}").status_code == 404
    own = urlparse(client.get(f"/v1/items/{ids['a']}", headers=bearer(keys["review_a"])).json()["image_url"])
    assert client.get(f"{own.path}?{own.query}").status_code == 200
    assert count_items("b") == before_b + 1  # only B's own upload
    with session_scope(world["factory"]) as session:
        assert session.scalar(select(func.count()).select_from(Review).where(Review.item_id == ids["b"])) == 0

    # Callbacks: B's event goes to B's receiver only, signed with B's secret; A's secret does not verify it.
    result = deliver(world["settings"], world["factory"], EVENT_VERDICT, ids["b"], "m1", 1)
    assert result.delivered, result
    assert world["receivers"]["a"].requests == []
    [(headers, body)] = world["receivers"]["b"].requests
    signature = headers[SIGNATURE_HEADER]
    assert verify_signature(made["b"].callback_secret, signature, body)
    assert not verify_signature(made["a"].callback_secret, signature, body)
    # The database holds the secrets only encrypted: a dump alone cannot sign.
    with session_scope(world["factory"]) as session:
        stored = session.get(type(made["b"].tenant), made["b"].tenant.id).callback_secret_encrypted
    assert made["b"].callback_secret not in stored
    other_box = tenants.SecretBox([tenants.generate_secret_key()])
    with pytest.raises(tenants.TenantProblem):
        other_box.decrypt(stored)


def test_tenant_admin_api_and_a_disabled_tenant(world):
    client, keys, made = world["client"], world["keys"], world["made"]
    admin = bearer(keys["admin"])
    created = client.post("/v1/tenants", json={"name": "platform-c", "callback_url": "https://c.example/hook",
                                               "buckets": ["c-bucket"]}, headers=admin)
    assert created.status_code == 201 and created.headers["cache-control"] == "no-store"
    body = created.json()
    assert body["events_token"].startswith("dfmodev_") and body["callback_secret"].startswith("whsec_")
    assert body["buckets"] == ["c-bucket"]
    listed = {t["name"]: t for t in client.get("/v1/tenants", headers=admin).json()}
    assert {"default", "platform-c", made["a"].tenant.name} <= set(listed)
    assert "events_token" not in listed["platform-c"] and "callback_secret" not in listed["platform-c"]
    # A bucket has one tenant: asking for A's bucket says it is taken, not by whom.
    taken = client.patch("/v1/tenants/platform-c", json={"add_buckets": [world["buckets"]["a"]]}, headers=admin)
    assert taken.status_code == 409 and taken.json()["error"] == "bucket_taken"
    assert made["a"].tenant.name not in taken.json()["message"]
    patched = client.patch("/v1/tenants/platform-c", json={"threshold": 0.7, "callback_url": None}, headers=admin)
    assert patched.status_code == 200 and patched.json()["threshold"] == 0.7 and patched.json()["callback_url"] is None
    rotated = client.post("/v1/tenants/platform-c/callback-secret:rotate", json={"overlap_s": 600}, headers=admin)
    assert rotated.status_code == 200 and rotated.json()["callback_secret"] != body["callback_secret"]
    assert rotated.json()["previous_secret_until"] is not None
    assert client.get("/v1/tenants/nope", headers=admin).status_code == 404
    # Keys for the new tenant over HTTP: an ingest key records into it; a review key is limited to it.
    ingest_c = client.post("/v1/keys", json={"name": "c-ingest", "scopes": ["ingest"], "tenants": ["platform-c"]},
                           headers=admin)
    assert ingest_c.status_code == 201 and ingest_c.json()["tenant"] == "platform-c"
    assert ingest_c.json()["tenants"] == ["platform-c"]
    two = client.post("/v1/keys", json={"name": "c-two", "scopes": ["ingest"], "tenants": ["platform-c", "default"]},
                      headers=admin)
    assert two.status_code == 409 and two.json()["error"] == "key_conflict"
    unknown = client.post("/v1/keys", json={"name": "c-x", "scopes": ["review"], "tenants": ["nope"]}, headers=admin)
    assert unknown.status_code == 404 and unknown.json()["error"] == "tenant_not_found"

    # Disabling A: its keys and events token answer 401; its items stay visible to the global reviewer.
    assert client.post(f"/v1/tenants/{made['a'].tenant.name}/disable", headers=admin).status_code == 200
    assert client.get("/v1/whoami", headers=bearer(keys["ingest_a"])).status_code == 401
    event = {"Records": [{"eventName": "ObjectCreated:Put",
                          "s3": {"bucket": {"name": world["buckets"]["a"]}, "object": {"key": "seed/event.jpg"}}}]}
    assert client.post("/v1/events/s3", json=event,
                       headers={"Authorization": f"Bearer {made['a'].events_token}"}).status_code == 401
    assert client.get(f"/v1/items/{world['ids']['a']}", headers=bearer(keys["review_all"])).status_code == 200


def test_callback_secret_rotation_signs_with_both_until_the_overlap_ends(world):
    settings, factory, made, ids = world["settings"], world["factory"], world["made"], world["ids"]
    old_secret = made["a"].callback_secret
    with session_scope(factory) as session:
        tenant = tenants.get_tenant(session, made["a"].tenant.id)
        new_secret = tenants.rotate_callback_secret(session, tenants.secret_box(settings), tenant, 3600).callback_secret
    assert deliver(settings, factory, EVENT_VERDICT, ids["a"], "m1", 1).delivered
    headers, body = world["receivers"]["a"].requests[-1]
    signature = headers[SIGNATURE_HEADER]
    assert signature.count("v1=") == 2
    # A receiver holding either secret accepts the event during the overlap.
    assert verify_signature(new_secret, signature, body) and verify_signature(old_secret, signature, body)
    with session_scope(factory) as session:
        tenants.get_tenant(session, made["a"].tenant.id).previous_secret_until = datetime(2020, 1, 1, tzinfo=timezone.utc)
    world["receivers"]["a"].requests.clear()
    # Another event (a review) after the overlap: one signature, by the new secret only.
    review_id = _review(world, ids["a"], world["keys"]["review_a"])
    from dfmod.callbacks import EVENT_REVIEW

    assert deliver(settings, factory, EVENT_REVIEW, ids["a"], str(review_id), 1).delivered
    headers, body = world["receivers"]["a"].requests[-1]
    assert headers[SIGNATURE_HEADER].count("v1=") == 1
    assert verify_signature(new_secret, headers[SIGNATURE_HEADER], body)
    assert not verify_signature(old_secret, headers[SIGNATURE_HEADER], body)
