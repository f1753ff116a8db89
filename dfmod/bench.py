"""``dfmod bench``: throughput and latency of the real pipeline on this machine, printed as a table.

Four measurements, each through the production code path:

* model-only: :meth:`~dfmod.detector.Predictor.predict_pixels` on resized uint8 images at the configured batch
  size, for the default backend and, side by side, for every installed backend and accepted precision
  (``model_only_by_backend``);
* end-to-end: N images already in an S3 server, recorded and enqueued at once, drained by a real
  ``dfmod worker`` process (fetch -> decode -> batch -> infer -> write verdicts);
* unbatched: the same with batching disabled (one task = one forward pass);
* latency: uploads through a real ``dfmod api`` process at a fixed offered rate, p50/p99 from upload to
  verdict.

The throughput phases drain ``repeats`` backlogs and report the median; during the end-to-end drains the
bench also adds up the CPU time of every process on the machine by role (worker, S3 server, database,
broker), because on a machine that hosts them all that, not the model alone, is what bounds throughput.
``worker_non_model_cpu_ms`` is the worker's CPU per image minus the forward pass's (model-only, same
backend and batch, measured once before and once right after the end-to-end drains, the mean of the two:
a VM's speed drifts within minutes, and a forward pass timed only at the start would be charged at another
speed than the drains ran at): fetch, hash, decode, resize, Celery and SQL. The end-to-end drain is repeated with a
``torch`` worker (``end_to_end_torch_img_s``) so the backends compare in one run.

``dfmod bench --worker-only`` drives the :class:`~worker.classify.BatchClassifier` in this process from local
storage and SQLite, without a broker or an S3 server, so the worker's own data path is measured (and can
be profiled with ``--profile``) without those capping it; on a GPU this is the figure to read.

Backends come from the ``DFMOD_*`` environment like everywhere else; where none is configured the bench
uses a throw-away SQLite database, the embedded broker and a ``moto_server`` S3 endpoint it starts itself.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import typer

from dfmod.loopback import free_port, moto_server, port_open, start_child, stop_child


@dataclass
class BenchResult:
    model_only_img_s: float
    end_to_end_img_s: float
    unbatched_img_s: float
    p50_ms: float
    p99_ms: float
    batch_size: int
    device: str
    images: int
    unbatched_images: int
    latency_rate_img_s: float
    latency_samples: int
    backends: dict
    #: CPU milliseconds per image of the forward pass alone (all its threads; the mean of ``model_cpu_ms_runs``).
    model_cpu_ms: float = 0.0
    #: The forward pass's CPU per image measured before and right after the end-to-end drains.
    model_cpu_ms_runs: list = field(default_factory=list)
    #: CPU milliseconds per image spent by each role on this machine during the end-to-end runs.
    end_to_end_cpu_ms: dict = field(default_factory=dict)
    #: Drains per phase: the throughputs above are the medians of these runs.
    repeats: int = 1
    end_to_end_runs_img_s: list = field(default_factory=list)
    unbatched_runs_img_s: list = field(default_factory=list)
    #: The default backend-precision (what `auto` picked), e.g. ``onnxruntime-int8``.
    backend: str = ""
    backend_reason: str = ""
    #: Model-only img/s of every installed backend and accepted precision at ``batch_size``.
    model_only_by_backend: dict = field(default_factory=dict)
    #: Model-only img/s at batch 1 of the same backends (batching gains little on CPU).
    model_only_batch1_by_backend: dict = field(default_factory=dict)
    #: The rounds behind ``model_only_by_backend`` (its medians): the backends alternate, round after round.
    model_only_runs_by_backend: dict = field(default_factory=dict)
    #: The end-to-end drain repeated with a torch worker (null where torch is not installed): the median of
    #: ``end_to_end_torch_runs_img_s``, each drained right after the default worker's run of the same index.
    end_to_end_torch_img_s: float | None = None
    end_to_end_torch_runs_img_s: list = field(default_factory=list)
    #: The end-to-end drain with the face stage on (MTCNN, then every face classified; null without the faces extra).
    end_to_end_faces_img_s: float | None = None
    face_stage_images: int = 0
    #: Worker CPU per image outside the forward pass, in the batched end-to-end runs.
    worker_non_model_cpu_ms: float | None = None
    #: ``--worker-cpus``: the CPUs the worker processes and the model-only phase were pinned to (None: not pinned).
    worker_cpus: list | None = None


def synthetic_jpegs(count: int, size: int = 256, seed: int = 0) -> list[bytes]:
    """Textured JPEGs (quality 90, like the face data) so decode cost and file size are realistic."""
    import numpy as np
    from PIL import Image, ImageFilter

    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        noise = rng.integers(0, 256, (size // 4, size // 4, 3), dtype=np.uint8)
        image = Image.fromarray(noise).resize((size, size), Image.Resampling.BICUBIC).filter(ImageFilter.SMOOTH)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        images.append(buffer.getvalue())
    return images


def folder_jpegs(folder: Path, count: int) -> list[bytes]:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not files:
        raise typer.BadParameter(f"no images under {folder}")
    return [files[i % len(files)].read_bytes() for i in range(count)]


class CpuMeter:
    """CPU seconds used by every process on this machine over a span, grouped by role.

    On a machine that also runs the S3 server, the database and the broker, end-to-end throughput is
    bounded by the CPU all of them need per image, not only by the model; this is what shows where it goes.
    """

    def __init__(self, roles: dict[int, str]) -> None:
        self.roles = roles
        self._start: dict[int, tuple[str, float]] = {}
        self.used: dict[str, float] = {}

    def _role(self, process) -> str:
        if process.pid in self.roles:
            return self.roles[process.pid]
        command = " ".join(process.cmdline() or [process.name()])
        # moto's server runs as moto_server, or as dfmod.moto_main (dfmod.loopback.moto_command).
        for needles, role in (
            (("moto_server", "dfmod.moto_main"), "s3 server"), (("postgres",), "database"), (("redis-server",), "broker"),
        ):
            if any(needle in command for needle in needles):
                return role
        return "other"

    def _sample(self) -> dict[int, tuple[str, float]]:
        import psutil

        sample = {}
        for process in psutil.process_iter():
            try:
                times = process.cpu_times()
                sample[process.pid] = (self._role(process), times.user + times.system)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        return sample

    def start(self) -> None:
        self._start = self._sample()

    def stop(self) -> None:
        """Add the CPU used since :meth:`start` (spans add up, so set-up between them is left out)."""
        for pid, (role, seconds) in self._sample().items():
            _, before = self._start.get(pid, (role, 0.0))
            self.used[role] = self.used.get(role, 0.0) + max(0.0, seconds - before)

    def per_image(self, images: int) -> dict[str, float]:
        """CPU milliseconds per image by role, largest first."""
        return {
            role: round(1000.0 * seconds / images, 2)
            for role, seconds in sorted(self.used.items(), key=lambda kv: -kv[1])
            if 1000.0 * seconds / images >= 0.01
        }


def parse_cpu_list(text: str) -> set[int]:
    """``0``, ``0,2`` or ``0-3`` (the kernel's cpu-list format) -> a set of CPU numbers."""
    cpus: set[int] = set()
    for part in filter(None, (piece.strip() for piece in text.split(","))):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not match or int(match.group(2) or match.group(1)) < int(match.group(1)):
            raise typer.BadParameter(f"not a CPU list: {text!r} (e.g. 0, 0,2 or 0-3)")
        cpus.update(range(int(match.group(1)), int(match.group(2) or match.group(1)) + 1))
    if not cpus:
        raise typer.BadParameter("an empty CPU list")
    return cpus


@contextmanager
def _pinned(cpus: set[int] | None) -> Iterator[None]:
    """Run the calling thread (and the threads and children it starts) on ``cpus``, then restore its mask."""
    if not cpus:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


class _Process:
    def __init__(
        self, args: list[str], env: dict, log: Path, ready: bytes | None = None, port: int | None = None,
        cpus: set[int] | None = None,
    ) -> None:
        self.log = log
        self.handle = open(log, "ab")
        self.process: subprocess.Popen | None = None
        try:
            # Started while pinned: the child and every thread it makes inherit the CPU mask.
            with _pinned(cpus):
                self.process = start_child(args, env=env, stdout=self.handle, stderr=subprocess.STDOUT)
            self._wait_until_ready(args, ready, port)
        except BaseException:  # not ready in time, or the bench itself stopped (SIGTERM) meanwhile
            self.stop()
            raise

    def _wait_until_ready(self, args: list[str], ready: bytes | None, port: int | None) -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{args[3]} exited at start:\n{self.log.read_text()[-3000:]}")
            if ready and ready in self.log.read_bytes():
                return
            if port and port_open(port):
                return
            time.sleep(0.2)
        raise TimeoutError(f"{args} not ready:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.process is not None:
            stop_child(self.process, timeout_s=30)
        self.handle.close()


def _throughput(predictor, batch_size: int, seconds: float) -> tuple[float, float]:
    """(img/s, CPU ms per image) of the predictor on random uint8 pixels at ``batch_size``, with as many
    batches in the model at once as it has streams (as the worker runs it)."""
    import numpy as np

    from dfmod.detector import measure_throughput

    _, height, width = predictor.meta.input_size
    pixels = np.random.default_rng(0).integers(0, 256, (batch_size, height, width, 3), dtype=np.uint8)
    for _ in range(2):
        predictor.predict_pixels(pixels)
    return measure_throughput(predictor.predict_pixels, pixels, seconds, getattr(predictor, "streams", 1))


def serving_candidates(checkpoint) -> list[tuple[str, str]]:
    """Every (backend, precision) installed for the CPU with its file on disk: fp32 and accepted ones only."""
    from dfmod.detector import (
        CPU_RANKING,
        ModelNotAvailable,
        accepted_precisions,
        choose_backend,
        resolve_checkpoint_path,
    )

    path = resolve_checkpoint_path(checkpoint)
    accepted = accepted_precisions(path)
    found = []
    for backend, precision in CPU_RANKING:
        if precision != "fp32" and f"{backend}-{precision}" not in accepted:
            continue
        try:
            choose_backend(path, backend, precision, "cpu")
        except ModelNotAvailable:
            continue
        found.append((backend, precision))
    return found


def _default_predictor(settings):
    """The predictor the worker would load: the configured (or auto) backend and precision."""
    from dfmod.detector import Predictor

    return Predictor(
        settings.checkpoint, backend=settings.backend, precision=settings.precision, device=settings.device,
        torch_threads=settings.torch_threads, streams=settings.resolved_inference_streams,
        trial_seconds=settings.backend_trial_s, trial_batch=settings.batch_size,
    )


#: Model-only rounds: every backend runs once per round, so a drift of the VM's speed (a third within minutes
#: on a shared VM) is spread over all of them instead of favouring whichever ran in the fast minute.
MODEL_ONLY_ROUNDS = 4


def _model_only(settings, batch_size: int, seconds: float, progress=print) -> dict:
    """The default backend's figures, then every installed backend and accepted precision in alternating rounds
    (``seconds`` per backend in all, the median of its rounds reported)."""
    from dfmod.detector import Predictor

    common = dict(device=settings.device, torch_threads=settings.torch_threads)
    default = _default_predictor(settings)
    img_s, cpu_ms = _throughput(default, batch_size, seconds)
    result = {
        "img_s": img_s, "cpu_ms": cpu_ms, "device": default.device, "backend": default.backend,
        "reason": default.choice.reason, "by_backend": {}, "batch1_by_backend": {}, "runs_by_backend": {},
    }
    del default
    others = serving_candidates(settings.checkpoint) if result["device"] == "cpu" else []
    if not others:
        result["by_backend"][result["backend"]] = img_s
        return result
    progress(f"  model-only {', '.join(f'{b}-{p}' for b, p in others)}: {MODEL_ONLY_ROUNDS} alternating rounds ...")
    predictors = {
        f"{backend}-{precision}": Predictor(settings.checkpoint, backend=backend, precision=precision, **common)
        for backend, precision in others
    }
    batch1_runs: dict[str, list[float]] = {name: [] for name in predictors}
    for _ in range(MODEL_ONLY_ROUNDS):
        for name, predictor in predictors.items():
            result["runs_by_backend"].setdefault(name, []).append(
                _throughput(predictor, batch_size, seconds / MODEL_ONLY_ROUNDS)[0]
            )
            batch1_runs[name].append(_throughput(predictor, 1, seconds / 2 / MODEL_ONLY_ROUNDS)[0])
    for name in predictors:
        result["by_backend"][name] = statistics.median(result["runs_by_backend"][name])
        result["batch1_by_backend"][name] = statistics.median(batch1_runs[name])
    return result


def _finished(factory, ids: list[str]) -> tuple[int, datetime | None]:
    """How many of the items are finished (classified or failed), and when the last of them finished.

    This poll runs inside the measured drains, on the cores being measured. On Postgres the ids go as one
    array parameter: an ``IN`` of 1,024 bound parameters cost 18 ms of this process's CPU per poll, about
    0.5 ms per image of a drain, against 5 ms as an array.
    """
    from sqlalchemy import String, any_, bindparam, func, select
    from sqlalchemy.dialects.postgresql import ARRAY

    from dfmod.db import Item, ItemStatus

    with factory() as session:
        if session.get_bind().dialect.name == "postgresql":
            wanted = Item.id == any_(bindparam("ids", ids, type_=ARRAY(String)))
        else:
            wanted = Item.id.in_(ids)
        count, last = session.execute(
            select(func.count(), func.max(Item.updated_at)).where(
                wanted, Item.status.in_([ItemStatus.classified, ItemStatus.failed])
            )
        ).one()
    return count, last


def _analyze(factory) -> None:
    """ANALYZE the tables the workers query, as autovacuum would (Postgres only).

    A worker's connections cache generic plans of its statements. Planned while the tables were nearly
    empty (a fresh database, or statistics from before the bench's rows), an UPDATE by primary key
    became a sequential scan and stayed one: where autovacuum is off (this machine's Postgres), the
    database's CPU per image grew from 0.5 to 2.2 ms over one bench. ANALYZE invalidates those plans.
    """
    from sqlalchemy import text

    from dfmod.db import Item, Verdict, VerdictFace

    with factory() as session:
        if session.get_bind().dialect.name != "postgresql":
            return
        for model in (Item, Verdict, VerdictFace):
            session.execute(text(f"ANALYZE {model.__tablename__}"))
        session.commit()


def _drain(
    settings, factory, celery_app, storage, images: list[bytes], prefix: str, timeout: float,
    meter: CpuMeter | None = None, worker: _Process | None = None,
) -> float:
    """Put the images in storage, record and enqueue them at once; seconds until all have verdicts.

    With ``worker``, a worker that exits meanwhile ends the drain at once (instead of at ``timeout``)."""
    from concurrent.futures import ThreadPoolExecutor

    from dfmod.db import session_scope
    from dfmod.lifecycle import NewItem, record_items
    from dfmod.queue import enqueue

    keys = [f"{prefix}/{index:06d}.jpg" for index in range(len(images))]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda kv: storage.put(settings.upload_bucket, kv[0], kv[1], "image/jpeg"), zip(keys, images, strict=True)))
    with session_scope(factory) as session:
        recorded = record_items(session, [NewItem(bucket=settings.upload_bucket, key=key, source="bench") for key in keys])
    ids = [r.item.id for r in recorded]
    _analyze(factory)
    if meter:
        meter.start()
    started_wall, started = time.time(), time.perf_counter()
    enqueue(celery_app, settings, ids)
    deadline = started + timeout
    # The end is read from the items' own timestamps, so the poll can be slow: a poll costs CPU on the
    # same cores as the worker and the database, and would otherwise be part of what is measured.
    while (finished := _finished(factory, ids))[0] < len(ids):
        if time.perf_counter() > deadline:
            raise TimeoutError(f"{prefix}: only {finished[0]}/{len(ids)} finished in {timeout}s")
        if worker is not None and worker.process.poll() is not None:
            raise RuntimeError(
                f"{prefix}: the worker exited (code {worker.process.returncode}) with {finished[0]}/{len(ids)} "
                f"finished; its log: {worker.log}\n{worker.log.read_text(errors='replace')[-3000:]}"
            )
        time.sleep(0.5)
    if meter:
        meter.stop()
    return max(finished[1].timestamp() - started_wall, 1e-6)


