"""Verdict callbacks against a real local HTTP receiver on real Postgres: signatures a receiver can verify,
retries with recorded attempts, giving up, only configured URLs, per-source routing."""

from __future__ import annotations

import hashlib
import hmac
import json
import time

import pytest
from pydantic import ValidationError
from sqlalchemy import select

from dfmod.callbacks import (
    EVENT_REVIEW,
    EVENT_VERDICT,
    backoff_s,
    deliver,
    event_id,
    sign,
    verify_signature,
)
from dfmod.db import CallbackDelivery, make_engine, make_session_factory, session_scope
from dfmod.keys import create_key
from dfmod.loopback import free_port
from dfmod.review import record_review
from dfmod.settings import Settings
from tests.utils.records import seed_items

pytestmark = pytest.mark.integration
SECRET = "callback-secret"


def verify_dfmod_signature(secret: str, header: str, body: bytes, tolerance_s: int = 300) -> bool:
    """The receiver-side check exactly as the README documents it (kept independent of dfmod's code)."""
    try:
        pairs = [part.split("=", 1) for part in header.split(",")]
        timestamp = int(next(value for name, value in pairs if name == "t"))
        signatures = [value for name, value in pairs if name == "v1"]  # two during a secret rotation
    except (StopIteration, ValueError):
        return False
    if abs(time.time() - timestamp) > tolerance_s:
        return False  # too old (or from the future): a replay
    expected = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return any(hmac.compare_digest(expected, signature) for signature in signatures)


@pytest.fixture
def db(integration_settings):
    engine = make_engine(integration_settings.resolved_database_url)
    yield make_session_factory(engine)
    engine.dispose()


def _settings(base, **callbacks):
    return base.model_copy(update={"callback_secret": Settings(callback_secret=SECRET).callback_secret, **callbacks})


def _attempts(factory, item_id):
    with session_scope(factory) as session:
        rows = session.scalars(
            select(CallbackDelivery).where(CallbackDelivery.item_id == item_id).order_by(CallbackDelivery.id)
        ).all()
        return [(r.attempt, r.status_code, r.delivered, r.final) for r in rows]


def test_signatures_verify_and_reject_tampering():
    body = b'{"id":"e1","type":"verdict.created"}'
    header = sign(SECRET, int(time.time()), body)
    assert verify_dfmod_signature(SECRET, header, body) and verify_signature(SECRET, header, body)
    assert not verify_dfmod_signature(SECRET, header, body.replace(b"e1", b"e2"))
    assert not verify_dfmod_signature("another-secret", header, body)
    stale = sign(SECRET, int(time.time()) - 3600, body)
    assert not verify_dfmod_signature(SECRET, stale, body) and not verify_signature(SECRET, stale, body)
    assert not verify_signature(SECRET, "garbage", body)


def test_during_a_rotation_both_secrets_verify_the_one_header():
    body = b'{"id":"e1","type":"verdict.created"}'
    header = sign(("new-secret", "old-secret"), int(time.time()), body)
    assert header.count(",v1=") == 2
    for secret in ("new-secret", "old-secret"):
        assert verify_dfmod_signature(secret, header, body) and verify_signature(secret, header, body)
    assert not verify_dfmod_signature(SECRET, header, body) and not verify_signature(SECRET, header, body)


def test_verdict_event_is_retried_then_delivered_signed_and_recorded(integration_settings, db, callback_receiver):
    receiver = callback_receiver(fail_first=2)
    settings = _settings(integration_settings, callback_url=receiver.url)
    [item_id] = seed_items(integration_settings, [{"score": 0.91, "threshold": 0.6, "source": "platform-x", "model_version": "m1"}])

    results = [deliver(settings, db, EVENT_VERDICT, item_id, "m1", attempt) for attempt in (1, 2, 3)]
    assert [(r.retry, r.delivered, r.status_code) for r in results] == [(True, False, 503), (True, False, 503), (False, True, 200)]
    assert _attempts(db, item_id) == [(1, 503, False, False), (2, 503, False, False), (3, 200, True, True)]

    assert len(receiver.requests) == 3
    ids = {headers["X-Dfmod-Event-Id"] for headers, _ in receiver.requests}
    assert ids == {event_id(EVENT_VERDICT, item_id, "m1")}  # one event, however many attempts
    headers, body = receiver.requests[-1]
    assert verify_dfmod_signature(SECRET, headers["X-Dfmod-Signature"], body)
    event = json.loads(body)
    assert event["type"] == "verdict.created" and event["item"]["id"] == item_id and event["item"]["source"] == "platform-x"
    assert event["verdict"] == {"label": "fake", "fake_probability": 0.91, "threshold": 0.6, "flagged": True, "model_version": "m1"}

    # A redelivered task after success: no second POST.
    again = deliver(settings, db, EVENT_VERDICT, item_id, "m1", 4)
    assert again.skipped == "already delivered" and len(receiver.requests) == 3


