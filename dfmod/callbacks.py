"""Verdict callbacks: signed JSON events POSTed to the platform that submitted an item.

Two kinds of event: ``verdict.created`` (the worker wrote a verdict) and ``review.decided`` /
``review.retracted`` (a reviewer decided, or undid a decision). Producers send only ids
(:func:`enqueue_events`); the delivery task (:func:`deliver`) builds the body from the database when it
runs, POSTs it, records the attempt in ``callback_deliveries`` and tells the task whether to retry.

Signature, in the ``X-Dfmod-Signature`` header: ``t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>``.
While a tenant rotates its secret, the header carries one ``v1=`` per valid secret (current first, then the
previous one until its overlap ends): ``t=...,v1=<current>,v1=<previous>``. A receiver recomputes the HMAC
over the raw body with the secret it holds, accepts the event if any ``v1`` matches, and rejects stale
timestamps (see :func:`verify_signature`). Each event has a stable id (``X-Dfmod-Event-Id`` and ``id`` in the
body), identical across retries, so receivers can drop duplicates.

Only the item's own tenant's URL is ever called, signed with that tenant's secrets
(:func:`dfmod.tenants.callback_target`); the default tenant falls back to ``DFMOD_CALLBACK_URL(S)`` and
``DFMOD_CALLBACK_SECRET``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import random
import threading
import time
import uuid
from dataclasses import dataclass

from celery import Celery
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dfmod import telemetry
from dfmod.db import CallbackDelivery, Item, Review, Tenant, Verdict, session_scope, utcnow
from dfmod.queue import CALLBACK_TASK, send_events
from dfmod.settings import Settings

logger = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Dfmod-Signature"
EVENT_VERDICT = "verdict.created"
EVENT_REVIEW = "review.decided"
EVENT_RETRACTION = "review.retracted"
_NAMESPACE = uuid.UUID("6f1d3c1e-8d0e-4c1b-9a55-2f3f4b7d9e10")
# Worth another try: the receiver or the network may recover. Any other 4xx is the receiver refusing
# this request, which retrying would not change.
_RETRYABLE_STATUS = {408, 409, 425, 429}


def event_id(event_type: str, item_id: str, ref: str) -> str:
    """Stable per event (not per attempt): verdict events per (item, model version), review events per review."""
    return str(uuid.uuid5(_NAMESPACE, f"{event_type}:{item_id}:{ref}"))


def _digest(secret: str, timestamp: int, body: bytes) -> str:
    return hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def sign(secret: str | tuple[str, ...] | list[str], timestamp: int, body: bytes) -> str:
    """The signature header: one ``v1`` per secret (several while a rotation's overlap lasts)."""
    signing = [secret] if isinstance(secret, str) else list(secret)
    return ",".join([f"t={timestamp}", *(f"v1={_digest(one, timestamp, body)}" for one in signing)])


def verify_signature(secret: str, header: str, body: bytes, tolerance_s: int = 300, now: float | None = None) -> bool:
    """What a receiver does: recompute the HMAC over the raw body, accept if any ``v1`` matches, check freshness."""
    timestamp = None
    presented = []
    for part in header.split(","):
        name, _, value = part.strip().partition("=")
        if name == "t":
            try:
                timestamp = int(value)
            except ValueError:
                return False
        elif name == "v1" and value:
            presented.append(value)
    if timestamp is None or not presented:
        return False
    if abs((time.time() if now is None else now) - timestamp) > tolerance_s:
        return False
    expected = _digest(secret, timestamp, body)
    return any(hmac.compare_digest(expected, value) for value in presented)


def backoff_s(attempt: int, settings: Settings) -> float:
    """Delay before attempt ``attempt + 1``: exponential with +-20 % jitter, capped.

    The cap stays under the Redis visibility timeout: a delayed task held longer than that by a worker
    would be redelivered to another one as if its worker had died.
    """
    cap = min(settings.callback_backoff_max_s, settings.visibility_timeout_s * 0.5)
    delay = min(settings.callback_backoff_s * (2 ** (attempt - 1)), cap)
    return delay * random.uniform(0.8, 1.2)


def enqueue_events(app: Celery | None, settings: Settings, events: list[tuple[str, str, str]]) -> int:
    """Send delivery tasks for (event type, item id, ref) triples; never raises (a lost event is logged)."""
    # Callers send only events whose item's tenant has a callback (dfmod.tenants.has_callback).
    if not events or app is None:
        return 0
    try:
        return send_events(app, settings, CALLBACK_TASK, [list(event) for event in events])
    except Exception:  # the verdict or review is already committed; do not fail it
        telemetry.TRANSIENT_ERRORS.labels(kind="broker").inc()
        logger.warning("could not enqueue %d callback event(s)", len(events), exc_info=True)
        return 0


def _item_json(item: Item) -> dict:
    return {
        "id": item.id, "source": item.source, "bucket": item.bucket, "key": item.key, "sha256": item.sha256,
        "status": item.status.value, "decision": item.decision,
    }


def build_event(session: Session, event_type: str, item_id: str, ref: str) -> dict | None:
    """The event body, from the database as it is now; None if the item or its subject is gone."""
    item = session.get(Item, item_id)
    if item is None:
        return None
    body: dict = {"id": event_id(event_type, item_id, ref), "type": event_type, "item": _item_json(item)}
    if event_type == EVENT_VERDICT:
        verdict = session.scalar(select(Verdict).where(Verdict.item_id == item_id, Verdict.model_version == ref))
        if verdict is None:
            return None
        body["created_at"] = verdict.created_at.isoformat()
        body["verdict"] = {
            "label": verdict.label, "fake_probability": verdict.fake_probability, "threshold": verdict.threshold,
            "flagged": verdict.fake_probability >= verdict.threshold, "model_version": verdict.model_version,
        }
    elif event_type in (EVENT_REVIEW, EVENT_RETRACTION):
        review = session.get(Review, int(ref))
        if review is None or review.item_id != item_id:
            return None
        body["created_at"] = review.created_at.isoformat()
        body["review"] = {
            "id": review.id, "decision": review.decision, "note": review.note, "reviewer": review.reviewer,
            "retracts": review.retracts_id, "model_label": review.model_label, "model_score": review.model_score,
        }
    else:
        raise ValueError(f"unknown callback event type {event_type!r}")
    return body


MAX_RESPONSE_BYTES = 4096
"""Most of a receiver's answer read (for the delivery log): the status is what counts."""


def _post_bounded(client, url: str, body: bytes, headers: dict[str, str]) -> tuple[int, str]:
    """POST and read at most :data:`MAX_RESPONSE_BYTES` of the answer, however much the receiver sends."""
    with client.stream("POST", url, content=body, headers=headers) as response:
        received = bytearray()
        for chunk in response.iter_raw():
            received += chunk[: MAX_RESPONSE_BYTES - len(received)]
            if len(received) >= MAX_RESPONSE_BYTES:
                break
        return response.status_code, received.decode("utf-8", "replace")


@dataclass
class DeliveryResult:
    retry: bool
    delivered: bool = False
    status_code: int | None = None
    error: str | None = None
    skipped: str | None = None


def deliver(
    settings: Settings, factory: sessionmaker[Session], event_type: str, item_id: str, ref: str, attempt: int,
    client=None,
) -> DeliveryResult:
    """Make delivery attempt number ``attempt`` of one event and record it; says whether to retry."""
    import httpx

    from dfmod.tenants import callback_target, secret_box

    with session_scope(factory) as session:
        item = session.get(Item, item_id)
        target = None
        if item is not None:
            tenant = session.get(Tenant, item.tenant_id)
            target = callback_target(tenant, settings, secret_box(settings) if tenant.callback_url else None, item.source)
        if target is None:
            return DeliveryResult(retry=False, skipped="no callback URL for this item")
        url = target.url
        eid = event_id(event_type, item_id, ref)
        if session.scalar(
            select(CallbackDelivery.id).where(
                CallbackDelivery.event_id == eid, CallbackDelivery.url == url, CallbackDelivery.delivered.is_(True)
            )
        ):
            # A redelivered task (worker died after the POST): the receiver has it already.
            return DeliveryResult(retry=False, skipped="already delivered")
        event = build_event(session, event_type, item_id, ref)
    if event is None:
        return DeliveryResult(retry=False, skipped="event subject no longer exists")

    body = json.dumps(event, separators=(",", ":"), sort_keys=True).encode()
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "dfmod-callbacks/1",
        "X-Dfmod-Event": event_type,
        "X-Dfmod-Event-Id": eid,
        "X-Dfmod-Attempt": str(attempt),
        SIGNATURE_HEADER: sign(target.secrets, int(time.time()), body),
    }
    started = time.perf_counter()
    result = DeliveryResult(retry=False)
    own = None
    deadline = None
    if client is None:
        own = client = httpx.Client(timeout=settings.callback_timeout_s, follow_redirects=False)
        # httpx's timeouts are per read: a receiver trickling a byte every few seconds never trips them.
        # Closing the client from a timer ends the attempt at the next read, whatever the receiver does.
        deadline = threading.Timer(settings.callback_deadline_s, own.close)
        deadline.daemon = True
        deadline.start()
    try:
        status_code, text = _post_bounded(client, url, body, headers)
        result.status_code = status_code
        if 200 <= status_code < 300:
            result.delivered = True
        else:
            result.error = f"HTTP {status_code}: {text[:200]}"
            result.retry = status_code >= 500 or status_code in _RETRYABLE_STATUS
    except httpx.HTTPError as exc:
        overdue = deadline is not None and not deadline.is_alive()
        result.error = (f"deadline of {settings.callback_deadline_s}s exceeded: " if overdue else "") + (
            f"{type(exc).__name__}: {exc}"[:2000]
        )
        result.retry = True
    finally:
        if deadline is not None:
            deadline.cancel()
        if own is not None:
            own.close()
    if result.retry and attempt >= settings.callback_max_attempts:
        result.retry = False
        result.error = f"{result.error} (gave up after {attempt} attempts)"
    with session_scope(factory) as session:
        session.add(
            CallbackDelivery(
                event_id=eid, event_type=event_type, item_id=item_id, url=url, attempt=attempt,
                status_code=result.status_code, error=result.error, delivered=result.delivered,
                final=not result.retry, duration_ms=(time.perf_counter() - started) * 1000.0, created_at=utcnow(),
            )
        )
    outcome = "delivered" if result.delivered else ("retry" if result.retry else "failed")
    telemetry.CALLBACK_ATTEMPTS.labels(event=event_type, outcome=outcome).inc()
    log = logger.info if result.delivered else logger.warning
    log("callback %s %s for item %s attempt %d -> %s", event_type, eid, item_id, attempt,
        result.status_code if result.delivered else result.error)
    return result