def _latency(api_port: int, factory, images: list[bytes], rate: float, seconds: float, api_key: str) -> list[float]:
    """Open-loop uploads at ``rate``/s for ``seconds``; upload-to-verdict latency of each, in ms."""
    import httpx
    from sqlalchemy import select

    from dfmod.db import Item

    sent: dict[str, float] = {}
    lock = threading.Lock()
    errors: list[str] = []

    def upload(index: int) -> None:
        t0 = time.time()
        try:
            response = client.post("/v1/images", files={"file": (f"{index}.jpg", images[index % len(images)], "image/jpeg")})
            response.raise_for_status()
        except Exception as exc:  # noqa: BLE001
            errors.append(str(exc))
            return
        with lock:
            sent[response.json()["id"]] = t0

    total = max(1, int(rate * seconds))
    threads = []
    headers = {"Authorization": f"Bearer {api_key}"}
    with httpx.Client(base_url=f"http://127.0.0.1:{api_port}", timeout=30, headers=headers) as client:
        started = time.perf_counter()
        for index in range(total):
            # Open loop: send on schedule whether or not earlier requests have finished.
            delay = started + index / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            thread = threading.Thread(target=upload, args=(index,))
            thread.start()
            threads.append(thread)
        for thread in threads:
            thread.join()
    if errors:
        raise RuntimeError(f"{len(errors)} uploads failed, e.g. {errors[0]}")
    deadline = time.monotonic() + 120
    while _finished(factory, list(sent))[0] < len(sent) and time.monotonic() < deadline:
        time.sleep(0.25)
    with factory() as session:
        rows = session.execute(select(Item.id, Item.classified_at).where(Item.id.in_(list(sent)))).all()
    return sorted(
        (classified_at.timestamp() - sent[item_id]) * 1000.0 for item_id, classified_at in rows if classified_at
    )


