"""The reviewer API on real Postgres, Redis and an S3 server: every filter, ordering and pagination edge,
the review queue, append-only decisions with undo, statistics, image links and heatmaps."""

from __future__ import annotations

import io
from datetime import datetime, timedelta, timezone
from urllib.parse import quote

import pytest
import redis
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import func, select

from api.main import create_app
from dfmod.db import Review, make_engine, make_session_factory, session_scope
from tests.utils.images import make_image_bytes
from tests.utils.records import bearer, seed_items

pytestmark = pytest.mark.integration
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)

# name -> spec; scores straddle the 0.5 threshold, with d in the review band when the band is 0.1.
CATALOGUE = {
    "a": {"score": 0.95, "source": "alpha", "model_version": "m1"},
    "b": {"score": 0.80, "source": "beta", "model_version": "m2"},
    "c": {"score": 0.55, "source": "alpha", "model_version": "m1"},
    "d": {"score": 0.45, "source": "beta", "model_version": "m1"},
    "e": {"score": 0.10, "source": "alpha", "model_version": "m2"},
    "f": {"score": None, "source": "alpha"},
    "g": {"score": None, "source": "beta", "status": "failed"},
}
DECIDED = {"a": "confirmed_fake", "b": "overturned_real", "c": "escalated"}


@pytest.fixture
def reviewer(integration_settings, make_api_key):
    key = make_api_key("review", name="alice")
    settings = integration_settings.model_copy(update={"review_band": 0.1})
    with TestClient(create_app(settings), headers=bearer(key)) as client:
        yield client


@pytest.fixture
def catalogue(integration_settings, reviewer) -> dict[str, str]:
    specs = [{**spec, "created_at": T0 + timedelta(hours=i)} for i, spec in enumerate(CATALOGUE.values())]
    ids = dict(zip(CATALOGUE, seed_items(integration_settings, specs), strict=True))
    for name, decision in DECIDED.items():
        response = reviewer.post(f"/v1/items/{ids[name]}/reviews", json={"decision": decision, "note": name})
        assert response.status_code == 201, response.text
    return ids


def _names(ids: dict[str, str], page: dict) -> list[str]:
    by_id = {value: key for key, value in ids.items()}
    return [by_id[item["id"]] for item in page["items"]]


@pytest.mark.parametrize(
    "query,expected",
    [
        ("", "gfedcba"),
        ("label=fake", "cba"),
        ("label=real", "ed"),
        ("status=classified", "edcba"),
        ("status=failed", "g"),
        ("status=queued", "f"),
        ("min_score=0.5", "cba"),
        ("max_score=0.5", "ed"),
        ("min_score=0.45&max_score=0.8", "dcb"),
        ("model_version=m2", "eb"),
        ("source=alpha", "feca"),
        ("reviewed=true", "cba"),
        ("reviewed=false", "gfed"),
        ("decision=confirmed_fake", "a"),
        ("decision=escalated", "c"),
        ("in_review=true", "dcba"),  # flagged, plus d within the 0.1 band
        ("in_review=false", "gfe"),
        (f"since={quote((T0 + timedelta(hours=2)).isoformat())}", "gfedc"),
        ("until=2026-03-01T14:00:00Z", "ba"),
        ("since=2026-03-01T13:00:00&until=2026-03-01T15:00:00", "cb"),  # no zone: UTC
        ("source=alpha&label=fake&reviewed=false", ""),
        ("source=beta&min_score=0.4", "db"),
    ],
)
def test_every_filter(reviewer, catalogue, query, expected):
    response = reviewer.get(f"/v1/items?{query}")
    assert response.status_code == 200, response.text
    assert "".join(_names(catalogue, response.json())) == expected


@pytest.mark.parametrize(
    "order,expected",
    [("newest", "gfedcba"), ("oldest", "abcdefg"), ("score_desc", "abcde"), ("score_asc", "edcba")],
)
def test_orderings(reviewer, catalogue, order, expected):
    assert "".join(_names(catalogue, reviewer.get(f"/v1/items?order={order}").json())) == expected


