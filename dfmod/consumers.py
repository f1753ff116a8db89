"""Which queues have a live consumer: worker heartbeats kept in the broker, read by the API's readiness.

Each worker refreshes one short-lived record per queue it consumes: a Redis key with a TTL, or, with the
embedded filesystem broker, a file under the broker's folder whose age is checked. Kept in the broker
(not in a worker's local file) so an API on another machine can tell whether anyone is consuming.

This answers "is a worker there?"; whether a worker's consuming loop is wedged is the liveness probe's job.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from dfmod.settings import Settings

logger = logging.getLogger(__name__)

HEARTBEAT_EVERY_S = 5.0
HEARTBEAT_TTL_S = 20


def _redis(settings: Settings):
    import redis

    return redis.Redis.from_url(settings.resolved_broker_url, socket_timeout=2, socket_connect_timeout=2)


def _folder(settings: Settings) -> Path:
    return settings.broker_folder / "consumers"


def beat(settings: Settings, hostname: str, queues: list[str]) -> None:
    """Record that ``hostname`` consumes ``queues`` now (valid for :data:`HEARTBEAT_TTL_S`)."""
    if settings.broker_is_embedded:
        folder = _folder(settings)
        folder.mkdir(parents=True, exist_ok=True)
        for queue in queues:
            (folder / f"{queue}@{hostname}".replace("/", "_")).touch()
        return
    client = _redis(settings)
    try:
        with client.pipeline() as pipe:
            for queue in queues:
                pipe.set(f"dfmod:consumer:{queue}:{hostname}", str(time.time()), ex=HEARTBEAT_TTL_S)
            pipe.execute()
    finally:
        client.close()


def live_consumers(settings: Settings, queue: str) -> int:
    """How many workers said within the last :data:`HEARTBEAT_TTL_S` seconds that they consume ``queue``."""
    if settings.broker_is_embedded:
        folder = _folder(settings)
        if not folder.is_dir():
            return 0
        now = time.time()
        return sum(1 for path in folder.glob(f"{queue}@*") if now - path.stat().st_mtime < HEARTBEAT_TTL_S)
    client = _redis(settings)
    try:
        return sum(1 for _ in client.scan_iter(match=f"dfmod:consumer:{queue}:*", count=100))
    finally:
        client.close()


def start_heartbeat(settings: Settings, hostname: str, queues: list[str], stop: threading.Event) -> threading.Thread:
    def loop() -> None:
        while True:
            try:
                beat(settings, hostname, queues)
            except Exception:
                logger.debug("consumer heartbeat failed", exc_info=True)
            if stop.wait(HEARTBEAT_EVERY_S):
                return

    thread = threading.Thread(target=loop, name="dfmod-consumer-heartbeat", daemon=True)
    thread.start()
    return thread