def test_delivery_gives_up_after_max_attempts(integration_settings, db, callback_receiver):
    receiver = callback_receiver(fail_first=100, fail_status=500)
    settings = _settings(integration_settings, callback_url=receiver.url, callback_max_attempts=3)
    [item_id] = seed_items(integration_settings, [{"score": 0.3}])
    results = [deliver(settings, db, EVENT_VERDICT, item_id, "m1", attempt) for attempt in (1, 2, 3)]
    assert [r.retry for r in results] == [True, True, False]
    assert "gave up after 3 attempts" in results[-1].error
    assert _attempts(db, item_id) == [(1, 500, False, False), (2, 500, False, False), (3, 500, False, True)]
    from prometheus_client import REGISTRY

    failed = REGISTRY.get_sample_value("dfmod_callback_attempts_total", {"event": "verdict.created", "outcome": "failed"})
    assert failed and failed >= 1


def test_a_refusing_receiver_is_not_retried_but_an_unreachable_one_is(integration_settings, db, callback_receiver):
    refusing = callback_receiver(fail_first=100, fail_status=400)
    [item_id] = seed_items(integration_settings, [{"score": 0.3}])
    refused = deliver(_settings(integration_settings, callback_url=refusing.url), db, EVENT_VERDICT, item_id, "m1", 1)
    assert (refused.retry, refused.status_code) == (False, 400)
    unreachable = f"http://127.0.0.1:{free_port()}/hook"
    down = deliver(_settings(integration_settings, callback_url=unreachable), db, EVENT_VERDICT, item_id, "m1", 1)
    assert down.retry and down.status_code is None and "Connect" in down.error


def test_only_configured_urls_are_called_with_per_source_routing(integration_settings, db, callback_receiver):
    default, special = callback_receiver(), callback_receiver()
    x_item, y_item = seed_items(integration_settings, [{"score": 0.9, "source": "platform-x"}, {"score": 0.9, "source": "platform-y"}])
    routed = _settings(integration_settings, callback_url=default.url, callback_urls={"platform-x": special.url})
    assert deliver(routed, db, EVENT_VERDICT, x_item, "m1", 1).delivered
    assert deliver(routed, db, EVENT_VERDICT, y_item, "m1", 1).delivered
    assert [json.loads(b)["item"]["id"] for _, b in special.requests] == [x_item]
    assert [json.loads(b)["item"]["id"] for _, b in default.requests] == [y_item]

    only_x = _settings(integration_settings, callback_urls={"platform-x": special.url})
    skipped = deliver(only_x, db, EVENT_VERDICT, y_item, "m1", 1)
    assert skipped.skipped and not skipped.retry and len(default.requests) == 1
    nothing = deliver(integration_settings, db, EVENT_VERDICT, x_item, "m1", 1)
    assert nothing.skipped and len(special.requests) == 1


def test_review_events_carry_the_decision_and_reviewer(integration_settings, db, callback_receiver):
    receiver = callback_receiver()
    [item_id] = seed_items(integration_settings, [{"score": 0.8}])
    with session_scope(db) as session:
        key = create_key(session, "alice", ["review"]).key
        review, _ = record_review(session, item_id, key, "overturned_real", "a real photo")
        review_id = review.id
    assert deliver(_settings(integration_settings, callback_url=receiver.url), db, EVENT_REVIEW, item_id, str(review_id), 1).delivered
    event = json.loads(receiver.requests[0][1])
    assert event["type"] == "review.decided" and event["item"]["decision"] == "overturned_real"
    assert event["review"]["reviewer"] == "alice" and event["review"]["note"] == "a real photo"
    assert event["review"]["model_label"] == "fake"


