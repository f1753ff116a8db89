"""The Celery worker: batched classify task, callback and heatmap tasks, stuck-item sweep and metrics endpoint.

``dfmod worker`` calls :func:`run_worker`. The model is loaded once, in the process that will use it
(the solo and threads pools never fork, so CUDA is initialised after any fork could happen), before the
worker starts consuming: a missing checkpoint stops the worker at start, not at its first batch.

Batching is :mod:`worker.batching`: messages are buffered until ``batch_size`` of them arrived or
``batch_wait_ms`` passed, then the whole buffer is handed to one task call. Prefetch is bounded to one
batch per batch slot, ``batch_size x concurrency`` (see :mod:`dfmod.queue`), tasks are acknowledged after the batch is persisted (``acks_late``), and a
worker killed mid-batch leaves its messages unacknowledged for Redis to redeliver.

Liveness (:mod:`worker.liveness`): the consumer's event loop refreshes a heartbeat file and each batch marks
itself in flight; ``dfmod worker-alive`` (the chart's livenessProbe) checks both.

Callback deliveries and heatmaps are ordinary (unbatched) tasks on ``events_queue``, which every worker
consumes alongside the classify queue.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
from dataclasses import dataclass

from celery import Celery

from dfmod.consumers import start_heartbeat
from dfmod.db import make_engine, make_session_factory
from dfmod.lifecycle import sweep_stuck_items
from dfmod.queue import CALLBACK_TASK, CLASSIFY_TASK, HEATMAP_TASK, make_celery
from dfmod.settings import Settings
from dfmod.storage import make_storage
from dfmod.tenants import BucketDirectory
from worker import liveness
from worker.batching import BatchingTask
from worker.classify import BatchClassifier
from worker.heatmap import HeatmapMaker

logger = logging.getLogger(__name__)


@dataclass
class WorkerRuntime:
    settings: Settings
    celery: Celery
    classifier: BatchClassifier


def build_runtime(settings: Settings) -> WorkerRuntime:
    from dfmod import telemetry
    from dfmod.detector import Predictor

    predictor = Predictor(
        settings.checkpoint, device=settings.device, threshold=settings.threshold, torch_threads=settings.torch_threads,
        backend=settings.backend, precision=settings.precision, operating_point=settings.operating_point,
        streams=settings.resolved_inference_streams, trial_seconds=settings.backend_trial_s,
        trial_batch=settings.batch_size,
    )
    for name, img_s in predictor.trial.items():
        telemetry.BACKEND_TRIAL_IMG_S.labels(backend=name).set(img_s)
    predictor.warmup(min(settings.batch_size, 8))
    telemetry.MODEL_INFO.labels(
        model_version=predictor.model_version, device=predictor.device, backend=predictor.backend,
        backend_choice="auto" if predictor.choice.reason.startswith("auto") else "configured",
    ).set(1)
    engine = make_engine(settings.resolved_database_url, settings.database_pool_size)
    factory = make_session_factory(engine)
    app = make_celery(settings)
    storage = make_storage(settings)
    # Tenants' buckets are in the database; items were checked against them at ingest.
    storage.bucket_allowed = BucketDirectory(settings, factory).readable
    classifier = BatchClassifier(settings, factory, storage, predictor, app)
    register_classify_task(app, settings, classifier)
    register_event_tasks(app, settings, classifier)
    return WorkerRuntime(settings, app, classifier)


def register_classify_task(app: Celery, settings: Settings, classifier: BatchClassifier) -> None:
    # batch_wait_ms=0 or batch_size=1 means "no batching": every message is its own forward pass.
    flush_every = settings.batch_size if settings.batch_wait_ms > 0 else 1

    @app.task(
        name=CLASSIFY_TASK,
        base=BatchingTask,
        flush_every=flush_every,
        max_wait=max(settings.batch_wait_ms, 1) / 1000.0,
        slots=settings.batch_slots,
        acks_late=True,
        ignore_result=True,
    )
    def classify(batch: list[tuple]) -> None:
        item_ids = []
        for args in batch:
            if len(args) == 1 and isinstance(args[0], str):
                item_ids.append(args[0])
            else:
                logger.error("dropping malformed classify message: args=%r", args)
        if item_ids:
            with liveness.batch_in_progress():
                classifier.run(item_ids)


def register_event_tasks(app: Celery, settings: Settings, classifier: BatchClassifier) -> None:
    from dfmod.callbacks import backoff_s, deliver

    heatmaps = HeatmapMaker(settings, classifier.session_factory, classifier.storage, classifier.predictor)

    @app.task(name=CALLBACK_TASK, bind=True, acks_late=True, ignore_result=True, max_retries=None)
    def callback(self, event_type: str, item_id: str, ref: str) -> None:
        attempt = self.request.retries + 1
        result = deliver(settings, classifier.session_factory, event_type, item_id, ref, attempt)
        if result.retry:
            raise self.retry(countdown=backoff_s(attempt, settings))

    @app.task(name=HEATMAP_TASK, acks_late=True, ignore_result=True)
    def heatmap(item_id: str, model_version: str) -> None:
        heatmaps.make(item_id, model_version)


def start_sweeper(runtime: WorkerRuntime, stop: threading.Event) -> threading.Thread | None:
    """Re-enqueue stuck items every ``sweep_interval_s`` (with jitter, so workers don't sweep in lockstep);
    none with an interval of 0."""
    settings = runtime.settings
    if not settings.sweep_interval_s:
        logger.info("stuck-item sweep off (DFMOD_SWEEP_INTERVAL_S=0)")
        return None

    def loop() -> None:
        while not stop.wait(settings.sweep_interval_s * random.uniform(0.8, 1.2)):
            try:
                sweep_stuck_items(runtime.classifier.session_factory, runtime.celery, settings)
            except Exception:  # a failed sweep is retried next interval
                logger.warning("stuck-item sweep failed", exc_info=True)

    thread = threading.Thread(target=loop, name="dfmod-sweep", daemon=True)
    thread.start()
    return thread


def run_worker(
    settings: Settings, log_level: str = "INFO", hostname: str | None = None, queues: list[str] | None = None
) -> None:
    from dfmod.imaging import share_allocator_arenas

    share_allocator_arenas()
    runtime = build_runtime(settings)
    if settings.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(settings.metrics_port, addr=settings.metrics_addr)
    liveness.install(settings.resolved_heartbeat_dir)
    runtime.celery.steps["consumer"].add(liveness.loop_heartbeat_step(settings.heartbeat_interval_s))
    stop = threading.Event()
    start_sweeper(runtime, stop)
    consumed = queues or [settings.queue, settings.events_queue]
    start_heartbeat(settings, hostname or f"{socket.gethostname()}-{os.getpid()}", consumed, stop)
    argv = [
        "worker",
        f"--loglevel={log_level}",  # Celery's own spelling; ours is --log-level
        f"--pool={settings.worker_pool}",
        f"--concurrency={settings.batch_slots}",
        f"--queues={','.join(consumed)}",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]
    if hostname:
        argv.append(f"--hostname={hostname}")
    try:
        runtime.celery.worker_main(argv)
    finally:
        stop.set()
        runtime.classifier.close()