@pytest.mark.parametrize(
    "query,error",
    [
        ("label=maybe", "invalid_request"),
        ("min_score=1.5", "invalid_request"),
        ("min_score=0.9&max_score=0.1", "invalid_request"),
        ("order=random", "invalid_request"),
        ("limit=0", "invalid_request"),
        ("cursor=not-a-cursor", "invalid_cursor"),
        ("since=yesterday", "invalid_request"),
    ],
)
def test_bad_queries_are_clear_4xx(reviewer, catalogue, query, error):
    response = reviewer.get(f"/v1/items?{query}")
    assert 400 <= response.status_code < 500 and response.json()["error"] == error


def _walk(client, query: str, limit: int) -> list[str]:
    ids, cursor, pages = [], None, 0
    while True:
        page = client.get(f"/v1/items?{query}&limit={limit}" + (f"&cursor={cursor}" if cursor else "")).json()
        ids += [item["id"] for item in page["items"]]
        cursor, pages = page["next_cursor"], pages + 1
        if cursor is None:
            return ids
        assert pages < 100


@pytest.mark.parametrize("order", ["score_desc", "score_asc", "newest", "oldest"])
@pytest.mark.parametrize("limit", [1, 2, 3, 7, 50])
def test_pagination_with_ties_visits_every_item_once_in_order(reviewer, integration_settings, order, limit):
    # Seven items share one score and three share one timestamp: ties are broken by id, consistently.
    specs = [{"score": 0.7, "created_at": T0} for _ in range(3)]
    specs += [{"score": 0.7, "created_at": T0 + timedelta(seconds=i)} for i in range(1, 5)]
    specs += [{"score": 0.9}, {"score": 0.2}]
    seed_items(integration_settings, specs)
    walked = _walk(reviewer, f"order={order}", limit)
    everything = [item["id"] for item in reviewer.get(f"/v1/items?order={order}&limit=500").json()["items"]]
    assert walked == everything and len(set(walked)) == len(specs)
    rows = reviewer.get(f"/v1/items?order={order}&limit=500").json()["items"]
    sort_key = [(r["score"] if order.startswith("score") else r["created_at"], r["id"]) for r in rows]
    assert sort_key == sorted(sort_key, reverse=order in ("score_desc", "newest"))


def test_the_last_page_has_no_cursor_and_an_exact_fit_needs_no_empty_page(reviewer, integration_settings):
    seed_items(integration_settings, [{"score": 0.1 * i} for i in range(1, 5)])
    first = reviewer.get("/v1/items?order=score_desc&limit=2").json()
    second = reviewer.get(f"/v1/items?order=score_desc&limit=2&cursor={first['next_cursor']}").json()
    assert len(second["items"]) == 2 and second["next_cursor"] is None
    assert reviewer.get("/v1/items?order=score_desc&limit=4").json()["next_cursor"] is None


def test_items_arriving_between_pages_never_shift_a_page(reviewer, integration_settings):
    seed_items(integration_settings, [{"score": s, "created_at": T0 + timedelta(minutes=i)} for i, s in enumerate([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])])
    for order, arrivals in [
        # newest first: fresh items land before the cursor and are not shown on later pages
        ("newest", [{"score": 0.99, "created_at": T0 + timedelta(hours=5)}]),
        # score order: a new item above the cursor is behind us, one below it is still ahead
        ("score_desc", [{"score": 0.95}, {"score": 0.45}]),
        # oldest first: new items are appended at the end and are reached
        ("oldest", [{"score": 0.3, "created_at": T0 + timedelta(hours=6)}]),
    ]:
        before = [item["id"] for item in reviewer.get(f"/v1/items?order={order}&limit=500").json()["items"]]
        first = reviewer.get(f"/v1/items?order={order}&limit=3").json()
        new_ids = seed_items(integration_settings, arrivals)
        rest = _walk_from(reviewer, order, first["next_cursor"])
        seen = [item["id"] for item in first["items"]] + rest
        assert len(seen) == len(set(seen)), order
        after = [item["id"] for item in reviewer.get(f"/v1/items?order={order}&limit=500").json()["items"]]
        position = {item_id: index for index, item_id in enumerate(after)}
        boundary = position[first["items"][-1]["id"]]
        # Exactly: the old items in order, plus the new ones that sort after the first page's last row.
        assert seen == [i for i in after if i in set(before) or position[i] > boundary], order
        assert set(before) <= set(seen)
        if order == "newest":
            assert new_ids[0] not in seen
        if order == "score_desc":
            assert new_ids[0] not in seen and new_ids[1] in seen
        if order == "oldest":
            assert new_ids[0] == seen[-1]


