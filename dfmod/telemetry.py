"""Prometheus metrics shared by the API and the workers.

Names are part of the ops contract (dashboards, the Helm chart's ServiceMonitor, alerts): change them only
with a note in the changelog.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# Seconds from enqueue (API) to the start of the batch that classifies the item.
QUEUE_WAIT_SECONDS = Histogram(
    "dfmod_queue_wait_seconds",
    "Time an item waited between enqueue and the start of its batch.",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900),
)
BATCH_SIZE = Histogram(
    "dfmod_batch_size",
    "Items per classification batch (after de-duplication and reuse).",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
)
INFERENCE_SECONDS = Histogram(
    "dfmod_inference_seconds",
    "Model forward time per batch.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
BATCH_SECONDS = Histogram(
    "dfmod_batch_seconds",
    "Wall time of a whole batch: claim, fetch, decode, infer, persist.",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
IMAGES_CLASSIFIED = Counter(
    "dfmod_images_classified_total", "Items that received a verdict.", ["label", "reused"]
)
ITEM_FAILURES = Counter("dfmod_item_failures_total", "Items marked failed, by reason.", ["reason"])
TRANSIENT_ERRORS = Counter(
    "dfmod_transient_errors_total", "Transient faults that sent an item back for retry.", ["kind"]
)
ITEMS_REQUEUED = Counter("dfmod_items_requeued_total", "Items re-enqueued by the stuck-item sweep.")
ITEMS_INGESTED = Counter("dfmod_items_ingested_total", "Items recorded by the API.", ["ingest", "created"])
CALLBACK_ATTEMPTS = Counter(
    "dfmod_callback_attempts_total", "Callback delivery attempts, by event type and outcome.", ["event", "outcome"]
)
MODEL_INFO = Gauge(
    "dfmod_model_info",
    "The loaded model (value 1): its version, device, backend-precision (e.g. onnxruntime-int8) and how that "
    "backend was chosen (auto or configured).",
    ["model_version", "device", "backend", "backend_choice"],
)
BACKEND_TRIAL_IMG_S = Gauge(
    "dfmod_backend_trial_images_per_second",
    "img/s each backend-precision reached when auto timed the best-ranked ones on this worker's CPU at start "
    "(DFMOD_BACKEND_TRIAL_S); dfmod_model_info says which one it kept.",
    ["backend"],
)
HTTP_REQUESTS = Counter(
    "dfmod_http_requests_total", "HTTP requests served by the API.", ["method", "route", "status"]
)
HTTP_SECONDS = Histogram(
    "dfmod_http_request_seconds", "HTTP request latency.", ["method", "route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
