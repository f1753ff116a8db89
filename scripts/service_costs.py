#!/usr/bin/env python3
"""CPU per message of the Redis broker path and per GET of the test S3 server: the figures behind
``dfmod.redis_broker``, ``dfmod.queue.enqueue`` and ``dfmod.loopback.moto_command`` (README, Benchmarks).

    python scripts/service_costs.py [--redis redis://127.0.0.1:6379/0] [--messages 2000] [--gets 1000]

Broker: ``--messages`` messages published, received and acknowledged through kombu's stock Redis transport,
then through dfmod's (acknowledged 32 at a time inside ``batched_acks``, as the worker does); this process's
CPU per message for each step. The queue is a throw-away one on the given Redis database. Enqueue: the same
number of classify tasks sent through Celery's ``send_task`` one by one, the queue declared with every message
(as ``dfmod.queue.enqueue`` sent them before 2026-12-03), then through ``enqueue``; CPU per task.

S3: moto_server started the stock way and through ``moto_command`` behind each of its HTTP servers (werkzeug,
granian), 64 objects of 30 KB, ``--gets`` GETs through obstore, one at a time and from 16 threads (as the
worker fetches a batch); the server's CPU per GET (its processes together) and the wall time per GET.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager

import psutil


def broker_costs(url: str, messages: int, dfmod_transport: bool) -> dict[str, float]:
    import kombu.transport
    from kombu import Connection, Exchange, Queue

    from dfmod import redis_broker

    if dfmod_transport:
        redis_broker.install()
    else:  # kombu's own, whatever ran before
        kombu.transport.TRANSPORT_ALIASES["redis"] = "kombu.transport.redis:Transport"
        kombu.transport._transport_cache.pop("redis", None)
    name = f"dfmod-costs-{uuid.uuid4().hex[:8]}"
    queue = Queue(name, Exchange(name, type="direct"), routing_key=name)
    with Connection(url) as connection:
        channel = connection.channel()
        producer = connection.Producer(channel)
        started = time.process_time()
        for index in range(messages):
            producer.publish({"index": index, "pad": "x" * 200}, exchange=queue.exchange, routing_key=name, declare=[queue])
        published = time.process_time()
        received = []
        channel.basic_qos(0, messages, False)
        with connection.Consumer(queue, channel=channel, callbacks=[lambda _body, message: received.append(message)]):
            while len(received) < messages:
                connection.drain_events(timeout=5)
            delivered = time.process_time()
            if dfmod_transport:
                for start in range(0, messages, 32):
                    with redis_broker.batched_acks():
                        for message in received[start : start + 32]:
                            message.ack()
            else:
                for message in received:
                    message.ack()
            acked = time.process_time()
        queue(channel).delete()
    per = 1000.0 / messages
    return {"publish": (published - started) * per, "receive": (delivered - published) * per, "ack": (acked - delivered) * per}


def enqueue_costs(url: str, messages: int) -> dict[str, float]:
    import redis

    from dfmod.queue import _RETRY_POLICY, CLASSIFY_TASK, _publish_batch, enqueue, make_celery
    from dfmod.settings import Settings

    settings = Settings(broker_url=url, queue=f"dfmod-costs-{uuid.uuid4().hex[:8]}")
    app = make_celery(settings)
    ids = [str(uuid.uuid4()) for _ in range(messages)]
    enqueue(app, settings, ids[:8])  # the connection and the queue's declaration out of the way
    started = time.process_time()
    with app.producer_or_acquire() as producer, _publish_batch(producer):
        for item_id in ids:
            app.send_task(CLASSIFY_TASK, args=[item_id], queue=settings.queue, producer=producer, retry=True,
                          retry_policy=_RETRY_POLICY)
    per_message = time.process_time()
    enqueue(app, settings, ids)
    once = time.process_time()
    redis.Redis.from_url(url).delete(
        settings.queue, f"_kombu.binding.{settings.queue}", f"_kombu.binding_permanent.{settings.queue}"
    )
    per = 1000.0 / messages
    return {"send_task": (per_message - started) * per, "enqueue": (once - per_message) * per}


@contextmanager
def _server(command: list[str], port: int):
    from dfmod.loopback import start_child, stop_child, wait_for_port

    process = start_child(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port)
        yield process
    finally:
        stop_child(process, timeout_s=10)


def s3_get_cost(command: list[str], port: int, gets: int, threads: int) -> tuple[float, float]:
    """(server CPU ms, wall ms) per GET."""
    from concurrent.futures import ThreadPoolExecutor

    import boto3
    import obstore
    from obstore.store import S3Store

    endpoint, bucket, data = f"http://127.0.0.1:{port}", "dfmod-costs", os.urandom(30_000)
    with _server(command, port) as process:
        s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="x", aws_secret_access_key="x", region_name="us-east-1")
        s3.create_bucket(Bucket=bucket)
        for index in range(64):
            s3.put_object(Bucket=bucket, Key=f"k{index}", Body=data)
        store = S3Store(bucket, endpoint=endpoint, access_key_id="x", secret_access_key="x", region="us-east-1",
                        client_options={"allow_http": True})
        server = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]

        def fetch(index: int) -> None:
            assert len(obstore.get(store, f"k{index % 64}").bytes()) == len(data)

        for index in range(64):  # warm: connections, the application's first requests
            fetch(index)
        before, started = sum(sum(p.cpu_times()[:2]) for p in server), time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(fetch, range(gets)))
        wall = time.perf_counter() - started
        return 1000.0 * (sum(sum(p.cpu_times()[:2]) for p in server) - before) / gets, 1000.0 * wall / gets


def main() -> None:
    from dfmod.loopback import free_port, moto_command

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--gets", type=int, default=1000)
    args = parser.parse_args()

    print("CPU ms per message    publish  receive  ack")
    for label, ours in (("kombu's transport", False), ("dfmod.redis_broker", True)):
        costs = broker_costs(args.redis, args.messages, ours)
        print(f"{label:20s} {costs['publish']:8.3f} {costs['receive']:8.3f} {costs['ack']:6.3f}")
    costs = enqueue_costs(args.redis, args.messages)
    print(f"CPU ms per classify task sent: send_task, queue declared each time {costs['send_task']:.3f}; "
          f"dfmod.queue.enqueue {costs['enqueue']:.3f}")

    stock = shutil.which("moto_server", path=os.path.dirname(sys.executable)) or shutil.which("moto_server")
    print("per 30 KB GET, ms             server CPU (1 thread, 16)   wall (1 thread, 16)")
    for label, command in (
        ("moto_server", lambda port: [stock, "-H", "127.0.0.1", "-p", str(port)]),
        ("moto_main --server werkzeug", lambda port: moto_command(port, "werkzeug")),
        ("moto_main --server granian", lambda port: moto_command(port, "granian")),
    ):
        figures = []
        for threads in (1, 16):
            port = free_port()
            figures.append(s3_get_cost(command(port), port, args.gets, threads))
        (cpu1, wall1), (cpu16, wall16) = figures
        print(f"  {label:28s} {cpu1:8.2f} {cpu16:8.2f}        {wall1:8.2f} {wall16:8.2f}")


if __name__ == "__main__":
    main()