def _walk_from(client, order: str, cursor: str | None) -> list[str]:
    ids = []
    while cursor:
        page = client.get(f"/v1/items?order={order}&limit=3&cursor={cursor}").json()
        ids += [item["id"] for item in page["items"]]
        cursor = page["next_cursor"]
    return ids


def test_a_cursor_only_works_with_its_own_order(reviewer, integration_settings):
    seed_items(integration_settings, [{"score": 0.5}, {"score": 0.6}])
    cursor = reviewer.get("/v1/items?order=score_desc&limit=1").json()["next_cursor"]
    response = reviewer.get(f"/v1/items?order=newest&cursor={cursor}")
    assert response.status_code == 400 and response.json()["error"] == "invalid_cursor"


def test_item_detail_has_every_verdict_every_review_and_working_image_links(
    reviewer, integration_settings, s3_buckets
):
    s3, (bucket, _extra) = s3_buckets
    original = make_image_bytes("PNG", size=(640, 480))
    s3.put_object(Bucket=bucket, Key="seed/detail.png", Body=original)
    [item_id] = seed_items(integration_settings, [{"score": 0.3, "model_version": "m1", "key": "seed/detail.png"}])
    # A second model version classifies the same item later.
    engine = make_engine(integration_settings.resolved_database_url)
    with session_scope(make_session_factory(engine)) as session:
        from dfmod.db import Item, Verdict

        session.add(Verdict(item_id=item_id, label="fake", fake_probability=0.8, threshold=0.6, model_version="m2",
                            created_at=T0 + timedelta(days=1)))
        item = session.get(Item, item_id)
        item.score, item.label, item.threshold, item.model_version = 0.8, "fake", 0.6, "m2"
    engine.dispose()
    reviewer.post(f"/v1/items/{item_id}/reviews", json={"decision": "escalated", "note": "looks edited"})
    reviewer.post(f"/v1/items/{item_id}/reviews", json={"decision": "confirmed_fake"})

    detail = reviewer.get(f"/v1/items/{item_id}").json()
    assert [v["model_version"] for v in detail["verdicts"]] == ["m1", "m2"]
    assert (detail["score"], detail["threshold"], detail["flagged"]) == (0.8, 0.6, True)
    assert [(r["decision"], r["reviewer"], r["note"]) for r in detail["reviews"]] == [
        ("escalated", "alice", "looks edited"), ("confirmed_fake", "alice", None),
    ]
    assert detail["decision"] == "confirmed_fake" and detail["decided_by"] == "alice"

    anonymous = TestClient(reviewer.app)
    full = anonymous.get(detail["image_url"])
    assert full.status_code == 200 and full.content == original and full.headers["content-type"] == "image/png"
    assert full.headers["x-content-type-options"] == "nosniff"
    thumb = anonymous.get(detail["thumbnail_url"])
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(thumb.content)).size) == 256

    # The signature covers item, variant and expiry: change any and the link dies.
    tampered = detail["image_url"].replace("variant=full", "variant=thumb")
    assert anonymous.get(tampered).status_code == 403
    other = seed_items(integration_settings, [{"score": 0.9}])[0]
    assert anonymous.get(detail["image_url"].replace(item_id, other)).status_code == 403
    assert anonymous.get(f"/v1/items/{item_id}/image").status_code == 401
    assert reviewer.get(f"/v1/items/{item_id}/image?variant=thumb").status_code == 200  # header auth works too
    # The thumbnail was made once and cached in the upload bucket; later views are served from there.
    from dfmod.storage import thumbnail_key

    client_s3, (upload_bucket, _extra) = s3_buckets
    cached = client_s3.get_object(Bucket=upload_bucket, Key=thumbnail_key(item_id))["Body"].read()
    assert cached == thumb.content
    client_s3.put_object(Bucket=upload_bucket, Key=thumbnail_key(item_id), Body=b"cached-marker")
    assert reviewer.get(f"/v1/items/{item_id}/image?variant=thumb").content == b"cached-marker"


