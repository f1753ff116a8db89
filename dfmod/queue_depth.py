"""How much classification work the broker holds, waiting *and* in flight: the signal to autoscale on.

Celery's Redis transport keeps a queue as a Redis list, and a message a worker has fetched leaves that list
for the ``unacked`` hash until the worker acknowledges it (after its batch is stored: ``acks_late``). Each
worker holds up to ``worker_prefetch_multiplier x concurrency`` = ``batch_size x concurrency`` messages that
way (:func:`dfmod.queue.make_celery`), so ``LLEN`` alone under-counts by that much per replica: a GPU replica
at batch 256 with two batches in flight hides 512. :class:`QueueDepthCollector` exports both parts as

    dfmod_queue_depth{queue="Q", state="waiting"}    LLEN Q
    dfmod_queue_depth{queue="Q", state="in_flight"}  HLEN unacked

The in-flight part counts every queue of the broker database (Redis keeps one ``unacked`` hash per database,
and telling queues apart would mean reading every message); the events queue's share is normally a handful.
Read at scrape time from the API's ``/metrics``: two O(1) Redis commands.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from dfmod.settings import Settings

logger = logging.getLogger(__name__)

#: kombu's Redis transport: the hash of fetched-but-unacknowledged messages (``Channel.unacked_key``).
UNACKED_KEY = "unacked"


def read_queue_depth(client, queue: str) -> dict[str, int]:
    """``{"waiting": LLEN queue, "in_flight": HLEN unacked}`` from a redis-py client of the broker database."""
    with client.pipeline(transaction=False) as pipe:
        pipe.llen(queue)
        pipe.hlen(UNACKED_KEY)
        waiting, in_flight = pipe.execute()
    return {"waiting": int(waiting), "in_flight": int(in_flight)}


class QueueDepthCollector(Collector):
    """Prometheus collector of :func:`read_queue_depth` for the classify queue; silent if Redis is not the
    broker (the embedded broker runs one local worker and needs no autoscaling) or is unreachable."""

    def __init__(self, settings: Settings) -> None:
        self.queue = settings.queue
        self._client = None
        if not settings.broker_is_embedded:
            import redis

            self._client = redis.Redis.from_url(
                settings.resolved_broker_url, socket_timeout=2, socket_connect_timeout=2
            )

    def collect(self) -> Iterator[GaugeMetricFamily]:
        if self._client is None:
            return
        try:
            depth = read_queue_depth(self._client, self.queue)
        except Exception:  # a scrape must not fail because the broker is down; readyz says so
            logger.debug("queue depth unavailable", exc_info=True)
            return
        family = GaugeMetricFamily(
            "dfmod_queue_depth",
            "Classify messages in the broker: waiting in the queue, or fetched by a worker and not yet acknowledged.",
            labels=["queue", "state"],
        )
        for state, value in depth.items():
            family.add_metric([self.queue, state], value)
        yield family

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