def _bench_key(factory) -> str:
    """An ingest key for the latency phase, created directly in the bench's database."""
    from dfmod.db import session_scope
    from dfmod.keys import create_key

    with session_scope(factory) as session:
        return create_key(session, f"bench-{uuid.uuid4().hex[:8]}", ["ingest"]).plaintext


def _moto_storage(stack: ExitStack) -> dict:
    """Settings for a throw-away S3 bucket on a moto_server that lives as long as ``stack`` (create the bucket)."""
    endpoint = stack.enter_context(moto_server())
    return {
        "storage_url": f"s3://bench-{uuid.uuid4().hex[:6]}", "s3_endpoint_url": endpoint,
        "s3_access_key_id": "bench", "s3_secret_access_key": "bench",
    }


def run_bench(
    images: int, unbatched_images: int, latency_seconds: float, rate: float | None, model_seconds: float,
    images_from: Path | None, progress=print, log_dir: Path | None = None, repeats: int = 5,
    worker_cpus: set[int] | None = None,
) -> BenchResult:
    """The whole bench. ``worker_cpus``: pin the worker processes and the model-only phase to those CPUs and this
    process, moto_server and the API to the others (the database and broker are the operator's: not moved)."""
    from dfmod.db import make_engine, make_session_factory
    from dfmod.queue import make_celery
    from dfmod.settings import Settings
    from dfmod.storage import make_storage

    base = Settings()
    others = None
    if worker_cpus:
        if not hasattr(os, "sched_setaffinity"):
            raise typer.BadParameter("--worker-cpus needs Linux (sched_setaffinity)")
        available = os.sched_getaffinity(0)
        others = available - worker_cpus
        if not worker_cpus <= available or not others:
            raise typer.BadParameter(
                f"--worker-cpus must name some, not all, of this process's CPUs {sorted(available)}"
            )
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dfmod-bench-")))
        # This process and what it starts from here on (moto_server, the API) keep off the worker's CPUs.
        stack.enter_context(_pinned(others))
        if log_dir:
            # Registered first, so it runs last: after every process has stopped and flushed its log.
            stack.callback(lambda: [shutil.copy(log, log_dir) for log in workdir.glob("*.log")])
            log_dir.mkdir(parents=True, exist_ok=True)
        overrides: dict = {"data_dir": workdir, "metrics_port": None}
        if not base.database_url:
            overrides["database_url"] = f"sqlite:///{workdir}/bench.db"
        if not base.storage_is_s3:
            overrides.update(_moto_storage(stack))
        if base.broker_url:
            overrides["queue"] = f"dfmod-bench-{uuid.uuid4().hex[:6]}"  # never mix with a live queue
        settings = Settings(**{**base.model_dump(), **overrides})
        _ready_database(settings, throwaway=not base.database_url)
        storage = make_storage(settings)
        if overrides.get("storage_url"):
            storage.client.create_bucket(Bucket=settings.upload_bucket)
        factory = make_session_factory(make_engine(settings.resolved_database_url))
        celery_app = make_celery(settings)
        backends = {
            "database": settings.resolved_database_url.split(":", 1)[0],
            "broker": settings.resolved_broker_url.split(":", 1)[0],
            "storage": "s3 (moto_server)" if overrides.get("s3_endpoint_url") else "s3",
        }

        progress(f"model-only throughput at batch {settings.batch_size} ...")
        with _pinned(worker_cpus):  # the forward pass where the worker will run it
            model = _model_only(settings, settings.batch_size, model_seconds, progress)
        model_img_s, device, model_cpu_ms = model["img_s"], model["device"], model["cpu_ms"]
        if device == "cpu":
            # Every worker below serves what auto picked here (its trial timed on the worker's CPUs), so the
            # drains, the forward pass's CPU measured after them and `backend` are one and the same.
            backend_name, precision_name = model["backend"].split("-", 1)
            settings = settings.model_copy(update={"backend": backend_name, "precision": precision_name})
        torch_available = importlib.util.find_spec("torch") is not None and model["backend"] != "torch-fp32"

        # Every phase gets images no earlier phase or run has seen: identical bytes would take the
        # verdict-reuse path and skip the model, flattering the figures.
        latency_count = int((rate or 10.0) * latency_seconds) + 1
        sizes = {"warmup": 8, "warmup1": 4, "latency": latency_count}
        sizes |= {f"e2e{run}": images for run in range(repeats)}
        sizes |= {f"unbatched{run}": unbatched_images for run in range(repeats)}
        if torch_available:
            sizes |= {"warmupT": 8} | {f"e2eT{run}": images for run in range(repeats)}
        # The face stage (MTCNN before the classifier) is several times slower: a quarter of the images.
        face_images = max(8, images // 4)
        faces_available = importlib.util.find_spec("facenet_pytorch") is not None
        if faces_available:
            sizes |= {"warmupF": 8} | {f"e2eF{run}": face_images for run in range(repeats)}
        needed = sum(sizes.values())
        if images_from:
            pool = folder_jpegs(images_from, needed)
            if len(set(pool)) < needed:
                progress(f"warning: {images_from} holds fewer than {needed} distinct images; some will be reused")
        else:
            pool = synthetic_jpegs(needed, seed=uuid.uuid4().int % 2**32)
        phase, offset = {}, 0
        for name, count in sizes.items():
            phase[name], offset = pool[offset : offset + count], offset + count
        env = {**os.environ, **_env_for(settings)}
        cli = [sys.executable, "-m", "dfmod"]

        def start_worker(log_name: str, extra_env: dict | None = None) -> _Process:
            return _Process([*cli, "worker", "--log-level", "info"], {**env, **(extra_env or {})}, workdir / log_name,
                            ready=b"ready.", cpus=worker_cpus)

        # The torch worker drains its own queue, its drains alternating with the default worker's: a shared
        # VM's speed drifts by a third within minutes, and the ratio of the two is what the bench is for.
        torch_settings = settings.model_copy(update={"queue": f"{settings.queue}-torch"})
        torch_env = {"DFMOD_BACKEND": "torch", "DFMOD_PRECISION": "auto", "DFMOD_QUEUE": torch_settings.queue,
                     "DFMOD_METRICS_PORT": str(free_port())}
        progress(
            f"end-to-end: {repeats} x {images} images through a batched worker"
            + (", each drain followed by one through a torch worker ..." if torch_available else " ...")
        )
        worker = start_worker("worker.log")
        try:
            _drain(settings, factory, celery_app, storage, phase["warmup"], "warmup", 120, worker=worker)
            meter = CpuMeter({os.getpid(): "bench", worker.process.pid: "worker"})
            e2e_runs, e2e_torch_runs = [], []
            torch_worker = None
            try:
                if torch_available:
                    torch_worker = start_worker("workerT.log", torch_env)
                    _drain(torch_settings, factory, celery_app, storage, phase["warmupT"], "warmupT", 120, worker=torch_worker)
                for run in range(repeats):
                    seconds = _drain(settings, factory, celery_app, storage, phase[f"e2e{run}"], f"e2e{run}", 600, meter, worker)
                    e2e_runs.append(images / seconds)
                    if torch_worker:
                        seconds = _drain(torch_settings, factory, celery_app, storage, phase[f"e2eT{run}"], f"e2eT{run}",
                                         600, worker=torch_worker)
                        e2e_torch_runs.append(images / seconds)
            finally:
                if torch_worker:
                    torch_worker.stop()
            e2e_cpu_ms = meter.per_image(images * repeats)
            e2e_img_s = statistics.median(e2e_runs)
            with _pinned(worker_cpus):  # the forward pass again, at the speed the drains just ran at
                after = _throughput(_default_predictor(settings), settings.batch_size, max(1.0, model_seconds / 2))[1]
                model_cpu_runs = [model_cpu_ms, after]
            model_cpu_ms = statistics.mean(model_cpu_runs)

            progress(f"latency: uploads through the API at a fixed rate for {latency_seconds:.0f}s ...")
            # A quarter of the drain rate (at most 10/s): the API shares the cores with the worker and S3 here.
            offered = rate or max(1.0, min(10.0, round(0.25 * e2e_img_s, 1)))
            api_port = free_port()
            api = _Process([*cli, "api", "--port", str(api_port), "--log-level", "warning"], env, workdir / "api.log", port=api_port)
            try:
                latencies = _latency(api_port, factory, phase["latency"], offered, latency_seconds, _bench_key(factory))
            finally:
                api.stop()
        finally:
            worker.stop()

        def drains_with_worker(tag: str, runs: str, extra_env: dict, per_run: int, warmup_s: float) -> list[float]:
            """A worker with ``extra_env`` (log ``worker<tag>.log``), warmed on ``warmup<tag>``, drains ``runs``."""
            worker = start_worker(f"worker{tag}.log", extra_env)
            try:
                _drain(settings, factory, celery_app, storage, phase[f"warmup{tag}"], f"warmup{tag}", warmup_s, worker=worker)
                return [
                    per_run / _drain(settings, factory, celery_app, storage, phase[f"{runs}{run}"], f"{runs}{run}", 600,
                                     worker=worker)
                    for run in range(repeats)
                ]
            finally:
                worker.stop()

        e2e_faces = None
        if faces_available:
            progress(f"end-to-end with the face stage: {repeats} x {face_images} images ...")
            e2e_faces = statistics.median(drains_with_worker("F", "e2eF", {"DFMOD_FACE_STAGE": "true"}, face_images, 300))

        progress(f"unbatched: {repeats} x {unbatched_images} images, one task = one forward pass ...")
        unbatched_runs = drains_with_worker(
            "1", "unbatched", {"DFMOD_BATCH_SIZE": "1", "DFMOD_BATCH_WAIT_MS": "0"}, unbatched_images, 120
        )

    def percentile(values: list[float], q: float) -> float:
        if not values:
            return float("nan")
        return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]

    return BenchResult(
        model_only_img_s=round(model_img_s, 2), end_to_end_img_s=round(e2e_img_s, 2),
        unbatched_img_s=round(statistics.median(unbatched_runs), 2), p50_ms=round(percentile(latencies, 50), 1),
        p99_ms=round(percentile(latencies, 99), 1), batch_size=settings.batch_size, device=device, images=images,
        unbatched_images=unbatched_images, latency_rate_img_s=offered, latency_samples=len(latencies), backends=backends,
        model_cpu_ms=round(model_cpu_ms, 2), model_cpu_ms_runs=[round(x, 2) for x in model_cpu_runs],
        end_to_end_cpu_ms=e2e_cpu_ms, repeats=repeats,
        end_to_end_runs_img_s=[round(x, 2) for x in e2e_runs], unbatched_runs_img_s=[round(x, 2) for x in unbatched_runs],
        backend=model["backend"], backend_reason=model["reason"],
        model_only_by_backend={k: round(v, 2) for k, v in model["by_backend"].items()},
        model_only_batch1_by_backend={k: round(v, 2) for k, v in model["batch1_by_backend"].items()},
        model_only_runs_by_backend={k: [round(x, 2) for x in v] for k, v in model["runs_by_backend"].items()},
        end_to_end_torch_img_s=round(statistics.median(e2e_torch_runs), 2) if e2e_torch_runs else None,
        end_to_end_torch_runs_img_s=[round(x, 2) for x in e2e_torch_runs],
        end_to_end_faces_img_s=round(e2e_faces, 2) if e2e_faces else None, face_stage_images=face_images,
        worker_non_model_cpu_ms=round(e2e_cpu_ms["worker"] - model_cpu_ms, 2) if "worker" in e2e_cpu_ms else None,
        worker_cpus=sorted(worker_cpus) if worker_cpus else None,
    )


