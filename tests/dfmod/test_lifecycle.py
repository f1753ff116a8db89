"""The item lifecycle in one place: allowed transitions, recording, claims, persistence of verdicts, release
of a failed batch's claims and the sweep, on Postgres and SQLite; and a scan of the source tree showing
that no other module writes ``Item.status``."""

from __future__ import annotations

import ast
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update

from dfmod import lifecycle, migrate
from dfmod.db import (
    DEFAULT_TENANT_ID,
    Item,
    ItemStatus,
    Verdict,
    make_engine,
    make_session_factory,
    session_scope,
    utcnow,
)
from dfmod.lifecycle import (
    IllegalTransition,
    ItemResult,
    NewItem,
    VerdictData,
    claim_for_classification,
    persist_results,
    record_items,
    release_claims,
    sweep_stuck_items,
)
from dfmod.queue import make_celery
from dfmod.settings import Settings


@pytest.fixture(params=["postgres", "sqlite"])
def database_url(request, tmp_path):
    if request.param == "postgres":
        return request.getfixturevalue("clean_postgres")
    url = f"sqlite:///{tmp_path}/items.db"
    migrate.upgrade(Settings(database_url=url, data_dir=tmp_path))
    return url


def test_recording_the_same_object_twice_yields_one_item(database_url):
    factory = make_session_factory(make_engine(database_url))
    new = NewItem(bucket="b", key="k.jpg", version="etag1", ingest="s3-event")
    with session_scope(factory) as session:
        first = record_items(session, [new, new])
    with session_scope(factory) as session:
        again = record_items(session, [new, NewItem(bucket="b", key="k.jpg", version="etag2")])
    assert first[0].created and not first[1].created and first[0].item.id == first[1].item.id
    assert not again[0].created and again[0].item.id == first[0].item.id
    assert again[1].created  # a new version of the same key is a new item
    with session_scope(factory) as session:
        assert len(session.scalars(select(Item)).all()) == 2


def test_sweep_requeues_stuck_items_and_gives_up_after_max_attempts(clean_postgres, redis_url):
    import redis

    settings = Settings(database_url=clean_postgres, broker_url=redis_url, stuck_after_s=60, max_attempts=3, queue="sweep-q")
    factory = make_session_factory(make_engine(clean_postgres))
    with session_scope(factory) as session:
        recorded = record_items(session, [NewItem(bucket="b", key=f"{i}.jpg") for i in range(4)])
    ids = [r.item.id for r in recorded]
    old = utcnow() - timedelta(minutes=10)
    with session_scope(factory) as session:
        session.execute(update(Item).where(Item.id.in_(ids[:3])).values(updated_at=old, enqueued_at=old, created_at=old))
        session.execute(update(Item).where(Item.id == ids[1]).values(status=ItemStatus.processing, updated_at=old))
        session.execute(update(Item).where(Item.id == ids[2]).values(attempts=3, updated_at=old))
        # ids[3] was enqueued just now: not stuck.
        session.execute(update(Item).where(Item.id == ids[3]).values(enqueued_at=utcnow()))
    assert sweep_stuck_items(factory, make_celery(settings), settings) == 2
    assert redis.Redis.from_url(redis_url).llen("sweep-q") == 2
    with session_scope(factory) as session:
        items = {item.id: item for item in session.scalars(select(Item))}
    assert items[ids[0]].status == items[ids[1]].status == ItemStatus.queued
    assert items[ids[2]].status == ItemStatus.failed and items[ids[2]].failure_reason == "too_many_attempts"
    # Swept items are stamped, so an immediate second sweep does not enqueue them again.
    assert sweep_stuck_items(factory, make_celery(settings), settings) == 0


def _claimable(factory, ids: list[str]) -> set[str]:
    """The ids a worker's claim (``SELECT ... FOR UPDATE SKIP LOCKED``) would get now, from its own connection."""
    with session_scope(factory) as session:
        return {item.id for item in session.scalars(lifecycle.skip_locked(select(Item).where(Item.id.in_(ids)), session))}


