"""dfmod.redis_broker on a real Redis: Celery gets the transport, a batch's acks are one round trip, nothing
is acknowledged before Redis has it, a burst is popped in one round trip within the prefetch limit and
registered as unacknowledged before delivery (or pushed back when Redis refuses that), and the channel's shared
client follows a reconnect."""

from __future__ import annotations

import json
import ssl
from contextlib import contextmanager

import pytest
import redis
from kombu import Connection, Exchange, Queue

from dfmod import redis_broker
from dfmod.queue import make_celery
from dfmod.settings import Settings
from tests.utils.faults import RedisUserWithout

QUEUE = Queue("dfmod-test-acks", Exchange("dfmod-test-acks", type="direct"), routing_key="dfmod-test-acks")


def _deliver(url: str):
    """(channel, messages): 40 messages published and received over ``url``, none acknowledged yet."""
    redis_broker.install()
    with Connection(url) as connection:
        channel = connection.channel()
        producer = connection.Producer(channel)
        for index in range(40):
            producer.publish({"index": index}, exchange=QUEUE.exchange, routing_key=QUEUE.routing_key, declare=[QUEUE])
        messages = []
        channel.basic_qos(0, 100, False)
        with connection.Consumer(QUEUE, channel=channel, callbacks=[lambda _body, message: messages.append(message)]):
            while len(messages) < 40:
                connection.drain_events(timeout=5)
            yield channel, messages


@pytest.fixture
def delivered(redis_url):
    yield from _deliver(redis_url)


@pytest.fixture
def delivered_to_a_user_who_cannot_ack(redis_url):
    """As ``delivered``, over a Redis user whose ACL refuses ZREM: every acknowledgement fails in Redis."""
    with RedisUserWithout(redis_url, "dfmod-no-acks", "zrem") as user:
        deliveries = _deliver(user.url)
        try:
            yield next(deliveries)
        finally:
            user.allow_everything()  # so that closing the channel can put the unacked messages back
            deliveries.close()


def _calls(client: redis.Redis, command: str) -> int:
    return client.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0)


def test_celery_on_redis_gets_dfmods_transport_and_keeps_rediss_defaults(redis_url):
    app = make_celery(Settings(broker_url=redis_url))
    assert isinstance(app.connection_for_write().transport, redis_broker.Transport)
    tls = make_celery(Settings(broker_url="rediss://:secret@redis.example.internal:6380/0")).connection_for_write()
    assert tls.transport_cls == "rediss" and issubclass(tls.get_transport_cls(), redis_broker.Transport)
    assert tls.ssl == {"ssl_cert_reqs": ssl.CERT_NONE}  # kombu's own rediss default, unchanged


def test_install_takes_effect_even_after_kombu_resolved_the_scheme():
    import kombu.transport

    kombu.transport.TRANSPORT_ALIASES["redis"] = "kombu.transport.redis:Transport"
    kombu.transport._transport_cache.pop("redis", None)
    assert kombu.transport.get_transport_cls("redis") is kombu.transport.redis.Transport  # cached now
    redis_broker.install()
    assert kombu.transport.get_transport_cls("redis") is redis_broker.Transport


def test_the_acks_of_a_batch_reach_redis_in_one_round_trip(delivered, redis_url):
    channel, messages = delivered
    client = redis.Redis.from_url(redis_url)
    assert client.hlen("unacked") == 40
    zrem_before, exec_before = _calls(client, "zrem"), _calls(client, "exec")
    with redis_broker.batched_acks():
        for message in messages:
            message.ack()
        assert client.hlen("unacked") == 40  # deferred: nothing is gone before the block ends
    assert client.hlen("unacked") == 0 and client.zcard("unacked_index") == 0
    assert _calls(client, "zrem") - zrem_before == 1
    assert _calls(client, "exec") - exec_before == 1
    assert all(message.acknowledged for message in messages)
    channel.qos._flush()
    assert not channel.qos._delivered  # the prefetch slots are free again


def test_acks_outside_a_batch_are_sent_at_once(delivered, redis_url):
    _channel, messages = delivered
    client = redis.Redis.from_url(redis_url)
    messages[0].ack()
    assert client.hlen("unacked") == 39
    assert not client.hexists("unacked", messages[0].delivery_tag)


def test_a_batch_whose_acks_fail_stays_unacked_in_redis(delivered_to_a_user_who_cannot_ack, redis_url):
    channel, messages = delivered_to_a_user_who_cannot_ack
    client = redis.Redis.from_url(redis_url)
    with pytest.raises(redis.exceptions.NoPermissionError), redis_broker.batched_acks():
        for message in messages[:32]:
            message.ack()
    # Still in Redis's unacked set, for kombu to restore after the visibility timeout and redeliver;
    # and still holding their prefetch slots in this process.
    assert client.hlen("unacked") == 40
    channel.qos._flush()
    assert len(channel.qos._delivered) == 40


def test_the_channel_shares_one_client_per_connection_pool(delivered):
    channel, _messages = delivered
    with channel.conn_or_acquire() as first, channel.conn_or_acquire() as second:
        assert first is second
    channel._disconnect_pools()  # what kombu does on a reconnect
    with channel.conn_or_acquire() as after:
        assert after is not first and after.connection_pool is channel.pool


