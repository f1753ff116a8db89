"""worker.batching on its own: flush on size, flush on time, acks after the batch function, requeue when it
raises, countdown messages outside the buffer, and a flush timer that is re-armed when the consumer restarts
(Celery clears its timer hub on a broker reconnect; celery-batches lost its timer for good there).

The consumer is a stand-in with the four things the layer uses (timer, pool, qos, connection errors);
tests/worker/test_worker_process.py runs the layer in real workers on real Redis, restarts included."""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone

import pytest
from celery import Celery

from worker.batching import BatchingTask


class FakeTimer:
    """kombu's timer as the layer uses it: one-shot entries, fired by :meth:`tick` once they are due."""

    def __init__(self) -> None:
        self.later: list = []

    def call_after(self, secs, fun, args=(), kwargs=None):
        entry = _Entry(fun, args, time.monotonic() + secs)
        self.later.append(entry)
        return entry

    def clear(self) -> None:  # what celery/worker/loops.py does on a connection loss
        self.later.clear()

    def tick(self) -> None:
        due = [entry for entry in self.later if entry.due <= time.monotonic()]
        self.later = [entry for entry in self.later if entry not in due]
        for entry in due:
            if not entry.cancelled:
                entry.fun(*entry.args)

    @property
    def armed(self) -> list:
        return [entry for entry in self.later if not entry.cancelled]


class _Entry:
    def __init__(self, fun, args, due: float) -> None:
        self.fun, self.args, self.due, self.cancelled = fun, args, due, False

    def cancel(self) -> None:
        self.cancelled = True


class FakePool:
    def apply_async(self, target, args=(), callback=None):
        callback(target(*args))


class FakeQos:
    def __init__(self) -> None:
        self.extra = 0

    def increment_eventually(self) -> None:
        self.extra += 1

    def decrement_eventually(self) -> None:
        self.extra -= 1


class FakeConsumer:
    def __init__(self) -> None:
        self.timer, self.pool, self.qos, self.connection_errors = FakeTimer(), FakePool(), FakeQos(), ()


class FakeMessage:
    def __init__(self, item_id: str, eta: datetime | None = None) -> None:
        self.payload = [[item_id], {}, {}]
        self.headers = {"eta": eta.isoformat()} if eta else {}


@pytest.fixture
def batching():
    app = Celery("test-batching", set_as_current=False)
    batches: list[list[str]] = []
    settled: list[tuple[str, str]] = []
    failing = {"on": False}

    @app.task(name="t.classify", base=BatchingTask, flush_every=3, max_wait=0.05)
    def classify(batch):
        if failing["on"]:
            raise RuntimeError("database down for good")
        batches.append([args[0] for args in batch])

    consumer = FakeConsumer()
    handler = classify.start_strategy(app, consumer)

    def send(item_id: str, eta: datetime | None = None) -> None:
        handler(
            FakeMessage(item_id, eta), None,
            lambda *_a: settled.append(("ack", item_id)), lambda *_a: settled.append(("requeue", item_id)), set(),
        )

    class Harness:
        pass

    harness = Harness()
    harness.__dict__.update(
        app=app, task=classify, consumer=consumer, send=send, batches=batches, settled=settled, failing=failing,
        restart=lambda: classify.start_strategy(app, consumer),
    )
    return harness


def test_a_full_buffer_flushes_at_once_and_acks_after_the_batch(batching):
    for name in ("a", "b", "c", "d"):
        batching.send(name)
    assert batching.batches == [["a", "b", "c"]]
    assert batching.settled == [("ack", "a"), ("ack", "b"), ("ack", "c")]
    assert batching.task.buffered == 1


def test_a_partial_buffer_flushes_once_it_waited_max_wait(batching):
    batching.send("a")
    batching.send("b")
    batching.consumer.timer.tick()
    assert batching.batches == []  # not yet: the first message has waited less than max_wait
    time.sleep(0.06)
    batching.consumer.timer.tick()
    assert batching.batches == [["a", "b"]]


def test_the_flush_timer_is_armed_only_while_a_partial_buffer_waits(batching):
    # An idle worker's event loop is not woken up (a repeating timer cost an idle worker 2.4 % of a core).
    assert batching.consumer.timer.armed == []
    for name in ("a", "b", "c"):
        batching.send(name)  # a full buffer goes at once: nothing to wait for
    assert batching.batches == [["a", "b", "c"]] and batching.consumer.timer.armed == []
    batching.send("d")
    assert len(batching.consumer.timer.armed) == 1
    batching.send("e")
    assert len(batching.consumer.timer.armed) == 1  # one wait per buffer, not per message
    time.sleep(0.06)
    batching.consumer.timer.tick()
    assert batching.batches[-1] == ["d", "e"] and batching.consumer.timer.armed == []


def test_a_waiting_buffer_is_looked_at_again_while_every_slot_is_busy(batching):
    batching.task._in_flight = batching.task.slots  # a batch is running in the only slot
    batching.send("a")
    time.sleep(0.06)
    batching.consumer.timer.tick()
    assert batching.batches == [] and len(batching.consumer.timer.armed) == 1  # re-armed, not dropped
    batching.task._in_flight = 0
    time.sleep(0.02)
    batching.consumer.timer.tick()
    assert batching.batches == [["a"]]


def test_partial_batches_still_flush_on_time_after_the_consumer_restarts(batching):
    batching.send("a")
    # A broker reconnect: Celery clears the timer hub, then restarts the consumer, which rebuilds strategies.
    batching.consumer.timer.clear()
    batching.restart()
    batching.consumer.timer.tick()
    time.sleep(0.06)
    batching.consumer.timer.tick()
    assert batching.batches == [["a"]]  # the message buffered before the drop is not stranded
    batching.send("b")
    batching.consumer.timer.tick()
    time.sleep(0.06)
    batching.consumer.timer.tick()
    assert batching.batches == [["a"], ["b"]]
    assert batching.task.starts == 2 and batching.consumer.timer.armed == []


def test_a_failed_batch_goes_back_to_the_queue(batching):
    batching.failing["on"] = True
    for name in ("a", "b", "c"):
        batching.send(name)
    assert batching.settled == [("requeue", "a"), ("requeue", "b"), ("requeue", "c")]


def test_countdown_messages_wait_outside_the_buffer_without_a_prefetch_slot(batching):
    batching.send("later", eta=datetime.now(timezone.utc) + timedelta(seconds=30))
    assert batching.task.buffered == 0 and batching.consumer.qos.extra == 1
    [entry] = batching.consumer.timer.later
    entry.fun(*entry.args)  # the countdown ran out
    assert batching.task.buffered == 1 and batching.consumer.qos.extra == 0