def _watch_sends(monkeypatch, factory, engine):
    """Spy on the sends of dfmod.lifecycle: what a worker could claim at each send, and the item writes after it."""
    from sqlalchemy import event

    seen = {"claimable_at_send": [], "writes_after_send": []}

    def sending(app, settings, item_ids, **kwargs):
        seen["claimable_at_send"].append(_claimable(factory, item_ids) == set(item_ids))
        seen["sent"] = True
        return real_enqueue(app, settings, item_ids, **kwargs)

    def statement(_conn, _cursor, sql, *_args):
        if seen.get("sent") and sql.lstrip().upper().startswith("UPDATE ITEMS"):
            seen["writes_after_send"].append(sql)

    real_enqueue = lifecycle.enqueue
    monkeypatch.setattr(lifecycle, "enqueue", sending)
    event.listen(engine, "before_cursor_execute", statement)
    return seen


def test_an_ingested_item_is_claimable_from_the_moment_its_task_is_sent(clean_postgres, redis_url, monkeypatch):
    # A worker holding the task claims the row with SKIP LOCKED: a write of the item after the send (the
    # enqueued_at stamp once did that) races it, and the worker skips the item and acknowledges its task.
    settings = Settings(database_url=clean_postgres, broker_url=redis_url, queue=f"ingest-{uuid.uuid4().hex[:6]}")
    engine = make_engine(clean_postgres)
    factory = make_session_factory(engine)
    seen = _watch_sends(monkeypatch, factory, engine)
    with factory() as session:
        [recorded] = lifecycle.record_and_enqueue(
            session, factory, make_celery(settings), settings, [NewItem(bucket="b", key="fresh.jpg")]
        )
    assert seen["claimable_at_send"] == [True] and seen["writes_after_send"] == []
    with session_scope(factory) as session:
        assert session.get(Item, recorded.item.id).enqueued_at is not None


def test_an_item_whose_send_failed_is_unstamped_for_the_next_sweep(clean_postgres, redis_url):
    from dfmod.loopback import free_port

    down = Settings(database_url=clean_postgres, broker_url=f"redis://127.0.0.1:{free_port()}/0", queue="unsent-q")
    factory = make_session_factory(make_engine(clean_postgres))
    with factory() as session:
        [recorded] = lifecycle.record_and_enqueue(session, factory, make_celery(down), down, [NewItem(bucket="b", key="u.jpg")])
    with session_scope(factory) as session:
        item = session.get(Item, recorded.item.id)
        assert item.status == ItemStatus.queued and item.enqueued_at is None
        item.created_at = utcnow() - timedelta(minutes=1)  # past the grace given to an enqueue in progress
    up = down.model_copy(update={"broker_url": redis_url, "queue": f"unsent-{uuid.uuid4().hex[:6]}"})
    assert sweep_stuck_items(factory, make_celery(up), up) == 1


def test_swept_items_are_claimable_from_the_moment_their_tasks_are_sent(clean_postgres, redis_url, monkeypatch):
    settings = Settings(database_url=clean_postgres, broker_url=redis_url, stuck_after_s=60, queue=f"sw-{uuid.uuid4().hex[:6]}")
    engine = make_engine(clean_postgres)
    factory = make_session_factory(engine)
    with session_scope(factory) as session:
        ids = [r.item.id for r in record_items(session, [NewItem(bucket="b", key=f"s{i}.jpg") for i in range(3)])]
    old = utcnow() - timedelta(minutes=10)
    with session_scope(factory) as session:
        session.execute(update(Item).where(Item.id.in_(ids)).values(updated_at=old, enqueued_at=old, created_at=old))
    seen = _watch_sends(monkeypatch, factory, engine)
    assert sweep_stuck_items(factory, make_celery(settings), settings) == 3
    assert seen["claimable_at_send"] == [True] and seen["writes_after_send"] == []


def test_a_sweep_that_cannot_reach_the_broker_leaves_its_items_for_the_next_one(clean_postgres, redis_url):
    from dfmod.errors import Unavailable
    from dfmod.loopback import free_port

    down = Settings(database_url=clean_postgres, broker_url=f"redis://127.0.0.1:{free_port()}/0", stuck_after_s=60)
    factory = make_session_factory(make_engine(clean_postgres))
    with session_scope(factory) as session:
        [recorded] = record_items(session, [NewItem(bucket="b", key="late.jpg")])
    old = utcnow() - timedelta(minutes=10)
    with session_scope(factory) as session:
        session.execute(update(Item).where(Item.id == recorded.item.id).values(updated_at=old, enqueued_at=old, created_at=old))
    with pytest.raises(Unavailable):
        sweep_stuck_items(factory, make_celery(down), down)
    up = down.model_copy(update={"broker_url": redis_url, "queue": f"late-{uuid.uuid4().hex[:6]}"})
    assert sweep_stuck_items(factory, make_celery(up), up) == 1  # at once, not after another stuck_after_s