def test_backoff_doubles_and_stays_under_the_visibility_timeout(integration_settings):
    settings = integration_settings.model_copy(
        update={"callback_backoff_s": 1.0, "callback_backoff_max_s": 1000.0, "visibility_timeout_s": 100}
    )
    delays = [backoff_s(attempt, settings) for attempt in range(1, 10)]
    assert 0.8 <= delays[0] <= 1.2 and 1.6 <= delays[1] <= 2.4 and 3.2 <= delays[2] <= 4.8
    assert max(delays) <= 50 * 1.2


@pytest.mark.parametrize(
    "env",
    [{"callback_url": "https://x.example/hook"}, {"callback_urls": {"a": "https://x.example/hook"}},
     {"callback_url": "ftp://x.example", "callback_secret": "s"}],
)
def test_callback_settings_need_a_secret_and_http_urls(env):
    with pytest.raises(ValidationError):
        Settings(**env)


def test_callback_urls_come_from_json_in_the_environment(monkeypatch):
    monkeypatch.setenv("DFMOD_CALLBACK_URLS", '{"platform-x": "https://x.example/hook"}')
    monkeypatch.setenv("DFMOD_CALLBACK_URL", "https://all.example/hook")
    monkeypatch.setenv("DFMOD_CALLBACK_SECRET", "s3cret")
    settings = Settings()
    assert settings.callback_url_for("platform-x") == "https://x.example/hook"
    assert settings.callback_url_for("other") == "https://all.example/hook"
    assert "s3cret" not in repr(settings)


class _HostileReceiver:
    """A raw socket server that answers slowly (one byte per ``gap_s``) or with an endless body."""

    def __init__(self, mode: str, gap_s: float = 1.0) -> None:
        import socket
        import threading

        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(8)
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}/hook"
        self.mode, self.gap_s = mode, gap_s
        self.sent = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        import threading

        while True:
            try:
                connection, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(connection,), daemon=True).start()

    def _answer(self, connection) -> None:
        try:
            connection.recv(65536)
            if self.mode == "trickle":
                for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 1000:
                    connection.send(bytes([byte]))
                    time.sleep(self.gap_s)
            else:  # an endless body
                connection.send(b"HTTP/1.1 500 Oops\r\nTransfer-Encoding: chunked\r\n\r\n")
                chunk = b"x" * 65536
                while self.sent < 200 * 2**20:
                    connection.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    self.sent += len(chunk)
        except OSError:
            pass
        finally:
            connection.close()

    def close(self) -> None:
        self.server.close()


def test_a_trickling_receiver_cannot_hold_a_delivery_past_its_deadline(integration_settings, db):
    receiver = _HostileReceiver("trickle", gap_s=0.5)
    settings = _settings(
        integration_settings, callback_url=receiver.url, callback_timeout_s=2.0, callback_deadline_s=3.0
    )
    [item_id] = seed_items(integration_settings, [{"score": 0.8}])
    try:
        started = time.monotonic()
        result = deliver(settings, db, EVENT_VERDICT, item_id, "m1", 1)
        elapsed = time.monotonic() - started
    finally:
        receiver.close()
    # Every byte arrives within the per-read timeout, so only the overall deadline can end it.
    assert elapsed < 3.0 + 2.0 + 1.0, elapsed
    assert result.retry and not result.delivered
    assert "deadline" in result.error


def test_a_receiver_answering_without_end_is_read_only_a_few_kilobytes(integration_settings, db):
    receiver = _HostileReceiver("flood")
    settings = _settings(integration_settings, callback_url=receiver.url)
    [item_id] = seed_items(integration_settings, [{"score": 0.8}])
    try:
        result = deliver(settings, db, EVENT_VERDICT, item_id, "m1", 1)
    finally:
        receiver.close()
    assert result.status_code == 500 and result.retry
    assert len(result.error) < 300
    assert receiver.sent < 50 * 2**20  # we stopped reading long before the receiver stopped sending