def _ready_database(settings, throwaway: bool) -> None:
    """Migrate the bench's own throw-away SQLite; a configured database is the operator's: the bench never
    migrates it, it stops and says what to run instead."""
    from dfmod import migrate

    if throwaway:
        migrate.upgrade(settings)
        return
    revision = migrate.current_revision(settings.resolved_database_url)
    state = migrate.schema_state(revision)
    if state is not migrate.SchemaState.current:
        what = "was migrated by a newer release" if state is migrate.SchemaState.ahead else "run `dfmod migrate` first"
        typer.echo(
            f"dfmod bench: the database in DFMOD_DATABASE_URL is at revision {revision or '(none: not migrated)'}, "
            f"this code's schema is {migrate.head_revision()}: {what}",
            err=True,
        )
        raise typer.Exit(2)


def _env_for(settings) -> dict[str, str]:
    """The settings as DFMOD_* variables, so child processes see exactly what the bench uses."""
    env = {}
    for name, value in settings.model_dump().items():
        if value is None or name == "allowed_buckets":
            continue
        if hasattr(value, "get_secret_value"):
            value = value.get_secret_value()
        env[f"DFMOD_{name.upper()}"] = str(value)
    env["DFMOD_METRICS_PORT"] = str(free_port())
    # On the operator's database, a sweep would re-enqueue its stuck items (other benches', a live system's)
    # onto the bench's queue: extra work inside the measured drains, and those items left on a dead queue.
    env["DFMOD_SWEEP_INTERVAL_S"] = "0"
    return env