@contextmanager
def _consuming(url: str, published: int, prefetch: int, on_message=None, blmpop: bool = True):
    """(connection, channel, received): ``published`` messages on the queue, a consumer with ``prefetch`` slots
    whose callback appends each message to ``received`` (then calls ``on_message``), nothing drained yet."""
    redis_broker.install()
    with Connection(url) as connection:
        producer = connection.Producer(connection.default_channel)
        for index in range(published):
            producer.publish({"index": index}, exchange=QUEUE.exchange, routing_key=QUEUE.routing_key, declare=[QUEUE])
        channel = connection.channel()
        if not blmpop:
            channel._has_blmpop = False  # as on a Redis older than 7
        channel.basic_qos(0, prefetch, False)
        received: list = []

        def callback(_body, message):
            received.append(message)
            if on_message:
                on_message(message)

        with connection.Consumer(QUEUE, channel=channel, callbacks=[callback]):
            yield connection, channel, received


def test_a_burst_is_popped_in_one_round_trip_and_registered_before_delivery(redis_url):
    client = redis.Redis.from_url(redis_url)
    unacked_when_delivered = []

    def note_whether_unacked(message) -> None:
        unacked_when_delivered.append(client.hexists("unacked", message.delivery_tag))

    with _consuming(redis_url, 40, 100, note_whether_unacked) as (connection, channel, received):
        blmpop_before, brpop_before = _calls(client, "blmpop"), _calls(client, "brpop")
        connection.drain_events(timeout=5)
        assert len(received) == 40  # one read, the whole burst
        assert _calls(client, "blmpop") - blmpop_before == 1 and _calls(client, "brpop") == brpop_before
        assert all(unacked_when_delivered)
        assert [message.payload["index"] for message in received] == list(range(40))  # queue order kept
        # kombu's own format in the unacked hash: its restore (a worker's shutdown) puts them all back.
        channel.qos.restore_unacked()
    assert client.llen(QUEUE.name) == 40 and client.hlen("unacked") == 0


def test_a_pop_takes_no_more_than_the_free_prefetch_slots(redis_url):
    client = redis.Redis.from_url(redis_url)
    with _consuming(redis_url, 40, 8) as (connection, _channel, received):
        connection.drain_events(timeout=5)
        assert len(received) == 8 and client.llen(QUEUE.name) == 32 and client.hlen("unacked") == 8
        received[0].ack()
        received[1].ack()
        connection.drain_events(timeout=5)
        assert len(received) == 10  # two slots freed, two more popped
        assert client.llen(QUEUE.name) == 30


def test_when_a_delivery_raises_the_undelivered_rest_go_back_on_the_queue(redis_url):
    client = redis.Redis.from_url(redis_url)
    delivered = []

    def break_on_the_third(message) -> None:
        delivered.append(message)
        if len(delivered) == 3:
            raise RuntimeError("consumer broke")

    with _consuming(redis_url, 10, 100, break_on_the_third) as (connection, channel, _received):
        with pytest.raises(RuntimeError, match="consumer broke"):
            connection.drain_events(timeout=5)
        # The three delivered ones are kombu's (unacked, restored at its shutdown); the other seven are queued.
        assert client.llen(QUEUE.name) == 7 and client.hlen("unacked") == 3
        assert len(channel.qos._delivered) == 3 and not channel.qos._registered


def test_without_blmpop_each_message_is_its_own_brpop(redis_url):
    client = redis.Redis.from_url(redis_url)
    with _consuming(redis_url, 5, 100, blmpop=False) as (connection, _channel, received):
        brpop_before, blmpop_before = _calls(client, "brpop"), _calls(client, "blmpop")
        while len(received) < 5:
            connection.drain_events(timeout=5)
    assert _calls(client, "brpop") - brpop_before == 5 and _calls(client, "blmpop") == blmpop_before


def test_a_burst_redis_will_not_register_goes_back_on_the_queue(redis_url):
    """Popped but not recorded as unacknowledged (a Redis user whose ACL refuses HSET): nothing is delivered,
    and the burst is pushed back instead of being lost."""
    admin = redis.Redis.from_url(redis_url)
    with RedisUserWithout(redis_url, "dfmod-no-register", "hset") as user:
        with _consuming(user.url, 12, 100) as (connection, channel, received):
            with pytest.raises(redis.exceptions.RedisError):
                connection.drain_events(timeout=5)
            assert received == [] and not channel.qos._registered
            assert admin.llen(QUEUE.name) == 12 and admin.hlen("unacked") == 0
            bodies = [json.loads(raw)["body"] for raw in admin.lrange(QUEUE.name, 0, -1)]
            assert len(set(bodies)) == 12  # each message once


def test_acks_made_on_the_event_loop_reach_redis_together_in_the_same_pass(delivered, redis_url):
    # Celery acks each task through a promise that its event loop runs later, outside batched_acks: there the
    # acks of one pass go in one round trip, and before the loop polls (or asks Redis for more messages).
    from kombu.asynchronous import Hub

    channel, messages = delivered
    client = redis.Redis.from_url(redis_url)
    hub = Hub()
    channel.connection.register_with_event_loop(channel.connection, hub)
    for message in messages[:32]:
        hub.call_soon(message.ack)
    zrem_before = _calls(client, "zrem")
    loop = hub.create_loop()
    next(loop)  # one pass
    assert client.hlen("unacked") == 8
    assert _calls(client, "zrem") - zrem_before == 1
    assert all(message.acknowledged for message in messages[:32])
    channel.qos._flush()
    assert len(channel.qos._delivered) == 8  # their prefetch slots are free again
    hub.close()
