"""One batch of items, from ids to verdicts in the database.

This is the worker's whole job, kept apart from Celery so it can be called and tested directly:

1. claim the items (:func:`dfmod.lifecycle.claim_for_classification`); a redelivered task is a no-op;
2. reuse the verdict of identical bytes (same sha256, same model version) where there is one; across
   tenants the verdict is copied without ``reused_from`` (and with the original's timings), so no tenant
   learns that another one sent the same bytes;
3. fetch and decode the rest in a thread pool (S3 latency and JPEG decoding overlap); with the face stage
   (``DFMOD_FACE_STAGE``), find the faces of each image there too and crop them (:mod:`dfmod.faces`);
4. run the model once per ``batch_size`` chunk (of images, or of all the faces of all the batch's images);
   with the face stage an image's score is its most-fake face, and an image without a face gets the label
   ``no_face`` (score 0, never flagged) instead of a guess;
5. write verdicts and final statuses in one transaction (:func:`dfmod.lifecycle.persist_results`);
6. enqueue one ``verdict.created`` event (ids only) per item whose tenant has a callback URL.

Labels use the item's tenant's threshold when it has one, else the model's (``DFMOD_THRESHOLD`` overrides both).

Every database step retries through short outages (a Postgres restart or failover) with backoff, and a
batch that fails anyway puts the items it holds back on the queue: no batch leaves items ``processing``
for the sweep. A bad file fails its own item with a reason; a transient storage fault sends its item back
to the queue with a delay; neither touches the other items of the batch. All SQL lives in
:mod:`dfmod.lifecycle`.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from dfmod import lifecycle, telemetry
from dfmod.callbacks import EVENT_VERDICT, enqueue_events
from dfmod.db import retry_database, session_scope, utcnow
from dfmod.detector import Predictor, load_pixels, to_pixels
from dfmod.faces import NO_FACE, Face, face_crops, scale_face
from dfmod.imaging import DecodeBudget, ImageRejected, decode_image, oriented_size
from dfmod.lifecycle import Claimed, ItemResult, VerdictData
from dfmod.queue import enqueue
from dfmod.settings import Settings
from dfmod.storage import Storage, StorageError, StorageUnavailable
from dfmod.tenants import has_callback, load_tenants

logger = logging.getLogger(__name__)

RETRY_DELAY_S = 5.0
_TENANTS_TTL_S = 10.0


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
    device: str | None = None
    cross_tenant_reuse: bool = False
    faces: list | None = None  # face stage: the dfmod.faces.Face list, in the order of the rows of ``array``
    face_probabilities: list[float] | None = None


@dataclass
class BatchReport:
    requested: int = 0
    claimed: int = 0
    classified: int = 0
    reused: int = 0
    failed: int = 0
    retried: int = 0
    skipped: int = 0
    released: int = 0  # put back on the queue because the batch itself failed
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
        self.face_finder = None
        if settings.face_stage:
            from dfmod.faces import FaceFinder

            self.face_finder = FaceFinder(detect_side=settings.face_detect_side, min_score=settings.face_min_score)
        # Scores of whole images and of their faces differ: they are never reused for one another.
        self.model_version = predictor.model_version + ("+faces" if self.face_finder else "")
        if self.face_finder:
            logger.info("face stage on: %s; verdicts under %s", self.face_finder.description, self.model_version)
        self._pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="dfmod-fetch")
        # Sixteen fetch threads may all hold worst-case images at once; the budget bounds what they decode.
        self.decode_budget = DecodeBudget(settings.decode_budget_pixels)
        # With the threads pool, batches run concurrently: one fetches and decodes while another is in the
        # model. The predictor says how many forward passes may run at once: one on CUDA (one stream kept
        # busy) and by default on CPU with the solo pool; on CPU with more batch slots, one per stream, each
        # on its share of the cores (see DFMOD_INFERENCE_STREAMS).
        self._model_slots = threading.BoundedSemaphore(predictor.streams)
        # Tenants' thresholds and callback settings: a handful of rows, re-read every few seconds.
        self._tenants: dict = {}
        self._tenants_read_at = -1e9

    # --- the batch ---------------------------------------------------------------------------------

    def run(self, item_ids: list[str]) -> BatchReport:
        started = time.perf_counter()
        report = BatchReport(requested=len(item_ids))
        unique_ids = list(dict.fromkeys(item_ids))
        claim = self._in_transaction(
            "claim",
            lambda session: lifecycle.claim_for_classification(
                session, unique_ids, self.model_version, self.settings.max_attempts
            ),
        )
        for item_id in claim.gave_up:
            report.failures[item_id] = lifecycle.TOO_MANY_ATTEMPTS
        claimed = claim.claimed
        report.claim_s = time.perf_counter() - started
        report.claimed = len(claimed)
        report.skipped = len(unique_ids) - len(claimed)
        if not claimed:
            return report
        try:
            outcomes = self._classify(claimed, report)
        except Exception as exc:
            # Whatever broke the batch (a database outage longer than the retries, a bug), the items it
            # holds go back to the queue now instead of waiting for the sweep as ``processing``. If even
            # that fails, the error goes up and the batching layer returns the messages to the broker.
            logger.exception("batch of %d failed", len(claimed))
            self._release([item.id for item in claimed], f"{type(exc).__name__}: {exc}", report)
            return report
        self._report(outcomes, report, started)
        return report

    def _classify(self, claimed: list[Claimed], report: BatchReport) -> list[Outcome]:
        now = utcnow()
        for item in claimed:
            if item.enqueued_at is not None:
                telemetry.QUEUE_WAIT_SECONDS.observe(max(0.0, (now - item.enqueued_at).total_seconds()))

        if time.monotonic() - self._tenants_read_at > _TENANTS_TTL_S:
            self._tenants = self._in_transaction("tenants", load_tenants)
            self._tenants_read_at = time.monotonic()
        outcomes = [Outcome(item=item) for item in claimed]
        fetch_started = time.perf_counter()
        self._reuse(outcomes, lambda o: o.item.sha256)
        pending = [o for o in outcomes if o.fake_probability is None]
        for outcome, loaded in zip(pending, self._pool.map(self._load, [o.item for o in pending]), strict=True):
            outcome.sha256, outcome.size, outcome.array, outcome.failure, outcome.transient, outcome.faces = loaded
        self._reuse([o for o in pending if o.array is not None], lambda o: o.sha256)
        report.fetch_s = time.perf_counter() - fetch_started
        self._infer([o for o in pending if o.array is not None and o.fake_probability is None], report)

        persist_started = time.perf_counter()
        results = [self._result(outcome) for outcome in outcomes]
        self._in_transaction("persist", lambda session: lifecycle.persist_results(session, results))
        report.persist_s = time.perf_counter() - persist_started
        enqueue_events(
            self.celery_app, self.settings,
            [
                (EVENT_VERDICT, o.item.id, self.model_version)
                for o in outcomes
                if o.fake_probability is not None
                and has_callback(self._tenants.get(o.item.tenant_id), self.settings, o.item.source)
            ],
        )
        self._requeue([o.item.id for o in outcomes if o.transient])
        return outcomes

    def _report(self, outcomes: list[Outcome], report: BatchReport, started: float) -> None:
        for outcome in outcomes:
            if outcome.failure:
                report.failed += 1
                report.failures[outcome.item.id] = outcome.failure[0]
                telemetry.ITEM_FAILURES.labels(reason=outcome.failure[0]).inc()
            elif outcome.transient:
                report.retried += 1
                telemetry.TRANSIENT_ERRORS.labels(kind="storage").inc()
            elif outcome.fake_probability is not None:
                label = self._label(outcome)
                reused = outcome.reused_from is not None or outcome.cross_tenant_reuse
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

    # --- steps -------------------------------------------------------------------------------------

    def _in_transaction(self, step: str, work):
        """Run ``work(session)`` in one transaction, retried through database outages."""

        def attempt():
            with session_scope(self.session_factory) as session:
                return work(session)

        return retry_database(attempt, self.settings.database_retry_s, what=f"worker {step}")

    def _reuse(self, outcomes: list[Outcome], sha_of) -> None:
        """Copy the current model's verdict of identical bytes instead of classifying them again."""
        if not self.settings.reuse_verdicts:
            return
        shas = {sha_of(o) for o in outcomes if sha_of(o)}
        if not shas:
            return
        known = self._in_transaction(
            "reuse", lambda session: lifecycle.find_reusable_verdicts(session, self.model_version, shas)
        )
        for outcome in outcomes:
            sha = sha_of(outcome)
            candidates = [verdict for verdict in known.get(sha, []) if verdict.item_id != outcome.item.id]
            if not candidates:
                continue
            # Prefer the tenant's own earlier item: only that one may be named.
            own = [verdict for verdict in candidates if verdict.tenant_id == outcome.item.tenant_id]
            source = (own or candidates)[0]
            outcome.fake_probability = source.fake_probability
            if source.label == NO_FACE:
                outcome.faces = []  # the same bytes had no face: still no_face, not "real" by its score of 0
            elif source.faces:
                # The same bytes' faces, so reviewers see this item's boxes too.
                outcome.faces = [Face((x0, y0, x1, y1), (x0, y0, x1, y1), score)
                                 for x0, y0, x1, y1, score, _ in source.faces]
                outcome.face_probabilities = [face[5] for face in source.faces]
            if own:
                outcome.reused_from = source.item_id
            else:
                # Another tenant's bytes: the verdict is copied but looks like a fresh one (same timings and
                # device), so nothing tells this tenant that someone else sent the same image.
                outcome.cross_tenant_reuse = True
                outcome.inference_ms, outcome.batch_size = source.inference_ms, source.batch_size
                outcome.device = source.device
            outcome.sha256 = sha
            outcome.array = None

    def _load(self, item: Claimed):
        """Fetch, hash and decode one item: (sha256, size, array, failure, transient, faces).

        With the face stage, ``array`` stacks the item's face crops (N x H x W x 3, N may be 0) and ``faces``
        lists the faces in the same order; without it, ``array`` is the whole image and ``faces`` is None.
        """
        try:
            data = self.storage.get(item.bucket, item.key, self.settings.max_upload_bytes)
        except StorageUnavailable as exc:
            return None, None, None, None, str(exc), None
        except StorageError as exc:
            return None, None, None, (exc.reason, str(exc)), None, None
        except Exception as exc:  # one object's fault (e.g. an OSError on a local key) is its own
            logger.exception("unexpected error fetching %s/%s", item.bucket, item.key)
            return None, None, None, ("fetch_error", f"{type(exc).__name__}: {exc}"), None, None
        sha256 = hashlib.sha256(data).hexdigest()
        faces = None
        try:
            if self.face_finder is None:
                array = load_pixels(data, self.limits, self.predictor.meta, budget=self.decode_budget)
            else:
                side = self.settings.face_detect_side
                image = decode_image(data, self.limits, target=(side, side), budget=self.decode_budget)
                found = self.face_finder.find(image)
                # Boxes are kept in the pixels of the image as uploaded (orientation applied), which is what
                # the review page draws on; the crops come from the decoded copy.
                faces = [scale_face(face, image.size, oriented_size(data)) for face in found.faces]
                crops = [to_pixels(crop, self.predictor.meta) for crop in face_crops(image, found)]
                width, height = self.predictor.meta.image_size
                array = np.stack(crops) if crops else np.zeros((0, height, width, 3), dtype=np.uint8)
        except ImageRejected as exc:
            return sha256, len(data), None, (exc.reason, exc.detail), None, None
        except Exception as exc:  # a decoder bug must fail one item, not the batch
            logger.exception("unexpected error decoding %s/%s", item.bucket, item.key)
            return sha256, len(data), None, ("decode_error", f"{type(exc).__name__}: {exc}"), None, None
        return sha256, len(data), array, None, None, faces

    def _infer(self, outcomes: list[Outcome], report: BatchReport) -> None:
        # Identical bytes inside one batch are classified once.
        representatives: dict[str, Outcome] = {}
        for outcome in outcomes:
            representatives.setdefault(outcome.sha256, outcome)
        unique = list(representatives.values())
        # One row per model input: the image, or (face stage) each face of each image, so all the faces of
        # all the batch's images go through the model together.
        rows = ([(o, i) for o in unique for i in range(len(o.array))] if self.face_finder
                else [(o, None) for o in unique])
        row_scores: dict[int, list[float]] = {id(o): [] for o in unique}
        size = self.settings.batch_size
        for start in range(0, len(rows), size):
            chunk = rows[start : start + size]
            with self._model_slots:
                began = time.perf_counter()
                scores = self.predictor.predict_pixels([o.array if i is None else o.array[i] for o, i in chunk])
                elapsed = time.perf_counter() - began
            report.inference_s += elapsed
            telemetry.INFERENCE_SECONDS.observe(elapsed)
            telemetry.BATCH_SIZE.observe(len(chunk))
            for (outcome, _face), score in zip(chunk, scores, strict=True):
                row_scores[id(outcome)].append(float(score))
                outcome.inference_ms = (outcome.inference_ms or 0.0) + elapsed * 1000.0 / len(chunk)
                outcome.batch_size = len(chunk)
        probabilities: dict[str, float] = {}
        for outcome in unique:
            found = row_scores[id(outcome)]
            if self.face_finder:
                outcome.face_probabilities = found
                # The most-fake face decides; no face: score 0 with the label no_face (see _label).
                probabilities[outcome.sha256] = max(found) if found else 0.0
            else:
                probabilities[outcome.sha256] = found[0]
        for outcome in outcomes:
            outcome.fake_probability = probabilities[outcome.sha256]
            outcome.array = None  # free the pixels before the database round trip
            representative = representatives[outcome.sha256]
            if outcome is not representative:
                outcome.faces, outcome.face_probabilities = representative.faces, representative.face_probabilities
                if representative.item.tenant_id == outcome.item.tenant_id:
                    outcome.reused_from = representative.item.id
                else:
                    outcome.cross_tenant_reuse = True
                    outcome.inference_ms, outcome.batch_size = representative.inference_ms, representative.batch_size

    def _result(self, outcome: Outcome) -> ItemResult:
        verdict = None
        if outcome.fake_probability is not None:
            verdict = VerdictData(
                fake_probability=outcome.fake_probability,
                label=self._label(outcome),
                threshold=self._threshold(outcome),
                model_version=self.model_version,
                inference_ms=outcome.inference_ms,
                batch_size=outcome.batch_size,
                device=outcome.device or (self.predictor.device if outcome.reused_from is None else None),
                reused_from=outcome.reused_from,
                faces=self._face_rows(outcome),
            )
        return ItemResult(
            item_id=outcome.item.id, sha256=outcome.sha256, size=outcome.size, verdict=verdict,
            failure=outcome.failure if verdict is None else None,
            retry=outcome.transient if verdict is None and outcome.failure is None else None,
        )

    @staticmethod
    def _face_rows(outcome: Outcome) -> list[dict] | None:
        if not outcome.faces or outcome.face_probabilities is None:
            return None
        return [
            {"face_index": index, "x0": face.box[0], "y0": face.box[1], "x1": face.box[2], "y1": face.box[3],
             "detector_score": face.score, "fake_probability": probability}
            for index, (face, probability) in enumerate(zip(outcome.faces, outcome.face_probabilities, strict=True))
        ]

    def _threshold(self, outcome: Outcome) -> float:
        tenant = self._tenants.get(outcome.item.tenant_id)
        # DFMOD_THRESHOLD is the operator's override for every tenant; a tenant's own threshold refines the model's.
        if tenant is not None and tenant.threshold is not None and self.settings.threshold is None:
            return tenant.threshold
        return self.threshold

    def _label(self, outcome: Outcome) -> str:
        if outcome.faces is not None and not outcome.faces:
            return NO_FACE
        return "fake" if outcome.fake_probability >= self._threshold(outcome) else "real"

    def _requeue(self, item_ids: list[str]) -> None:
        if not item_ids or self.celery_app is None:
            return
        try:
            enqueue(self.celery_app, self.settings, item_ids, countdown=RETRY_DELAY_S)
        except Exception:  # they are queued in the database; the sweep sends them
            logger.warning("could not re-enqueue %d item(s); the sweep will", len(item_ids), exc_info=True)

    def _release(self, item_ids: list[str], reason: str, report: BatchReport) -> None:
        released = self._in_transaction("release", lambda session: lifecycle.release_claims(session, item_ids, reason))
        report.released = len(released)
        logger.warning("batch failed (%s); %d item(s) put back on the queue", reason, len(released))
        self._requeue(released)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
