"""kombu's Redis transport with two per-message costs taken out of the worker's hot path.

Celery's Redis broker is kombu's Redis transport, whose acknowledgement emulation keeps every delivered
message in an "unacked" hash and sorted set until it is acknowledged. Measured on one 2-core machine
against a local Redis (``kombu`` 5.7, ``redis`` 7.4), per message: receiving cost 0.40 ms of CPU and
acknowledging 0.20 ms, of which

* each bookkeeping step (register on delivery, remove on ack, and each publish) built a new ``redis.Redis``
  client on the channel's pool (0.065 ms each: redis-py rebuilds its response-callback table per client);
  :class:`Channel` keeps one per connection pool instead (redis-py clients on a pool are thread-safe: each
  command checks a connection out and back);
* each acknowledgement was its own MULTI/EXEC round trip; inside :func:`batched_acks` the acks a thread
  makes are deferred and sent as one ZREM and one HDEL over the whole batch (0.01 ms per message). Celery
  (5.6) does not ack where the batch ends, though: each task's ack is a promise that the consumer runs on
  its event loop later (``call_soon``), outside any such block. So on a worker's event loop every ack is
  coalesced instead: the acks of one pass of the loop go to Redis together, in one round trip, before the
  loop polls again (:meth:`QoS.ack`); before, a batch of 32 cost 32 round trips on the loop's thread;
* each message was its own ``BRPOP`` and then its own MULTI/EXEC to register it as unacknowledged. On
  Redis 7 (or Valkey) :class:`Channel` pops up to the free prefetch slots (a batch) with one ``BLMPOP ...
  COUNT n`` and registers them all in one MULTI/EXEC before delivering any, so a message is never handed to
  Celery before Redis knows it is unacknowledged, exactly as with kombu's ``BRPOP``. A message that was
  popped but not yet delivered when a delivery raised is put back on its queue at once.

Everything else (visibility timeout, restore of unacknowledged messages, key prefixes, TLS) is kombu's.
:func:`install` points the ``redis://`` and ``rediss://`` schemes at :class:`Transport`, so Celery's URL
handling, ``rediss`` defaults included, is unchanged.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from queue import Empty
from time import monotonic, time

import kombu.transport
from kombu.transport import redis as kombu_redis
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads

logger = logging.getLogger(__name__)

_deferred = threading.local()
#: Most messages one BLMPOP takes when the prefetch count is unlimited.
MAX_MULTI_POP = 64


@contextmanager
def batched_acks() -> Iterator[None]:
    """Acknowledgements this thread makes inside the block reach Redis at its end, one round trip per channel.

    A message counts as acknowledged for kombu (its prefetch slot freed) once Redis has it. If the round
    trip fails, the error is raised here and the messages stay in Redis's unacked set, from which kombu
    restores them after the visibility timeout: a redelivered finished item is a no-op.
    """
    pending: list[tuple[QoS, str]] = []
    outer = getattr(_deferred, "acks", None)
    _deferred.acks = pending
    try:
        yield
    finally:
        _deferred.acks = outer
        by_qos: dict[QoS, list[str]] = {}
        for qos, tag in pending:
            by_qos.setdefault(qos, []).append(tag)
        for qos, tags in by_qos.items():  # one channel, in a worker: a batch comes from its one consumer
            qos.ack_many(tags)


class QoS(kombu_redis.QoS):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        #: Tags registered as unacknowledged in Redis by :meth:`register_popped`, not yet delivered.
        self._registered: set = set()
        #: Acks made on the worker's event loop in this pass of it (only that thread touches the list).
        self._coalesced: list[str] = []

    def register_popped(self, payloads: list[dict]) -> None:
        """Record messages popped together as unacknowledged, one MULTI/EXEC for all (kombu's ``append`` format)."""
        now = time()
        index, entries = {}, {}
        for payload in payloads:
            properties = payload["properties"]
            tag, delivery = properties["delivery_tag"], properties["delivery_info"]
            index[tag] = now
            entries[tag] = dumps([payload, delivery["exchange"], delivery["routing_key"]])
        with self.pipe_or_acquire() as pipe:
            pipe.zadd(self.unacked_index_key, index).hset(self.unacked_key, mapping=entries).execute()
        self._registered.update(index)

    def append(self, message, delivery_tag) -> None:
        if delivery_tag in self._registered:
            self._registered.discard(delivery_tag)
            super(kombu_redis.QoS, self).append(message, delivery_tag)  # in Redis already: kombu's local state only
        else:
            super().append(message, delivery_tag)

    def ack(self, delivery_tag) -> None:
        pending = getattr(_deferred, "acks", None)
        if pending is not None:
            pending.append((self, delivery_tag))
            return
        hub = getattr(self.channel.connection, "hub", None)
        if hub is None or getattr(hub, "_loop_thread", None) != threading.get_ident():
            super().ack(delivery_tag)  # no event loop (a producer, a test's channel) or not on its thread: at once
            return
        self._coalesced.append(delivery_tag)
        if len(self._coalesced) == 1:
            # A timer due now runs in this same pass of the loop, after the callbacks it is running (Celery's
            # promised acks of one batch arrive together) and before the loop polls, or asks Redis for more
            # messages: the freed prefetch slots count at once. (``call_soon`` from the loop's own thread would
            # wait for the next pass, and so for the poll's timeout: up to a second per batch of one.)
            hub.call_later(0, self._ack_coalesced)

    def _ack_coalesced(self) -> None:
        tags, self._coalesced = self._coalesced, []
        try:
            self.ack_many(tags)
        except Exception:  # as kombu's ack_log_error: logged, and Redis redelivers them after the visibility timeout
            logger.critical("could not acknowledge %d message(s); Redis redelivers them after the visibility timeout",
                            len(tags), exc_info=True)

    def ack_many(self, delivery_tags: list[str]) -> None:
        """Remove the messages from the unacked index and hash in one round trip, then from kombu's own state."""
        if not delivery_tags:
            return
        with self.pipe_or_acquire() as pipe:
            pipe.zrem(self.unacked_index_key, *delivery_tags).hdel(self.unacked_key, *delivery_tags).execute()
        for tag in delivery_tags:
            # kombu's in-process bookkeeping (virtual.QoS.ack), skipping the Redis QoS's own round trip.
            super(kombu_redis.QoS, self).ack(tag)


class Channel(kombu_redis.Channel):
    QoS = QoS
    _shared_client = None
    #: How many messages the BLMPOP in flight asked for; None while a plain BRPOP (or nothing) is in flight.
    _popping: int | None = None
    #: Whether the server has BLMPOP (Redis 7+); None until asked.
    _has_blmpop: bool | None = None

    def _pop_count(self) -> int:
        """Messages the next pop may take: the free prefetch slots, 1 where BLMPOP cannot be used."""
        if self.global_keyprefix:  # redis-py's key prefixing does not know BLMPOP's argument layout
            return 1
        if self._has_blmpop is None:
            try:
                with self.conn_or_acquire() as client:
                    version = str(client.info("server").get("redis_version", "0"))
                self._has_blmpop = int(version.split(".")[0]) >= 7
            except Exception:  # e.g. an ACL that refuses INFO: stay with BRPOP
                logger.info("could not read the Redis server's version; receiving one message per BRPOP", exc_info=True)
                self._has_blmpop = False
        if not self._has_blmpop:
            return 1
        free = self.qos.can_consume_max_estimate()
        return MAX_MULTI_POP if free is None else min(free, MAX_MULTI_POP)

    def _brpop_start(self, timeout=None):
        count = self._pop_count()
        if count <= 1:
            self._popping = None
            return super()._brpop_start(timeout)
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return
        # The same keys in the same order as kombu's BRPOP (priority steps first); BLMPOP pops from the
        # first non-empty one, from the right, as BRPOP does.
        keys = [self._q_for_pri(queue, pri) for pri in self.priority_steps for queue in queues]
        self._in_poll = self.client.connection
        self._brpop_sent_at = monotonic()
        self._popping = count
        timeout = self.brpop_timeout if timeout is None else timeout
        self.client.connection.send_command("BLMPOP", timeout or 0, len(keys), *keys, "RIGHT", "COUNT", count)

    def _brpop_read(self, **options):
        if self._popping is None:
            return super()._brpop_read(**options)
        try:
            try:
                reply = self.client.parse_response(self.client.connection, "BLMPOP", **options)
            except self.connection_errors:
                self.client.connection.disconnect()  # reconnect on the next poll, as kombu does
                raise
            if not reply:
                raise Empty()
            dest, items = reply
            dest = bytes_to_str(dest).rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(dest)
            payloads = [loads(bytes_to_str(item)) for item in items]
            try:
                self.qos.register_popped(payloads)
            except Exception:
                self._push_back(payloads)
                raise
            self._deliver_popped(payloads, dest)
            return True
        finally:
            self._in_poll = None
            self._popping = None
            flush_reauth = getattr(self, "_flush_brpop_reauth", None)  # kombu 5.6+
            if flush_reauth is not None:
                flush_reauth()

    def _push_back(self, payloads: list[dict]) -> None:
        """Best effort: messages popped but not registered as unacknowledged go back on their queues.

        kombu's BRPOP has the same window for one message (popped, then registered in a second round trip);
        here it would hold a whole batch.
        """
        try:
            with self.conn_or_acquire() as client:
                pipe = client.pipeline()
                for payload in payloads:
                    delivery = payload["properties"]["delivery_info"]
                    self._do_restore_message(payload, delivery["exchange"], delivery["routing_key"], pipe)
                pipe.execute()
        except Exception:
            logger.error("%d popped message(s) could not be registered nor put back", len(payloads), exc_info=True)

    def _deliver_popped(self, payloads: list[dict], dest: str) -> None:
        for position, payload in enumerate(payloads):
            try:
                self.connection._deliver(payload, dest)
            except BaseException:
                # The rest are unacknowledged in Redis but unknown to kombu: back on the queue now, not
                # after the visibility timeout.
                for rest in payloads[position + 1 :]:
                    tag = rest["properties"]["delivery_tag"]
                    self.qos._registered.discard(tag)
                    try:
                        self.qos.restore_by_tag(tag)
                    except Exception:  # Redis restores it after the visibility timeout
                        logger.warning("could not put message %s back; Redis restores it after the visibility timeout",
                                       tag, exc_info=True)
                raise

    @contextmanager
    def conn_or_acquire(self, client=None):
        if client is not None:
            yield client
            return
        shared = self._shared_client
        # A reconnect replaces the pool (kombu's _disconnect_pools): a client of the old one is dropped.
        if shared is None or shared.connection_pool is not self.pool:
            shared = self._shared_client = self._create_client()
        yield shared


class Transport(kombu_redis.Transport):
    Channel = Channel
    #: The worker's event loop, once the consumer registered the transport with it (see :meth:`QoS.ack`).
    hub = None

    def register_with_event_loop(self, connection, loop):
        self.hub = loop
        return super().register_with_event_loop(connection, loop)


def install() -> None:
    """Serve ``redis://`` and ``rediss://`` broker URLs with :class:`Transport` in this process."""
    for scheme in ("redis", "rediss"):
        kombu.transport.TRANSPORT_ALIASES[scheme] = f"{__name__}:Transport"
        # kombu caches each name's class on first use: a name resolved before this call would keep kombu's.
        getattr(kombu.transport, "_transport_cache", {}).pop(scheme, None)