@dataclass
class WorkerOnlyResult:
    images: int
    batch_size: int
    backend: str
    device: str
    img_s: float
    cpu_ms_per_image: float
    model_cpu_ms_per_image: float
    non_model_cpu_ms_per_image: float
    phases_ms_per_image: dict


def run_worker_only(
    images: int, images_from: Path | None, profile: Path | None = None, progress=print, services: bool = False,
) -> WorkerOnlyResult:
    """Drive the BatchClassifier in this process: the worker's data path alone, without Celery.

    By default from local storage and SQLite. With ``services`` the items live where a deployment keeps
    them: the configured database (``DFMOD_DATABASE_URL``, e.g. Postgres) and S3 (the configured endpoint, else
    a ``moto_server`` started here), so the S3 client's and the database driver's CPU are in the figure and
    in the profile, and only the broker is left out.
    """
    import cProfile
    from concurrent.futures import ThreadPoolExecutor

    from dfmod.db import make_engine, make_session_factory, session_scope
    from dfmod.lifecycle import NewItem, record_items
    from dfmod.settings import Settings
    from dfmod.storage import make_storage
    from worker.classify import BatchClassifier

    base = Settings()
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dfmod-bench-worker-")))
        overrides: dict = {
            "data_dir": workdir, "database_url": f"sqlite:///{workdir}/bench.db", "storage_url": str(workdir / "objects"),
            "metrics_port": None, "callback_url": None, "callback_urls": {},
        }
        if services:
            if base.database_url:
                del overrides["database_url"]
            if base.storage_is_s3:
                del overrides["storage_url"]
            else:
                overrides.update(_moto_storage(stack))
        settings = Settings(**{**base.model_dump(), **overrides})
        _ready_database(settings, throwaway="database_url" in overrides)
        storage = make_storage(settings)
        if services and not base.storage_is_s3:
            storage.client.create_bucket(Bucket=settings.upload_bucket)
        factory = make_session_factory(make_engine(settings.resolved_database_url))
        # Fresh bytes each run: a shared database may hold verdicts of earlier runs' images (reuse skips the model).
        seed = uuid.uuid4().int % 2**32 if services else 1
        pool = folder_jpegs(images_from, images + 64) if images_from else synthetic_jpegs(images + 64, seed=seed)
        prefix = f"w{uuid.uuid4().hex[:8]}"
        keys = [f"{prefix}/{index:06d}.jpg" for index in range(len(pool))]
        for key, data in zip(keys, pool, strict=True):
            storage.put(settings.upload_bucket, key, data, "image/jpeg")
        with session_scope(factory) as session:
            ids = [r.item.id for r in record_items(session, [NewItem(settings.upload_bucket, key) for key in keys])]
        predictor = _default_predictor(settings)
        model_img_s, model_cpu_ms = _throughput(predictor, settings.batch_size, 3.0)
        classifier = BatchClassifier(settings, factory, storage, predictor)
        size = settings.batch_size
        try:
            for start in range(0, 64, size):  # warm-up: first batches pay for lazy initialisation
                classifier.run(ids[start : start + size])
            _analyze(factory)  # after the warm-up cached its plans, as in the full bench's drains
            timed = ids[64:]
            progress(f"worker-only: {len(timed)} images through the BatchClassifier at batch {size} ({predictor.backend}) ...")
            profiler = cProfile.Profile() if profile else None
            phases = {"claim": 0.0, "fetch_decode": 0.0, "inference": 0.0, "persist": 0.0}
            started, cpu_started = time.perf_counter(), time.process_time()
            if profiler:
                profiler.enable()
            # As many batches at once as the worker's pool runs (the threads pool's concurrency).
            with ThreadPoolExecutor(settings.batch_slots) as batches:
                reports = list(batches.map(classifier.run, [timed[i : i + size] for i in range(0, len(timed), size)]))
            for report in reports:
                phases["claim"] += report.claim_s
                phases["fetch_decode"] += report.fetch_s
                phases["inference"] += report.inference_s
                phases["persist"] += report.persist_s
            if profiler:
                profiler.disable()
                profiler.dump_stats(str(profile))
            wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
        finally:
            classifier.close()
    cpu_ms = 1000.0 * cpu / len(timed)
    return WorkerOnlyResult(
        images=len(timed), batch_size=size, backend=predictor.backend, device=predictor.device,
        img_s=round(len(timed) / wall, 2), cpu_ms_per_image=round(cpu_ms, 2),
        model_cpu_ms_per_image=round(model_cpu_ms, 2), non_model_cpu_ms_per_image=round(cpu_ms - model_cpu_ms, 2),
        phases_ms_per_image={k: round(1000.0 * v / len(timed), 3) for k, v in phases.items()},
    )


