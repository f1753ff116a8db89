"""Worker liveness on a real worker (Redis, Postgres, S3 server): ``dfmod worker-alive`` passes while the
worker is busy in a long batch, fails within its threshold once the consuming loop is frozen (SIGSTOP), and
beats again after the broker connection was cut and restored; and the in-flight figure the ops guide gives KEDA users (``batch_size x concurrency`` messages per worker
leave the Redis list) measured against the same real worker."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient

from dfmod.db import make_engine, make_session_factory, session_scope
from dfmod.lifecycle import NewItem, enqueue_items, record_items
from dfmod.queue import make_celery
from dfmod.queue_depth import UNACKED_KEY
from tests.utils.images import make_image_bytes
from tests.utils.processes import REPO_ROOT, WorkerProcess
from worker.liveness import BATCH_PREFIX, check

pytestmark = pytest.mark.integration

SLOW_WORKER = Path(__file__).with_name("slow_batch_worker.py")


class SlowBatchWorker(WorkerProcess):
    """A real worker process whose batches each last ``DFMOD_TEST_SLOW_BATCH_S`` seconds longer."""

    def __init__(self, env: dict, log_path: Path) -> None:
        super().__init__({**env, "PYTHONPATH": str(REPO_ROOT)}, log_path)

    def command(self) -> list[str]:
        return [sys.executable, str(SLOW_WORKER), "--hostname", f"slow-{uuid.uuid4().hex[:6]}@%h"]


@pytest.fixture
def slow_worker(integration_env, tmp_path):
    started: list[SlowBatchWorker] = []

    def start(**overrides) -> SlowBatchWorker:
        env = {**integration_env, **{key: str(value) for key, value in overrides.items()}}
        worker = SlowBatchWorker(env, tmp_path / f"slow-worker-{len(started)}.log")
        started.append(worker)
        return worker.start()

    yield start
    for worker in started:
        if worker.process and worker.process.poll() is None:
            worker.process.send_signal(signal.SIGCONT)  # a stopped process ignores SIGKILL until continued
        worker.stop(sig=signal.SIGKILL)


def _seed(settings, s3_buckets, count: int) -> list[str]:
    client, (bucket, _extra) = s3_buckets
    for index in range(count):
        client.put_object(Bucket=bucket, Key=f"alive/{index}.jpg", Body=make_image_bytes(color=(index * 9 % 256, 20, 90)))
    factory = make_session_factory(make_engine(settings.resolved_database_url, pool_size=1))
    with session_scope(factory) as session:
        recorded = record_items(session, [NewItem(bucket=bucket, key=f"alive/{i}.jpg") for i in range(count)])
    ids = [r.item.id for r in recorded]
    assert enqueue_items(factory, make_celery(settings), settings, ids)
    return ids


def _worker_alive(env: dict, max_age: float) -> subprocess.CompletedProcess:
    """The chart's exec probe, as Kubernetes runs it: a fresh process in the worker's environment."""
    return subprocess.run(
        [sys.executable, "-m", "dfmod", "worker-alive", "--max-age", str(max_age)],
        env={**os.environ, **env}, capture_output=True, text=True, timeout=60, cwd=REPO_ROOT,
    )


def _wait_for(predicate, timeout: float, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()


def test_busy_worker_passes_and_frozen_worker_fails_within_the_threshold(
    integration_env, integration_settings, s3_buckets, slow_worker, tmp_path
):
    heartbeat = tmp_path / "heartbeat"
    batch_s, max_age = 4.0, 8.0  # the threshold is above the longest batch, as the chart's default is
    env = {"DFMOD_HEARTBEAT_DIR": str(heartbeat), "DFMOD_HEARTBEAT_INTERVAL_S": "0.5"}
    worker = slow_worker(**env, DFMOD_TEST_SLOW_BATCH_S=batch_s, DFMOD_BATCH_SIZE=4, DFMOD_BATCH_WAIT_MS=100)
    probe_env = {**integration_env, **env}
    assert _wait_for(lambda: check(heartbeat, max_age).alive, 10), check(heartbeat, max_age)
    assert _worker_alive(probe_env, max_age).returncode == 0

    # Busy: a solo worker runs its batch on the consuming loop, so the loop is silent for the whole batch.
    _seed(integration_settings, s3_buckets, 4)
    assert _wait_for(lambda: list(heartbeat.glob(f"{BATCH_PREFIX}*")), 30), worker.log()
    verdicts = []
    while list(heartbeat.glob(f"{BATCH_PREFIX}*")):
        verdicts.append(check(heartbeat, max_age))
        time.sleep(0.25)
    assert len(verdicts) >= 8, verdicts  # watched for most of the 4 s batch
    assert all(v.alive for v in verdicts), [v.reason for v in verdicts if not v.alive]
    assert _worker_alive(probe_env, max_age).returncode == 0

    # Frozen: SIGSTOP the whole worker (loop, pool, every thread). The check must fail within max_age.
    frozen_at = time.monotonic()
    worker.process.send_signal(signal.SIGSTOP)
    try:
        failed = _wait_for(lambda: not check(heartbeat, max_age).alive, max_age + 5, 0.1)
        detected_after = time.monotonic() - frozen_at
        probe = _worker_alive(probe_env, max_age)
    finally:
        worker.process.send_signal(signal.SIGCONT)
    assert failed, check(heartbeat, max_age)
    # Stale beat: the last beat came at most one interval before the freeze, so it is caught by max_age.
    assert detected_after <= max_age + 1.0, detected_after
    assert probe.returncode == 1 and "silent" in probe.stderr, probe
    print(f"\nfrozen worker detected after {detected_after:.1f} s (max-age {max_age:g} s, beat every 0.5 s)")

    # Thawed: the loop's timer beats again; the probe passes without a restart.
    assert _wait_for(lambda: check(heartbeat, max_age).alive, 10), check(heartbeat, max_age)


@pytest.mark.parametrize("pool,concurrency", [("solo", 1), ("threads", 2)])
def test_messages_a_worker_hides_from_the_queue_are_batch_size_times_concurrency(
    integration_settings, s3_buckets, slow_worker, make_api_key, pool, concurrency
):
    batch_size = 4
    ids = _seed(integration_settings, s3_buckets, 6 * batch_size)  # a backlog before the worker starts
    client = redis.Redis.from_url(integration_settings.broker_url)
    queue = integration_settings.queue
    assert client.llen(queue) == len(ids)

    # Batches last 60 s and a partial batch waits 20 s: the worker stops fetching only at its prefetch limit.
    slow_worker(DFMOD_TEST_SLOW_BATCH_S=60, DFMOD_BATCH_SIZE=batch_size, DFMOD_BATCH_WAIT_MS=20000,
                DFMOD_WORKER_POOL=pool, DFMOD_WORKER_CONCURRENCY=concurrency)
    expected_hidden = batch_size * concurrency  # what docs/operations.md and the chart README say

    def settled():
        hidden = client.hlen(UNACKED_KEY)
        return hidden if hidden >= expected_hidden else 0

    assert _wait_for(settled, 30)
    time.sleep(2.0)  # would a worker that over-fetches take more? give it time to try
    waiting, hidden = client.llen(queue), client.hlen(UNACKED_KEY)
    print(f"\n{pool} x{concurrency}, batch {batch_size}: {hidden} in flight (unacked), {waiting} waiting (LLEN)")
    assert hidden == expected_hidden
    assert waiting == len(ids) - expected_hidden

    # The API's /metrics exports both, for a KEDA prometheus trigger that counts what LLEN hides.
    from api.main import create_app

    with TestClient(create_app(integration_settings)) as api:
        text = api.get("/metrics").text
    assert f'dfmod_queue_depth{{queue="{queue}",state="waiting"}} {float(waiting)}' in text
    assert f'dfmod_queue_depth{{queue="{queue}",state="in_flight"}} {float(hidden)}' in text


class _CuttableProxy:
    """A TCP proxy to Redis whose link can be cut (every connection closed, new ones refused) and restored:
    a broker outage for one worker, without touching the Redis other tests share."""

    def __init__(self, target_port: int) -> None:
        import socket
        import threading

        self.target_port = target_port
        self.down = threading.Event()
        self.sockets: list = []
        self.lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket
        import threading

        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.down.is_set():
                client.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            with self.lock:
                self.sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source, sink) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.close()
                except OSError:
                    pass

    def cut(self) -> None:
        import socket

        self.down.set()
        with self.lock:
            for sock in self.sockets:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                    sock.close()
                except OSError:
                    pass
            self.sockets.clear()

    def restore(self) -> None:
        self.down.clear()

    def close(self) -> None:
        self.cut()
        self.listener.close()


def test_heartbeat_comes_back_after_the_broker_connection_is_lost(integration_env, worker_factory, tmp_path):
    """Celery clears its event-loop timers when the broker connection drops (issue 15); the heartbeat step is
    started again with the consumer, so a reconnected worker is alive again without a restart."""
    from urllib.parse import urlparse

    broker = urlparse(integration_env["DFMOD_BROKER_URL"])
    proxy = _CuttableProxy(broker.port or 6379)
    heartbeat = tmp_path / "heartbeat-reconnect"
    max_age = 4.0
    try:
        worker = worker_factory(
            DFMOD_BROKER_URL=f"redis://127.0.0.1:{proxy.port}{broker.path}",
            DFMOD_HEARTBEAT_DIR=heartbeat, DFMOD_HEARTBEAT_INTERVAL_S=0.5,
        )
        assert _wait_for(lambda: check(heartbeat, max_age).alive, 15), worker.log()
        proxy.cut()
        assert _wait_for(lambda: not check(heartbeat, max_age).alive, max_age + 10), worker.log()
        proxy.restore()
        came_back = _wait_for(lambda: check(heartbeat, max_age).alive, 60, 0.5)
        assert came_back, (check(heartbeat, max_age), worker.log())
        # and it stays alive: beats keep coming from the re-armed timer, not a one-off
        time.sleep(max_age + 1)
        assert check(heartbeat, max_age).alive, worker.log()
    finally:
        proxy.close()