def test_expired_links_and_links_of_revoked_keys_stop_working(reviewer, integration_settings, s3_buckets, make_api_key):
    from api.auth import signed_link
    from dfmod.db import ApiKey
    from dfmod.keys import revoke_key

    s3, (bucket, _extra) = s3_buckets
    s3.put_object(Bucket=bucket, Key="seed/x.jpg", Body=make_image_bytes())
    [item_id] = seed_items(integration_settings, [{"score": 0.9, "key": "seed/x.jpg"}])
    engine = make_engine(integration_settings.resolved_database_url)
    factory = make_session_factory(engine)
    with session_scope(factory) as session:
        key = session.scalar(select(ApiKey).where(ApiKey.name == "alice"))
        expired = signed_link(f"/v1/items/{item_id}/image", key, item_id, "full", -5, {"variant": "full"})
    anonymous = TestClient(reviewer.app)
    assert anonymous.get(expired).status_code == 403
    link = reviewer.get(f"/v1/items/{item_id}").json()["image_url"]
    assert anonymous.get(link).status_code == 200
    with session_scope(factory) as session:
        revoke_key(session, "alice")
    engine.dispose()
    assert anonymous.get(link).status_code == 403
    assert reviewer.get(f"/v1/items/{item_id}").status_code == 401


def test_reviews_are_append_only_and_undo_restores_the_previous_decision(reviewer, integration_settings, make_api_key):
    [item_id] = seed_items(integration_settings, [{"score": 0.9}])
    bob = bearer(make_api_key("review", name="bob"))
    first = reviewer.post(f"/v1/items/{item_id}/reviews", json={"decision": "confirmed_fake"}).json()
    second = reviewer.post(f"/v1/items/{item_id}/reviews", json={"decision": "overturned_real", "note": "a real photo"}, headers=bob)
    assert second.status_code == 201 and second.json()["reviewer"] == "bob"
    assert reviewer.get(f"/v1/items/{item_id}").json()["decision"] == "overturned_real"

    # Only the current decision can be undone; undoing it brings back alice's.
    assert reviewer.post(f"/v1/items/{item_id}/reviews/{first['id']}/retract").json()["error"] == "not_current"
    undo = reviewer.post(f"/v1/items/{item_id}/reviews/{second.json()['id']}/retract", headers=bob)
    assert undo.status_code == 201 and undo.json()["decision"] == "retracted" and undo.json()["retracts"] == second.json()["id"]
    detail = reviewer.get(f"/v1/items/{item_id}").json()
    assert (detail["decision"], detail["decided_by"]) == ("confirmed_fake", "alice")
    again = reviewer.post(f"/v1/items/{item_id}/reviews/{second.json()['id']}/retract")
    assert again.status_code == 409 and again.json()["error"] == "already_retracted"
    assert reviewer.post(f"/v1/items/{item_id}/reviews/{undo.json()['id']}/retract").status_code == 409
    reviewer.post(f"/v1/items/{item_id}/reviews/{first['id']}/retract")
    detail = reviewer.get(f"/v1/items/{item_id}").json()
    assert detail["decision"] is None and detail["decided_at"] is None
    # Every row is still there, in order, with the retracted ones marked.
    assert [(r["decision"], r["retracted"]) for r in detail["reviews"]] == [
        ("confirmed_fake", True), ("overturned_real", True), ("retracted", False), ("retracted", False),
    ]
    # No way to edit or delete a review.
    assert reviewer.delete(f"/v1/items/{item_id}/reviews/{first['id']}").status_code in (404, 405)
    assert reviewer.put(f"/v1/items/{item_id}/reviews/{first['id']}", json={"decision": "escalated"}).status_code in (404, 405)