def bench_command(
    images: int = typer.Option(1024, help="Images for the end-to-end run."),
    unbatched_images: int = typer.Option(128, help="Images for the unbatched run."),
    latency_seconds: float = typer.Option(20.0, help="Duration of the fixed-rate latency run."),
    rate: float | None = typer.Option(None, help="Offered uploads/s for the latency run (default: a quarter of the end-to-end throughput, at most 10)."),
    model_seconds: float = typer.Option(8.0, help="Duration of the model-only run."),
    images_from: Path | None = typer.Option(None, help="Use the images under this folder instead of synthetic JPEGs."),
    repeats: int = typer.Option(
        5, min=1,
        help="Drains per throughput phase; the median is reported (on a shared VM a drain can run at half speed "
        "when a neighbour is busy: one of three drains in a bench of 2026-12-03 did).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
    log_dir: Path | None = typer.Option(None, help="Keep the worker and API logs (per-batch timings) here."),
    worker_only: bool = typer.Option(
        False, "--worker-only",
        help="Only drive the BatchClassifier in-process from local storage and SQLite (no broker, no S3 server).",
    ),
    profile: Path | None = typer.Option(None, help="With --worker-only: write cProfile stats of the timed run here."),
    services: bool = typer.Option(
        False, "--services",
        help="With --worker-only: the configured database and S3 (else a moto_server started here) instead of SQLite and a folder.",
    ),
    worker_cpus: str | None = typer.Option(
        None, help="Pin the worker processes and the model-only phase to these CPUs (e.g. 0 or 0-3) and the bench, "
        "moto_server and the API to the others, so the S3 server does not share the worker's cores (Linux).",
    ),
) -> None:
    """Measure model-only, end-to-end, unbatched throughput and upload-to-verdict latency on this machine."""
    # A SIGTERM (a CI job's timeout, `kill`) unwinds as an exception does: the workers, the S3 server and the
    # API stop in order and the bench's temporary folder goes, instead of staying behind with its database
    # and objects.
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    say = (lambda message: print(message, file=sys.stderr)) if as_json else print
    if worker_only:
        outcome = run_worker_only(images, images_from, profile, progress=say, services=services)
        if as_json:
            print(json.dumps(outcome.__dict__, sort_keys=True))
        else:
            for key, value in outcome.__dict__.items():
                print(f"{key:28} {value}")
        return
    result = run_bench(
        images, unbatched_images, latency_seconds, rate, model_seconds, images_from, progress=say, log_dir=log_dir,
        repeats=repeats, worker_cpus=parse_cpu_list(worker_cpus) if worker_cpus else None,
    )
    if as_json:
        print(json.dumps(result.__dict__, sort_keys=True))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"dfmod bench — {result.device}, batch {result.batch_size}, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC")
    table.add_column("measurement")
    table.add_column("value", justify="right")
    table.add_column("notes")
    ratio = result.end_to_end_img_s / result.model_only_img_s if result.model_only_img_s else float("nan")
    speedup = result.end_to_end_img_s / result.unbatched_img_s if result.unbatched_img_s else float("nan")
    table.add_row(
        "model-only", f"{result.model_only_img_s:.1f} img/s",
        f"default backend {result.backend}: resized uint8 images, normalise + forward pass",
    )
    torch_by = result.model_only_by_backend.get("torch-fp32")
    for name, img_s in sorted(result.model_only_by_backend.items(), key=lambda kv: -kv[1]):
        batch1 = result.model_only_batch1_by_backend.get(name)
        versus = f", {img_s / torch_by:.2f}x torch" if torch_by else ""
        table.add_row(
            f"  model-only {name}", f"{img_s:.1f} img/s",
            (f"batch 1: {batch1:.1f} img/s" if batch1 else "") + versus + (" (default)" if name == result.backend else ""),
        )
    if result.worker_cpus:
        table.add_row("worker pinned to CPUs", ",".join(map(str, result.worker_cpus)),
                      "--worker-cpus: the bench, moto_server and the API on the others; database and broker not moved")
    def spread(runs: list) -> str:
        return f"median of {len(runs)}: {min(runs):.0f}-{max(runs):.0f}" if len(runs) > 1 else "one run"

    table.add_row(
        "end-to-end (batched)", f"{result.end_to_end_img_s:.1f} img/s",
        f"{result.images} images, {spread(result.end_to_end_runs_img_s)}; {ratio:.0%} of model-only",
    )
    if result.end_to_end_torch_img_s:
        table.add_row(
            "end-to-end (torch backend)", f"{result.end_to_end_torch_img_s:.1f} img/s",
            f"DFMOD_BACKEND=torch, {spread(result.end_to_end_torch_runs_img_s)}, each drained after the default's run; "
            f"default is {result.end_to_end_img_s / result.end_to_end_torch_img_s:.2f}x (run by run: "
            + ", ".join(f"{a / b:.2f}" for a, b in zip(result.end_to_end_runs_img_s, result.end_to_end_torch_runs_img_s,
                                                      strict=False))
            + ")",
        )
    if result.end_to_end_faces_img_s:
        table.add_row(
            "end-to-end (face stage)", f"{result.end_to_end_faces_img_s:.1f} img/s",
            f"DFMOD_FACE_STAGE=true, {result.face_stage_images} images a drain: MTCNN, then each face classified; "
            f"{result.end_to_end_img_s / result.end_to_end_faces_img_s:.1f}x slower than without",
        )
    table.add_row(
        "end-to-end (unbatched)", f"{result.unbatched_img_s:.1f} img/s",
        f"{result.unbatched_images} images, {spread(result.unbatched_runs_img_s)}; batched is {speedup:.1f}x",
    )
    table.add_row("upload→verdict p50", f"{result.p50_ms:.0f} ms", f"{result.latency_samples} uploads at {result.latency_rate_img_s} img/s")
    table.add_row("upload→verdict p99", f"{result.p99_ms:.0f} ms", "")
    cpu_total = sum(result.end_to_end_cpu_ms.values())
    table.add_row(
        "CPU per image, model-only", f"{result.model_cpu_ms:.2f} ms",
        "the forward pass alone, all its threads; mean of before and after the end-to-end drains "
        f"({' / '.join(f'{x:.2f}' for x in result.model_cpu_ms_runs)})",
    )
    table.add_row(
        "CPU per image, end-to-end", f"{cpu_total:.2f} ms",
        ", ".join(f"{role} {ms:.2f}" for role, ms in result.end_to_end_cpu_ms.items()),
    )
    if result.worker_non_model_cpu_ms is not None:
        table.add_row(
            "worker CPU per image, not model", f"{result.worker_non_model_cpu_ms:.2f} ms",
            "worker CPU minus the forward pass: fetch, hash, decode, resize, Celery, SQL",
        )
    table.add_row("backends", ", ".join(f"{k}={v}" for k, v in result.backends.items()), result.backend_reason[:120])
    Console(width=max(Console().width, 120)).print(table)
