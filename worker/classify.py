"""One batch of items, from ids to verdicts in the database.

This is the worker's whole job, kept apart from Celery so it can be called and tested directly:

1. claim the items (``processing``, attempt counted); skip ones already finished, so a redelivered task
   is a no-op;
2. reuse the verdict of identical bytes (same sha256, same model version) where there is one;
3. fetch and decode the rest in a thread pool (S3 latency and JPEG decoding overlap);
4. run the model once per ``batch_size`` chunk;
5. write verdicts (``ON CONFLICT DO NOTHING``) and final statuses in one transaction;
6. if callbacks are configured, enqueue one ``verdict.created`` event (ids only) per item whose source has a
   callback URL.

A bad file fails its own item with a reason; a transient storage fault sends its item back to the queue
with a delay; neither touches the other items of the batch.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np
from celery import Celery
from sqlalchemy import select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from dfmod import telemetry
from dfmod.callbacks import EVENT_VERDICT, enqueue_events
from dfmod.db import Item, ItemStatus, Verdict, insert_ignore, session_scope, utcnow
from dfmod.detector import Predictor, load_pixels
from dfmod.imaging import ImageRejected
from dfmod.queue import enqueue
from dfmod.settings import Settings
from dfmod.storage import Storage, StorageError, StorageUnavailable

logger = logging.getLogger(__name__)

RETRY_DELAY_S = 5.0


@dataclass
class Claimed:
    id: str
    bucket: str
    key: str
    sha256: str | None
    enqueued_at: datetime | None
    source: str = ""


@dataclass
class Outcome:
    """What happened to one claimed item; exactly one of the result fields is set."""

    item: Claimed
    sha256: str | None = None
    size: int | None = None
    array: np.ndarray | None = None
    fake_probability: float | None = None
    reused_from: str | None = None
    failure: tuple[str, str] | None = None
    transient: str | None = None
    inference_ms: float | None = None
    batch_size: int | None = None


@dataclass
class BatchReport:
    requested: int = 0
    claimed: int = 0
    classified: int = 0
    reused: int = 0
    failed: int = 0
    retried: int = 0
    skipped: int = 0
    claim_s: float = 0.0
    fetch_s: float = 0.0  # fetch + hash + decode + resize, and the reuse look-ups
    inference_s: float = 0.0
    persist_s: float = 0.0
    failures: dict[str, str] = field(default_factory=dict)


class BatchClassifier:
    """Classifies batches of item ids; one per worker process, holding the loaded model."""

    def __init__(
        self,
        settings: Settings,
        session_factory: sessionmaker[Session],
        storage: Storage,
        predictor: Predictor,
        celery_app: Celery | None = None,
    ) -> None:
        self.settings = settings
        self.session_factory = session_factory
        self.storage = storage
        self.predictor = predictor
        self.celery_app = celery_app
        self.limits = settings.image_limits
        self.threshold = predictor.threshold
        self.model_version = predictor.model_version
        self._pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="dfmod-fetch")
        # With the threads pool, batches run concurrently: one fetches and decodes while another owns the
        # model. One forward pass at a time keeps each at full speed (and one CUDA stream busy).
        self._inference_lock = threading.Lock()

    # --- the batch ---------------------------------------------------------------------------------

    def run(self, item_ids: list[str]) -> BatchReport:
        started = time.perf_counter()
        report = BatchReport(requested=len(item_ids))
        unique_ids = list(dict.fromkeys(item_ids))
        claimed = self._with_db_retry(lambda: self._claim(unique_ids, report))
        report.claim_s = time.perf_counter() - started
        report.claimed = len(claimed)
        report.skipped = len(unique_ids) - len(claimed)
        if not claimed:
            return report
        now = utcnow()
        for item in claimed:
            if item.enqueued_at is not None:
                telemetry.QUEUE_WAIT_SECONDS.observe(max(0.0, (now - item.enqueued_at).total_seconds()))

        outcomes = [Outcome(item=item) for item in claimed]
        fetch_started = time.perf_counter()
        self._reuse(outcomes, lambda o: o.item.sha256)
        pending = [o for o in outcomes if o.reused_from is None]
        for outcome, loaded in zip(pending, self._pool.map(self._load, [o.item for o in pending])):
            outcome.sha256, outcome.size, outcome.array, outcome.failure, outcome.transient = loaded
        self._reuse([o for o in pending if o.array is not None], lambda o: o.sha256)
        report.fetch_s = time.perf_counter() - fetch_started
        self._infer([o for o in pending if o.array is not None and o.reused_from is None], report)

        persist_started = time.perf_counter()
        self._with_db_retry(lambda: self._persist(outcomes))
        report.persist_s = time.perf_counter() - persist_started
        if self.settings.callbacks_enabled:
            enqueue_events(
                self.celery_app, self.settings,
                [
                    (EVENT_VERDICT, o.item.id, self.model_version)
                    for o in outcomes
                    if o.fake_probability is not None and self.settings.callback_url_for(o.item.source)
                ],
            )
        retry_ids = [o.item.id for o in outcomes if o.transient]
        if retry_ids and self.celery_app is not None:
            try:
                enqueue(self.celery_app, self.settings, retry_ids, countdown=RETRY_DELAY_S)
            except Exception:  # noqa: BLE001 - the sweep re-enqueues them
                logger.warning("could not re-enqueue %d item(s); the sweep will", len(retry_ids), exc_info=True)

        for outcome in outcomes:
            if outcome.failure:
                report.failed += 1
                report.failures[outcome.item.id] = outcome.failure[0]
                telemetry.ITEM_FAILURES.labels(reason=outcome.failure[0]).inc()
            elif outcome.transient:
                report.retried += 1
                telemetry.TRANSIENT_ERRORS.labels(kind="storage").inc()
            elif outcome.fake_probability is not None:
                label = self.predictor.label_for(outcome.fake_probability)
                reused = outcome.reused_from is not None
                report.reused += reused
                report.classified += not reused
                telemetry.IMAGES_CLASSIFIED.labels(label=label, reused=str(reused).lower()).inc()
        telemetry.BATCH_SECONDS.observe(time.perf_counter() - started)
        logger.info(
            "batch: %d requested, %d classified, %d reused, %d failed, %d retried, %d skipped in %.3fs "
            "(claim %.3f, fetch+decode %.3f, inference %.3f, persist %.3f)",
            report.requested, report.classified, report.reused, report.failed, report.retried, report.skipped,
            time.perf_counter() - started, report.claim_s, report.fetch_s, report.inference_s, report.persist_s,
        )
        return report

    # --- steps -------------------------------------------------------------------------------------

    def _claim(self, item_ids: list[str], report: BatchReport) -> list[Claimed]:
        with session_scope(self.session_factory) as session:
            query = select(Item).where(Item.id.in_(item_ids))
            if session.get_bind().dialect.name == "postgresql":
                # Two deliveries of one item in two workers at once: one claims it, the other moves on.
                query = query.with_for_update(skip_locked=True)
            items = session.scalars(query).all()
            already = set(
                session.scalars(
                    select(Verdict.item_id).where(
                        Verdict.item_id.in_(item_ids), Verdict.model_version == self.model_version
                    )
                )
            )
            now = utcnow()
            claimed = []
            for item in items:
                if item.status in (ItemStatus.classified, ItemStatus.failed):
                    continue  # a duplicate delivery of finished work
                if item.id in already:
                    item.status = ItemStatus.classified
                    continue
                if item.attempts >= self.settings.max_attempts:
                    item.status = ItemStatus.failed
                    item.failure_reason = "too_many_attempts"
                    item.failure_detail = f"gave up after {item.attempts} attempts"
                    report.failures[item.id] = "too_many_attempts"
                    telemetry.ITEM_FAILURES.labels(reason="too_many_attempts").inc()
                    continue
                item.status = ItemStatus.processing
                item.attempts += 1
                item.updated_at = now
                claimed.append(Claimed(item.id, item.bucket, item.key, item.sha256, item.enqueued_at, item.source))
            return claimed

    def _reuse(self, outcomes: list[Outcome], sha_of) -> None:
        """Copy the current model's verdict of identical bytes instead of classifying them again."""
        if not self.settings.reuse_verdicts:
            return
        shas = {sha_of(o) for o in outcomes if sha_of(o)}
        if not shas:
            return
        with session_scope(self.session_factory) as session:
            rows = session.execute(
                select(Verdict.sha256, Verdict.fake_probability, Verdict.item_id)
                .where(Verdict.model_version == self.model_version, Verdict.sha256.in_(shas))
                .order_by(Verdict.id)
            ).all()
        known: dict[str, tuple[float, str]] = {}
        for sha, probability, item_id in rows:
            known.setdefault(sha, (probability, item_id))
        for outcome in outcomes:
            sha = sha_of(outcome)
            if sha in known and known[sha][1] != outcome.item.id:
                outcome.fake_probability, outcome.reused_from = known[sha]
                outcome.sha256 = sha
                outcome.array = None

    def _load(self, item: Claimed):
        """Fetch, hash and decode one item: (sha256, size, array, failure, transient)."""
        try:
            data = self.storage.get(item.bucket, item.key, self.settings.max_upload_bytes)
        except StorageUnavailable as exc:
            return None, None, None, None, str(exc)
        except StorageError as exc:
            return None, None, None, (exc.reason, str(exc)), None
        sha256 = hashlib.sha256(data).hexdigest()
        try:
            array = load_pixels(data, self.limits, self.predictor.meta)
        except ImageRejected as exc:
            return sha256, len(data), None, (exc.reason, exc.detail), None
        except Exception as exc:  # noqa: BLE001 - a decoder bug must fail one item, not the batch
            logger.exception("unexpected error decoding %s/%s", item.bucket, item.key)
            return sha256, len(data), None, ("decode_error", f"{type(exc).__name__}: {exc}"), None
        return sha256, len(data), array, None, None

    def _infer(self, outcomes: list[Outcome], report: BatchReport) -> None:
        # Identical bytes inside one batch are classified once.
        representatives: dict[str, Outcome] = {}
        for outcome in outcomes:
            representatives.setdefault(outcome.sha256, outcome)
        unique = list(representatives.values())
        probabilities: dict[str, float] = {}
        size = self.settings.batch_size
        for start in range(0, len(unique), size):
            chunk = unique[start : start + size]
            with self._inference_lock:
                began = time.perf_counter()
                scores = self.predictor.predict_pixels([o.array for o in chunk])
                elapsed = time.perf_counter() - began
            report.inference_s += elapsed
            telemetry.INFERENCE_SECONDS.observe(elapsed)
            telemetry.BATCH_SIZE.observe(len(chunk))
            for outcome, score in zip(chunk, scores):
                probabilities[outcome.sha256] = float(score)
                outcome.inference_ms = elapsed * 1000.0 / len(chunk)
                outcome.batch_size = len(chunk)
        for outcome in outcomes:
            outcome.fake_probability = probabilities[outcome.sha256]
            outcome.array = None  # free the pixels before the database round trip
            if outcome is not representatives[outcome.sha256]:
                outcome.reused_from = representatives[outcome.sha256].item.id

    def _persist(self, outcomes: list[Outcome]) -> None:
        now = utcnow()
        with session_scope(self.session_factory) as session:
            verdict_rows = []
            for outcome in outcomes:
                if outcome.fake_probability is None:
                    continue
                verdict_rows.append(
                    {
                        "item_id": outcome.item.id,
                        "label": self.predictor.label_for(outcome.fake_probability),
                        "fake_probability": outcome.fake_probability,
                        "threshold": self.threshold,
                        "model_version": self.model_version,
                        "sha256": outcome.sha256,
                        "inference_ms": outcome.inference_ms,
                        "batch_size": outcome.batch_size,
                        "device": self.predictor.device if outcome.reused_from is None else None,
                        "reused_from_item_id": outcome.reused_from,
                        "created_at": now,
                    }
                )
            insert_ignore(session, Verdict, verdict_rows, ["item_id", "model_version"])
            items = {
                item.id: item
                for item in session.scalars(select(Item).where(Item.id.in_([o.item.id for o in outcomes])))
            }
            for outcome in outcomes:
                item = items.get(outcome.item.id)
                if item is None:  # deleted while we worked
                    continue
                if outcome.sha256:
                    item.sha256 = outcome.sha256
                if outcome.size is not None:
                    item.size = outcome.size
                item.updated_at = now
                if outcome.fake_probability is not None:
                    item.status = ItemStatus.classified
                    item.classified_at = now
                    item.failure_reason = item.failure_detail = None
                    # The newest verdict, copied for the reviewers' queries (dfmod.review).
                    item.score = outcome.fake_probability
                    item.label = self.predictor.label_for(outcome.fake_probability)
                    item.threshold = self.threshold
                    item.model_version = self.model_version
                elif outcome.failure:
                    item.status = ItemStatus.failed
                    item.failure_reason, detail = outcome.failure
                    item.failure_detail = detail[:2000]
                elif outcome.transient:
                    item.status = ItemStatus.queued
                    item.failure_detail = f"retrying: {outcome.transient}"[:2000]
                    item.enqueued_at = now

    def _with_db_retry(self, operation, attempts: int = 5):
        """Retry a transaction through short database outages (failover, restart) with backoff."""
        delay = 0.5
        for attempt in range(1, attempts + 1):
            try:
                return operation()
            except OperationalError:
                if attempt == attempts:
                    raise
                logger.warning("database unavailable (attempt %d/%d); retrying in %.1fs", attempt, attempts, delay)
                telemetry.TRANSIENT_ERRORS.labels(kind="database").inc()
                time.sleep(delay)
                delay = min(delay * 2, 8.0)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