def test_a_repeated_idempotency_key_returns_the_first_review(reviewer, integration_settings):
    [item_id, other] = seed_items(integration_settings, [{"score": 0.9}, {"score": 0.8}])
    headers = {"Idempotency-Key": "decision-123"}
    first = reviewer.post(f"/v1/items/{item_id}/reviews", json={"decision": "confirmed_fake"}, headers=headers)
    retry = reviewer.post(f"/v1/items/{item_id}/reviews", json={"decision": "confirmed_fake"}, headers=headers)
    assert (first.status_code, retry.status_code) == (201, 200) and first.json()["id"] == retry.json()["id"]
    assert len(reviewer.get(f"/v1/items/{item_id}").json()["reviews"]) == 1
    misuse = reviewer.post(f"/v1/items/{other}/reviews", json={"decision": "confirmed_fake"}, headers=headers)
    assert misuse.status_code == 409 and misuse.json()["error"] == "idempotency_key_reused"


@pytest.mark.parametrize(
    "body,status,error",
    [
        ({"decision": "maybe"}, 422, "invalid_request"),
        ({"note": "no decision"}, 422, "invalid_request"),
        ({"decision": "confirmed_fake", "note": "x" * 5000}, 422, "invalid_request"),
    ],
)
def test_bad_reviews_are_rejected(reviewer, integration_settings, body, status, error):
    [item_id] = seed_items(integration_settings, [{"score": 0.9}])
    response = reviewer.post(f"/v1/items/{item_id}/reviews", json=body)
    assert response.status_code == status and response.json()["error"] == error


def test_reviewing_unknown_or_unclassified_items(reviewer, integration_settings):
    [queued] = seed_items(integration_settings, [{"score": None}])
    missing = reviewer.post("/v1/items/00000000-0000-0000-0000-000000000000/reviews", json={"decision": "escalated"})
    assert missing.status_code == 404 and missing.json()["error"] == "not_found"
    early = reviewer.post(f"/v1/items/{queued}/reviews", json={"decision": "escalated"})
    assert early.status_code == 409 and early.json()["error"] == "not_classified"


def test_claims_hand_out_the_highest_unreviewed_scores_to_one_reviewer_each(
    integration_settings, make_api_key, reviewer
):
    ids = seed_items(
        integration_settings,
        [{"score": s} for s in (0.99, 0.9, 0.8, 0.7, 0.6, 0.52, 0.45, 0.2)] + [{"score": None}],
    )
    reviewer.post(f"/v1/items/{ids[1]}/reviews", json={"decision": "confirmed_fake"})  # reviewed: never claimed
    bob = bearer(make_api_key("review", name="bob"))

    alice_claim = reviewer.post("/v1/queue/claim", json={"limit": 3}).json()
    bob_claim = reviewer.post("/v1/queue/claim", json={"limit": 10}, headers=bob).json()
    alice_ids = [item["id"] for item in alice_claim["items"]]
    bob_ids = [item["id"] for item in bob_claim["items"]]
    assert alice_ids == [ids[0], ids[2], ids[3]]
    # The band (0.1) lets 0.45 in below the 0.5 threshold; 0.2 and the unclassified item stay out.
    assert bob_ids == [ids[4], ids[5], ids[6]]
    assert all(item["claimed_by"] == "bob" and item["thumbnail_url"] for item in bob_claim["items"])
    # A reviewer claiming again gets their own leased items back (a reloaded page), nobody else's.
    assert [item["id"] for item in reviewer.post("/v1/queue/claim", json={"limit": 10}).json()["items"]] == alice_ids
    reviewer.post(f"/v1/items/{ids[0]}/reviews", json={"decision": "overturned_real"})
    assert ids[0] not in [item["id"] for item in reviewer.post("/v1/queue/claim", json={"limit": 10}).json()["items"]]
    # Releasing gives items back to the pool.
    assert reviewer.post("/v1/queue/release", json={"ids": alice_ids}).json() == {"released": 3}
    assert [item["id"] for item in reviewer.post("/v1/queue/claim", json={"limit": 10}, headers=bob).json()["items"]] == [
        ids[2], ids[3], ids[4], ids[5], ids[6],
    ]