# --- transitions -----------------------------------------------------------------------------------

_ALL = list(ItemStatus)
_ALLOWED = {
    (ItemStatus.queued, ItemStatus.queued), (ItemStatus.queued, ItemStatus.processing),
    (ItemStatus.queued, ItemStatus.classified), (ItemStatus.queued, ItemStatus.failed),
    (ItemStatus.processing, ItemStatus.queued), (ItemStatus.processing, ItemStatus.processing),
    (ItemStatus.processing, ItemStatus.classified), (ItemStatus.processing, ItemStatus.failed),
}


@pytest.mark.parametrize("source", _ALL)
@pytest.mark.parametrize("target", _ALL)
def test_every_transition_is_allowed_or_refused_as_specified(source, target):
    item = Item(id="i", status=source)
    if (source, target) in _ALLOWED:
        lifecycle.move(item, target)
        assert item.status == target and item.updated_at is not None
    else:
        with pytest.raises(IllegalTransition):
            lifecycle.move(item, target)
        assert item.status == source


def test_the_too_many_attempts_rule_fails_an_item_once_its_attempts_are_used():
    item = Item(id="i", status=ItemStatus.queued, attempts=2)
    assert not lifecycle.give_up_if_exhausted(item, max_attempts=3)
    assert item.status == ItemStatus.queued
    item.attempts = 3
    assert lifecycle.give_up_if_exhausted(item, max_attempts=3)
    assert item.status == ItemStatus.failed and item.failure_reason == "too_many_attempts"


def _verdict(probability: float = 0.9, reused_from: str | None = None) -> VerdictData:
    return VerdictData(probability, "fake" if probability >= 0.5 else "real", 0.5, "m1", reused_from=reused_from)


def test_claim_persist_and_redelivery(database_url):
    factory = make_session_factory(make_engine(database_url))
    with session_scope(factory) as session:
        ids = [r.item.id for r in record_items(session, [NewItem(bucket="b", key=f"{i}.jpg") for i in range(4)])]
    with session_scope(factory) as session:
        session.execute(update(Item).where(Item.id == ids[3]).values(attempts=5))
    with session_scope(factory) as session:
        claim = claim_for_classification(session, ids, "m1", max_attempts=5)
    assert {c.id for c in claim.claimed} == set(ids[:3])
    assert claim.gave_up == [ids[3]]
    results = [
        ItemResult(ids[0], sha256="a" * 64, size=10, verdict=_verdict()),
        ItemResult(ids[1], failure=("not_an_image", "text")),
        ItemResult(ids[2], retry="S3 timeout"),
    ]
    with session_scope(factory) as session:
        persist_results(session, results)
    with session_scope(factory) as session:
        items = {item.id: item for item in session.scalars(select(Item))}
        assert items[ids[0]].status == ItemStatus.classified and items[ids[0]].score == 0.9
        assert items[ids[0]].label == "fake" and items[ids[0]].sha256 == "a" * 64
        assert items[ids[1]].status == ItemStatus.failed and items[ids[1]].failure_reason == "not_an_image"
        assert items[ids[2]].status == ItemStatus.queued and "S3 timeout" in items[ids[2]].failure_detail
        assert items[ids[3]].status == ItemStatus.failed
        assert [item.attempts for item in (items[i] for i in ids[:3])] == [1, 1, 1]
    # A redelivery of finished work claims nothing; persisting a result again writes no second verdict.
    with session_scope(factory) as session:
        again = claim_for_classification(session, ids[:2], "m1", max_attempts=5)
        persist_results(session, [ItemResult(ids[0], verdict=_verdict(0.1))])
    assert again.claimed == [] and again.gave_up == []
    with session_scope(factory) as session:
        assert session.get(Item, ids[0]).score == 0.9
        assert len(session.scalars(select(Verdict)).all()) == 1
        # find_reusable_verdicts finds the verdict by its bytes.
        [reusable] = lifecycle.find_reusable_verdicts(session, "m1", {"a" * 64})["a" * 64]
        assert (reusable.fake_probability, reusable.item_id, reusable.tenant_id) == (0.9, ids[0], DEFAULT_TENANT_ID)


