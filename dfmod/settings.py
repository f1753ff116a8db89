"""dfmod's one settings object.

Every process (API, worker, CLI) reads the environment once into :class:`Settings` and passes that
object down; nothing else reads ``DFMOD_*`` variables. Backends are chosen by URL:

* ``database_url``: ``postgresql+psycopg://...`` in production, ``sqlite:///...`` embedded.
* ``broker_url``: ``redis://...`` in production, ``filesystem://`` (kombu's file transport under
  ``data_dir``) embedded.
* ``storage_url``: ``s3://BUCKET`` for S3-compatible storage (AWS S3, MinIO, R2, moto), or a local
  directory whose sub-directories play the part of buckets.

Left unset, the three URLs default to the embedded backends under ``data_dir``, so ``dfmod up`` runs on a
fresh machine with no Redis, Postgres or S3.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlparse

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    """Configuration for every dfmod process; each field is the env variable ``DFMOD_<FIELD>``."""

    model_config = SettingsConfigDict(env_prefix="DFMOD_", env_file=None, extra="ignore")

    # --- where things live -------------------------------------------------------------------------
    data_dir: Path = Field(
        Path("dfmod-data"),
        description="Root of the embedded backends (SQLite file, broker folder, local object store).",
    )
    database_url: str | None = Field(
        None, description="SQLAlchemy URL: postgresql+psycopg://user:pass@host/db or sqlite:///path.db."
    )
    database_pool_size: int = Field(5, ge=1, description="Connections kept per process (Postgres).")
    database_retry_s: float = Field(
        60.0, ge=0, description="How long a worker keeps retrying a database step through an outage (with backoff)."
    )
    broker_url: str | None = Field(
        None, description="Celery broker: redis://host:6379/0, or filesystem:// for the embedded broker."
    )
    queue: str = Field("dfmod-classify", description="Celery queue (a Redis list) that carries classify tasks.")
    storage_url: str | None = Field(
        None,
        description="s3://BUCKET (uploads go to BUCKET) or a local directory; default DATA_DIR/objects/uploads.",
    )
    allowed_buckets: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated buckets that may be registered or notified; the upload bucket always is.",
    )

    # --- S3 client ---------------------------------------------------------------------------------
    s3_endpoint_url: str | None = Field(None, description="S3-compatible endpoint (MinIO, R2); unset for AWS.")
    s3_region: str = Field("us-east-1", description="Region used to sign S3 requests.")
    s3_access_key_id: SecretStr | None = Field(None, description="S3 access key; unset to use the AWS chain.")
    s3_secret_access_key: SecretStr | None = Field(None, description="S3 secret key.")
    s3_max_attempts: int = Field(5, ge=1, description="botocore retry attempts (adaptive mode).")
    s3_connect_timeout_s: float = Field(5.0, gt=0, description="S3 connect timeout in seconds.")
    s3_read_timeout_s: float = Field(30.0, gt=0, description="S3 read timeout in seconds.")
    api_s3_timeout_s: float = Field(
        3.0, gt=0,
        description="The API's S3 connect and read timeout: an upload to a stalled store ends in a 503 after at most "
        "about api_s3_max_attempts x this, instead of holding the client.",
    )
    api_s3_max_attempts: int = Field(2, ge=1, description="The API's S3 attempts per request (workers use s3_max_attempts).")
    s3_addressing_style: Literal["auto", "path", "virtual"] = Field(
        "path", description="Path-style suits MinIO and most self-hosted endpoints."
    )
    s3_reader: Literal["auto", "obstore", "boto3"] = Field(
        "auto",
        description="Client for object reads (the worker's fetches): obstore (Rust, about a fifth of botocore's CPU per "
        "GET) where installed, else boto3; writes and metadata always go through boto3.",
    )

    # --- API ---------------------------------------------------------------------------------------
    s3_event_token: SecretStr | None = Field(
        None,
        description="Events token of the default tenant (S3/MinIO notifications present it as a bearer token); "
        "other tenants have their own (`dfmod tenants create`). With no token at all, /v1/events/s3 is off.",
    )
    secret_key: SecretStr | None = Field(
        None,
        description="Fernet key(s) that encrypt tenants' callback secrets in the database, comma-separated (the "
        "first encrypts; all decrypt, for rotating it). Make one with `dfmod tenants secret-key`. Unset: `dfmod up` "
        "keeps a generated one in DATA_DIR/secret.key; with Postgres, tenants cannot get callback secrets.",
    )
    rate_limit_uploads: str | None = Field(
        None,
        description='Per-key limit on uploads and registrations, e.g. "120/minute" or "10/second;1000/hour" '
        "(the `limits` notation); unset: none.",
    )
    rate_limit_reads: str | None = Field(
        None, description='Per-key limit on every other keyed request, e.g. "600/minute"; unset: none.'
    )
    rate_limit_storage_url: str | None = Field(
        None,
        description="Where the counters live, shared by every API replica: redis://... (default: the broker URL when "
        "it is Redis, else memory://, per process).",
    )
    max_upload_bytes: int = Field(20 * 1024 * 1024, ge=1, description="Largest accepted image, in bytes.")
    max_image_pixels: int = Field(
        50_000_000, ge=1, description="Largest decoded image (width x height); larger ones fail as bombs."
    )
    min_image_side: int = Field(16, ge=1, description="Images with a smaller side fail as too small.")
    ready_requires_worker: bool = Field(
        False,
        description="/readyz also needs a live worker on the classify queue (heartbeats in the broker). On in "
        "`dfmod up`; off by default where workers scale to zero and uploads must still be accepted.",
    )

    # --- worker ------------------------------------------------------------------------------------
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Inference device; auto picks CUDA if torch is installed and sees a GPU."
    )
    backend: Literal["auto", "torch", "onnxruntime", "openvino"] = Field(
        "auto",
        description="Inference backend; auto takes the fastest accepted one installed for the device (CUDA: torch; "
        "CPU: OpenVINO, then ONNX Runtime, then torch). The choice and its reason are logged and exported as the "
        "backend label of dfmod_model_info.",
    )
    precision: Literal["auto", "fp32", "bf16", "int8"] = Field(
        "auto",
        description="Inference precision on CPU; auto takes the fastest one that passed the acceptance check for the "
        "model (see the model card). bf16 needs a CPU with avx512_bf16 or AMX.",
    )
    backend_trial_s: float = Field(
        4.0, ge=0.0, le=60.0,
        description="auto on CPU: seconds a worker spends as it starts timing the two best-ranked accepted "
        "combinations (e.g. openvino-bf16 and openvino-int8) on its own CPU, at DFMOD_BATCH_SIZE with its threads "
        "and streams; it keeps the faster (the lower-ranked one only when 3 % faster). 0: the ranking alone.",
    )
    checkpoint: Path | None = Field(None, description="Model checkpoint (.safetensors); default: the shipped one.")
    threshold: float | None = Field(
        None, ge=0.0, le=1.0,
        description="Override the checkpoint's decision threshold on (calibrated) fake probability; wins over "
        "operating_point.",
    )
    operating_point: str | None = Field(
        None,
        description="Named operating point stored in the checkpoint (fpr_1, fpr_5, balanced; see `dfmod "
        "calibrate`) whose threshold the worker applies; unset: the checkpoint's default threshold.",
    )
    face_stage: bool = Field(
        False,
        description="Find faces in each image first (MTCNN, the `faces` extra) and classify every face; the image's "
        "score is its most-fake face, and an image without a face gets the label no_face. Off: the whole image "
        "is classified as one face crop (for platforms that send crops).",
    )
    face_detect_side: int = Field(1024, ge=64, description="Face stage: longest image side the face detector sees.")
    face_min_score: float = Field(0.9, ge=0.0, le=1.0, description="Face stage: lowest detector score kept as a face.")
    batch_size: int = Field(32, ge=1, description="Most tasks classified in one forward pass.")
    batch_wait_ms: int = Field(50, ge=0, description="Longest wait for a batch to fill before it runs anyway.")
    worker_pool: Literal["solo", "threads"] = Field(
        "threads",
        description="Celery pool; both load one model per process. threads runs DFMOD_WORKER_CONCURRENCY batches "
        "at once, so one batch's fetch, decode and database round trips overlap another's forward pass and the "
        "worker's cores stay busy (CPU and GPU workers); solo runs one batch at a time.",
    )
    worker_concurrency: int = Field(2, ge=1, description="Batches in flight per worker (threads pool only).")
    inference_streams: int | None = Field(
        None, ge=1,
        description="Forward passes that may run at once in a CPU worker, each on its own share of the intra-op "
        "threads (OpenVINO streams; ONNX Runtime and torch runs on the calling thread). Default: the batches in "
        "flight (DFMOD_WORKER_CONCURRENCY with the threads pool, else 1). CUDA workers run one at a time.",
    )
    torch_threads: int | None = Field(
        None, ge=1, description="Intra-op threads of the inference backend (any backend); default: the CPUs the process may use "
        "(its affinity mask, capped by a cgroup CPU quota)."
    )
    visibility_timeout_s: int = Field(
        600, ge=1, description="Redis: unacked tasks of a dead worker are redelivered after this many seconds."
    )
    stuck_after_s: int = Field(
        300, ge=1, description="Items queued or processing this long are re-enqueued by the sweep."
    )
    sweep_interval_s: int = Field(
        60, ge=0,
        description="How often a worker runs the stuck-item sweep; 0: never (keep at least one sweeping worker per "
        "database; `dfmod bench` turns it off for its workers, which must not pull the database's other items onto "
        "the bench's queue).",
    )
    max_attempts: int = Field(5, ge=1, description="Deliveries of one item before it fails for good.")
    decode_budget_pixels: int = Field(
        64_000_000, ge=1,
        description="Pixels a worker (or the API, for thumbnails) decodes at once, summed over its threads: "
        "bounds decode memory at about 8 bytes per pixel (a 50-megapixel PNG is decoded alone).",
    )
    metrics_port: int | None = Field(9100, description="Worker Prometheus port; unset to disable.")
    metrics_addr: str = Field(
        "0.0.0.0", description="Interface of the worker's metrics port; `dfmod up` uses 127.0.0.1 and a free port."
    )
    heartbeat_dir: Path | None = Field(
        None,
        description="Where a worker keeps its liveness heartbeat (checked by `dfmod worker-alive`); "
        "default: DATA_DIR/heartbeat.",
    )
    heartbeat_interval_s: float = Field(
        5.0, gt=0, description="How often the worker's consuming loop refreshes its heartbeat."
    )
    reuse_verdicts: bool = Field(True, description="Reuse the verdict of identical bytes (same sha256 and model).")
    events_queue: str = Field(
        "dfmod-events",
        description="Celery queue for callback deliveries and heatmaps; `dfmod worker` consumes it too, so the "
        "classify queue length (what the autoscaler reads) counts classify tasks only.",
    )

    # --- review ------------------------------------------------------------------------------------
    review_band: float = Field(
        0.0, ge=0.0, le=1.0,
        description="Items scoring within this much (in calibrated probability) below their verdict's threshold "
        "go to the review queue too.",
    )
    claim_lease_s: int = Field(300, ge=10, description="How long a claimed review item stays reserved to its reviewer.")
    claim_max: int = Field(50, ge=1, description="Most items one claim may hand out.")
    image_link_ttl_s: int = Field(300, ge=10, description="Lifetime of the signed image/heatmap links the API hands out.")

    # --- verdict callbacks -------------------------------------------------------------------------
    callback_url: str | None = Field(None, description="URL that receives every verdict and review event.")
    callback_urls: dict[str, str] = Field(
        default_factory=dict,
        description='JSON object source -> URL, e.g. {"platform-x": "https://x.example/hook"}; wins over callback_url.',
    )
    callback_secret: SecretStr | None = Field(
        None, description="HMAC-SHA256 key that signs every callback; required when a callback URL is set."
    )
    callback_timeout_s: float = Field(5.0, gt=0, description="Per-attempt timeout of a callback POST.")
    callback_deadline_s: float = Field(
        15.0, gt=0, description="Longest a callback attempt may take in all, however slowly the receiver answers."
    )
    callback_max_attempts: int = Field(8, ge=1, description="Attempts per event before delivery gives up.")
    callback_backoff_s: float = Field(2.0, gt=0, description="First retry delay; doubles each attempt (with jitter).")
    callback_backoff_max_s: float = Field(
        300.0, gt=0, description="Longest retry delay (kept below the broker's visibility timeout)."
    )

    @field_validator("allowed_buckets", mode="before")
    @classmethod
    def _split_buckets(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @model_validator(mode="after")
    def _check_urls(self) -> Settings:
        if self.database_url and not self.database_url.startswith(("postgresql", "sqlite")):
            raise ValueError("DFMOD_DATABASE_URL must be postgresql+psycopg://... or sqlite:///...")
        if self.broker_url and not self.broker_url.startswith(("redis://", "rediss://", "filesystem://", "memory://")):
            raise ValueError("DFMOD_BROKER_URL must be redis://..., rediss://... or filesystem://")
        for url in [self.callback_url, *self.callback_urls.values()]:
            if url is not None and not url.startswith(("http://", "https://")):
                raise ValueError(f"callback URLs must be http(s)://...; got {url!r}")
        for name in ("rate_limit_uploads", "rate_limit_reads"):
            value = getattr(self, name)
            if value:
                from limits import parse_many

                try:
                    parse_many(value)
                except ValueError as exc:
                    raise ValueError(f"DFMOD_{name.upper()} is not a rate limit like 120/minute: {value!r}") from exc
        if (self.callback_url or self.callback_urls) and self.callback_secret is None:
            # Unsigned callbacks would let anyone who learns the URL forge verdicts.
            raise ValueError("DFMOD_CALLBACK_SECRET is required when DFMOD_CALLBACK_URL(S) is set")
        return self

    @property
    def callbacks_enabled(self) -> bool:
        return bool(self.callback_url or self.callback_urls)

    def callback_url_for(self, source: str) -> str | None:
        """The URL that hears about items from ``source``: its own, else the global one, else none."""
        return self.callback_urls.get(source, self.callback_url)

    # --- resolved backends -------------------------------------------------------------------------
    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'dfmod.db').resolve()}"

    @property
    def resolved_rate_limit_storage_url(self) -> str:
        if self.rate_limit_storage_url:
            return self.rate_limit_storage_url
        broker = self.resolved_broker_url
        return broker if broker.startswith(("redis://", "rediss://")) else "memory://"

    @property
    def resolved_broker_url(self) -> str:
        return self.broker_url or "filesystem://"

    @property
    def broker_is_embedded(self) -> bool:
        return self.resolved_broker_url.startswith("filesystem://")

    @property
    def batch_slots(self) -> int:
        """Batches a worker runs at once: the threads pool's concurrency, else one."""
        return self.worker_concurrency if self.worker_pool == "threads" else 1

    @property
    def resolved_inference_streams(self) -> int:
        """Forward passes that may run at once: DFMOD_INFERENCE_STREAMS, else one per batch slot."""
        return self.inference_streams or self.batch_slots

    @property
    def resolved_heartbeat_dir(self) -> Path:
        return (self.heartbeat_dir or self.data_dir / "heartbeat").resolve()

    @property
    def broker_folder(self) -> Path:
        """Where the embedded filesystem broker keeps its messages."""
        return (self.data_dir / "broker").resolve()

    @property
    def storage_is_s3(self) -> bool:
        return (self.storage_url or "").startswith("s3://")

    @property
    def upload_bucket(self) -> str:
        if self.storage_is_s3:
            bucket = urlparse(self.storage_url).netloc
            if not bucket:
                raise ValueError("DFMOD_STORAGE_URL must name a bucket: s3://BUCKET")
            return bucket
        return self.local_storage_default_bucket

    local_storage_default_bucket: str = Field("uploads", description="Upload bucket name with local storage.")

    @property
    def local_storage_root(self) -> Path:
        """Folder whose sub-folders are the buckets of local storage."""
        if self.storage_url and not self.storage_is_s3:
            raw = self.storage_url.removeprefix("file://")
            return Path(raw).resolve()
        return (self.data_dir / "objects").resolve()

    @cached_property
    def readable_buckets(self) -> frozenset[str]:
        return frozenset([self.upload_bucket, *self.allowed_buckets])

    def for_api(self) -> Settings:
        """These settings with the API's tighter S3 budget (a request must not wait out the worker's retries)."""
        return self.model_copy(
            update={
                "s3_connect_timeout_s": min(self.s3_connect_timeout_s, self.api_s3_timeout_s),
                "s3_read_timeout_s": self.api_s3_timeout_s,
                "s3_max_attempts": self.api_s3_max_attempts,
            }
        )

    @property
    def image_limits(self):
        """The byte, pixel and size limits every decoder of untrusted images applies."""
        from dfmod.imaging import ImageLimits

        return ImageLimits(self.max_upload_bytes, self.max_image_pixels, self.min_image_side)