def test_claims_are_capped_by_claim_max(integration_settings, make_api_key):
    seed_items(integration_settings, [{"score": 0.9} for _ in range(5)])
    settings = integration_settings.model_copy(update={"claim_max": 2})
    with TestClient(create_app(settings), headers=bearer(make_api_key("review"))) as client:
        assert len(client.post("/v1/queue/claim", json={"limit": 5}).json()["items"]) == 2


def test_stats(reviewer, catalogue, integration_settings):
    stats = reviewer.get("/v1/stats").json()
    assert stats["total"] == 7
    assert stats["by_label"] == {"fake": 3, "real": 2}
    assert stats["by_status"] == {"classified": 5, "queued": 1, "failed": 1}
    # d is the one unreviewed item of the review set (flagged or in the 0.1 band).
    assert stats["by_decision"] == {"confirmed_fake": 1, "overturned_real": 1, "escalated": 1, "unreviewed": 1}
    # a (fake, confirmed) agrees; b (fake, overturned) disagrees; escalations are not judgements.
    assert stats["agreement"] == {"judged": 2, "agreed": 1, "disagreed": 1, "rate": 0.5}
    assert stats["backlog"] == {"classify": 1, "review": 1, "claimed": 0, "escalated": 1}
    assert stats["by_day"] == [{"day": "2026-03-01", "items": 7, "flagged": 3, "reviewed": 3}]
    reviewer.post("/v1/queue/claim", json={"limit": 5})
    assert reviewer.get("/v1/stats").json()["backlog"]["claimed"] == 1
    window = reviewer.get(f"/v1/stats?since={quote((T0 + timedelta(hours=3)).isoformat())}").json()
    assert window["total"] == 4 and window["by_label"] == {"real": 2}


def test_heatmap_is_requested_once_then_served_from_storage(
    reviewer, integration_settings, s3_buckets, checkpoint_path
):
    from dfmod.detector import Predictor
    from dfmod.storage import S3Storage
    from worker.heatmap import HeatmapMaker

    s3, (bucket, _extra) = s3_buckets
    s3.put_object(Bucket=bucket, Key="seed/h.jpg", Body=make_image_bytes(size=(300, 200)))
    [item_id] = seed_items(integration_settings, [{"score": 0.9, "key": "seed/h.jpg", "model_version": "test-random-0001"}])
    events = redis.Redis.from_url(integration_settings.broker_url)
    url = reviewer.get(f"/v1/items/{item_id}").json()["heatmap_url"]
    anonymous = TestClient(reviewer.app)
    pending = anonymous.get(url)
    assert pending.status_code == 202 and pending.json()["status"] == "pending"
    assert anonymous.get(url).status_code == 202
    assert events.llen(integration_settings.events_queue) == 1  # asked once, not once per poll
    assert events.llen(integration_settings.queue) == 0  # the classify queue stays pure

    predictor = Predictor(checkpoint_path, device="cpu", torch_threads=1)
    engine = make_engine(integration_settings.resolved_database_url)
    maker = HeatmapMaker(integration_settings, make_session_factory(engine), S3Storage(integration_settings), predictor)
    maker.make(item_id, "test-random-0001")
    engine.dispose()
    ready = anonymous.get(url)
    assert ready.status_code == 200 and ready.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(ready.content)).size == (300, 200)


def test_items_without_a_verdict_have_no_heatmap(reviewer, integration_settings):
    [item_id] = seed_items(integration_settings, [{"score": None}])
    detail = reviewer.get(f"/v1/items/{item_id}").json()
    assert detail["heatmap_url"] is None
    response = reviewer.get(f"/v1/items/{item_id}/heatmap")
    assert response.status_code == 409 and response.json()["error"] == "not_classified"


def test_review_rows_only_ever_grow(reviewer, integration_settings):
    [item_id] = seed_items(integration_settings, [{"score": 0.9}])
    engine = make_engine(integration_settings.resolved_database_url)
    counts = []
    for decision in ("confirmed_fake", "escalated", "overturned_real"):
        reviewer.post(f"/v1/items/{item_id}/reviews", json={"decision": decision})
        with engine.connect() as connection:
            counts.append(connection.execute(select(func.count()).select_from(Review)).scalar())
    engine.dispose()
    assert counts == [1, 2, 3]
