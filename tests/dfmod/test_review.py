"""The review queue under real concurrent transactions on Postgres, lease expiry, and claims on SQLite."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from sqlalchemy import text

from dfmod import migrate
from dfmod.db import make_engine, make_session_factory, session_scope, utcnow
from dfmod.keys import create_key
from dfmod.review import claim_items, record_review
from dfmod.settings import Settings
from tests.utils.records import seed_items

pytestmark = pytest.mark.integration


def _keys(factory, count: int):
    with session_scope(factory) as session:
        return [create_key(session, f"reviewer-{index}", ["review"]).key for index in range(count)]


@pytest.fixture
def postgres(integration_settings):
    engine = make_engine(integration_settings.resolved_database_url, pool_size=12)
    yield integration_settings, make_session_factory(engine)
    engine.dispose()


def test_an_open_claim_is_skipped_not_waited_for_and_never_shared(postgres):
    settings, factory = postgres
    ids = seed_items(settings, [{"score": 0.99 - 0.01 * i} for i in range(6)])
    alice, bob = _keys(factory, 2)
    holding = factory()
    try:
        # Alice's claim is still uncommitted: her rows are locked.
        first = [item.id for item in claim_items(holding, alice, 3, 300, 0.0)]
        with factory() as other:
            # Were the claim to wait on Alice's locks instead of skipping them, this would fail, not hang.
            other.execute(text("SET LOCAL lock_timeout = '5s'"))
            second = [item.id for item in claim_items(other, bob, 3, 300, 0.0)]
            other.commit()
        holding.commit()
    finally:
        holding.close()
    assert first == ids[:3] and second == ids[3:]


def test_many_reviewers_claiming_at_once_never_get_the_same_item(postgres):
    settings, factory = postgres
    total = 60
    ids = seed_items(settings, [{"score": 0.5 + 0.49 * (i % 17) / 17} for i in range(total)])
    reviewers = _keys(factory, 8)
    start = threading.Barrier(len(reviewers))
    handed: dict[str, list[str]] = {key.name: [] for key in reviewers}
    errors: list[BaseException] = []

    def work(key) -> None:
        try:
            start.wait()
            while True:
                with session_scope(factory) as session:
                    claimed = claim_items(session, key, 3, 300, 0.0)
                    got = [item.id for item in claimed]
                    # Deciding inside the loop keeps each reviewer's own leases from coming back to them.
                    for item_id in got:
                        record_review(session, item_id, key, "confirmed_fake", None)
                if not got:
                    return
                handed[key.name].extend(got)
        except BaseException as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(key,)) for key in reviewers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    everything = [item_id for got in handed.values() for item_id in got]
    assert len(everything) == len(set(everything)) == total  # each item to exactly one reviewer
    assert set(everything) == set(ids)
    assert sum(1 for got in handed.values() if got) > 1  # the claims really did interleave


def test_an_expired_lease_is_claimable_again(postgres):
    settings, factory = postgres
    [item_id] = seed_items(settings, [{"score": 0.9}])
    alice, bob = _keys(factory, 2)
    with session_scope(factory) as session:
        assert [i.id for i in claim_items(session, alice, 5, 60, 0.0)] == [item_id]
    with session_scope(factory) as session:
        assert claim_items(session, bob, 5, 60, 0.0) == []
    later = utcnow() + timedelta(seconds=61)
    with session_scope(factory) as session:
        [taken] = claim_items(session, bob, 5, 60, 0.0, now=later)
        assert (taken.id, taken.claimed_by) == (item_id, "reviewer-1")


def test_claims_work_on_sqlite_too(tmp_path):
    settings = Settings(database_url=f"sqlite:///{tmp_path}/review.db", data_dir=tmp_path)
    migrate.upgrade(settings)
    ids = seed_items(settings, [{"score": 0.9}, {"score": 0.7}, {"score": 0.6}, {"score": 0.2}])
    engine = make_engine(settings.resolved_database_url)
    factory = make_session_factory(engine)
    alice, bob = _keys(factory, 2)
    with session_scope(factory) as session:
        assert [i.id for i in claim_items(session, alice, 2, 60, 0.0)] == ids[:2]
    with session_scope(factory) as session:
        assert [i.id for i in claim_items(session, bob, 5, 60, 0.0)] == [ids[2]]
    engine.dispose()


def test_a_claimed_item_is_decided_only_by_its_claimant_until_the_lease_ends(postgres):
    from dfmod.review import Conflict

    settings, factory = postgres
    [item_id] = seed_items(settings, [{"score": 0.9}])
    alice, bob = _keys(factory, 2)
    now = utcnow()
    with session_scope(factory) as session:
        assert [item.id for item in claim_items(session, alice, 1, 300, 0.0, now=now)] == [item_id]
    with session_scope(factory) as session, pytest.raises(Conflict) as refused:
        record_review(session, item_id, bob, "overturned_real", None, now=now + timedelta(seconds=10))
    assert refused.value.code == "claimed_by_other"
    # After the lease, anyone may decide; before it, the claimant may.
    with session_scope(factory) as session:
        review, created = record_review(session, item_id, bob, "overturned_real", None, now=now + timedelta(seconds=301))
        assert created and review.reviewer == "reviewer-1"
    with session_scope(factory) as session:
        claim_items(session, alice, 1, 300, 0.0, now=now + timedelta(seconds=400))  # decided: not claimable
    [other_id] = seed_items(settings, [{"score": 0.8}])
    with session_scope(factory) as session:
        claim_items(session, alice, 1, 300, 0.0)
        review, created = record_review(session, other_id, alice, "confirmed_fake", None)
        assert created


def test_a_decision_is_retracted_only_by_its_author_or_an_admin(postgres):
    from dfmod.review import Forbidden, retract_review

    settings, factory = postgres
    [item_id] = seed_items(settings, [{"score": 0.9}])
    alice, bob = _keys(factory, 2)
    with session_scope(factory) as session:
        admin = create_key(session, "an-admin", ["admin"]).key
        first, _ = record_review(session, item_id, alice, "confirmed_fake", None)
    with session_scope(factory) as session, pytest.raises(Forbidden) as refused:
        retract_review(session, item_id, first.id, bob)
    assert refused.value.code == "not_author"
    with session_scope(factory) as session:
        assert retract_review(session, item_id, first.id, alice).retracts_id == first.id
        second, _ = record_review(session, item_id, bob, "escalated", None)
    with session_scope(factory) as session:
        assert retract_review(session, item_id, second.id, admin).reviewer == "an-admin"


def test_a_tenants_review_band_widens_its_own_queue_only(postgres):
    from dfmod import tenants

    settings, factory = postgres
    with session_scope(factory) as session:
        box = tenants.SecretBox([tenants.generate_secret_key()])
        wide = tenants.create_tenant(session, box, "wide-band", review_band=0.2).tenant.id
    # Both score 0.4 against a 0.5 threshold: inside a 0.2 band, outside the default band of 0.
    _default_item, wide_item = seed_items(settings, [{"score": 0.4}, {"score": 0.4, "tenant_id": wide}])
    [alice] = _keys(factory, 1)
    with session_scope(factory) as session:
        assert [item.id for item in claim_items(session, alice, 10, 300, 0.0)] == [wide_item]