def test_a_delivery_of_an_item_that_already_has_the_verdict_marks_it_classified(database_url):
    factory = make_session_factory(make_engine(database_url))
    with session_scope(factory) as session:
        [recorded] = record_items(session, [NewItem(bucket="b", key="x.jpg")])
    with session_scope(factory) as session:
        claim_for_classification(session, [recorded.item.id], "m1", 5)
    with session_scope(factory) as session:
        # The verdict was written but the status not (a crash between them cannot happen in one
        # transaction, but an older worker may have written verdicts another way): the claim repairs it.
        session.add(Verdict(item_id=recorded.item.id, label="real", fake_probability=0.1, threshold=0.5,
                                      model_version="m1", created_at=utcnow()))
    with session_scope(factory) as session:
        claim = claim_for_classification(session, [recorded.item.id], "m1", 5)
    assert claim.claimed == []
    with session_scope(factory) as session:
        assert session.get(Item, recorded.item.id).status == ItemStatus.classified


def test_release_puts_a_failed_batch_back_on_the_queue_with_its_attempt_counted(database_url):
    factory = make_session_factory(make_engine(database_url))
    with session_scope(factory) as session:
        ids = [r.item.id for r in record_items(session, [NewItem(bucket="b", key=f"{i}.jpg") for i in range(2)])]
    with session_scope(factory) as session:
        claim_for_classification(session, ids[:1], "m1", 5)
    with session_scope(factory) as session:
        released = release_claims(session, ids, "OperationalError: server closed the connection")
    assert released == ids[:1]  # only items the batch held (processing) are released
    with session_scope(factory) as session:
        item = session.get(Item, ids[0])
    assert item.status == ItemStatus.queued and item.attempts == 1 and item.enqueued_at is not None


def test_identical_bytes_are_reported_as_duplicates_of_the_first_item(database_url):
    factory = make_session_factory(make_engine(database_url))
    sha = "b" * 64
    with session_scope(factory) as session:
        [first] = record_items(session, [NewItem(bucket="b", key="1.jpg", sha256=sha)])
    with session_scope(factory) as session:
        [second] = record_items(session, [NewItem(bucket="b", key="2.jpg", sha256=sha)])
        [third] = record_items(session, [NewItem(bucket="b", key="3.jpg", sha256=sha)], find_duplicates=False)
    assert first.created and first.duplicate_of is None
    assert second.created and second.duplicate_of == first.item.id
    assert third.created and third.duplicate_of is None


# --- one writer of Item.status -----------------------------------------------------------------------

_REPO = Path(__file__).resolve().parents[2]
_PACKAGES = ("api", "dfmod", "worker", "migrations")


def _status_writes(tree: ast.AST) -> list[int]:
    """Lines that assign ``<anything>.status``, pass ``status=`` to a call, or put a "status" key holding an
    ``ItemStatus`` into a dict (the row shapes of INSERT/UPDATE statements)."""
    lines = []
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        for target in targets:
            if isinstance(target, ast.Attribute) and target.attr == "status":
                lines.append(node.lineno)
        if isinstance(node, ast.Call):
            for keyword in node.keywords:
                if keyword.arg == "status" and "ItemStatus" in ast.unparse(keyword.value):
                    lines.append(node.lineno)
        if isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values, strict=True):
                if isinstance(key, ast.Constant) and key.value == "status" and "ItemStatus" in ast.unparse(value):
                    lines.append(node.lineno)
    return lines


def test_the_scan_finds_status_writes():
    sample = "item.status = ItemStatus.failed\nupdate(Item).values(status=ItemStatus.queued)\nrows = [{'status': ItemStatus.queued}]\n"
    assert _status_writes(ast.parse(sample)) == [1, 2, 3]


def test_no_module_but_the_lifecycle_writes_item_status():
    offenders = []
    for package in _PACKAGES:
        for path in sorted((_REPO / package).rglob("*.py")):
            if path == _REPO / "dfmod" / "lifecycle.py":
                continue
            for line in _status_writes(ast.parse(path.read_text(), filename=str(path))):
                offenders.append(f"{path.relative_to(_REPO)}:{line}")
    assert offenders == [], f"Item.status written outside dfmod/lifecycle.py: {offenders}"
    # And the lifecycle itself does write it, so the scan is looking at real code.
    assert _status_writes(ast.parse((_REPO / "dfmod" / "lifecycle.py").read_text()))
