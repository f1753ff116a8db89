"""dfmod.filesystem_broker, the embedded broker: the Celery app gets it, and a consumer reading while another
process publishes large messages gets every one of them whole (kombu's own transport let a consumer read a
message file before its payload was written)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from kombu import Connection

from dfmod import filesystem_broker
from dfmod.queue import make_celery
from dfmod.settings import Settings

MESSAGES = 150
PAYLOAD_BYTES = 400_000

PRODUCER = textwrap.dedent("""
    import sys
    from kombu import Connection
    from dfmod import filesystem_broker

    filesystem_broker.install()
    folder, count, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    options = {"data_folder_in": folder, "data_folder_out": folder, "control_folder": folder + "/control"}
    with Connection("filesystem://", transport_options=options) as connection:
        queue = connection.SimpleQueue("fs-test")
        for index in range(count):
            queue.put({"index": index, "pad": "x" * size})
        queue.close()
""")


def test_the_embedded_broker_is_dfmods(tmp_path):
    app = make_celery(Settings(data_dir=tmp_path, broker_url=None))
    assert isinstance(app.connection_for_write().transport, filesystem_broker.Transport)


def test_a_consumer_reading_during_publishing_gets_every_message_whole(tmp_path):
    folder = tmp_path / "broker"
    folder.mkdir()
    filesystem_broker.install()
    producer = subprocess.Popen([sys.executable, "-c", PRODUCER, str(folder), str(MESSAGES), str(PAYLOAD_BYTES)])
    received = []
    try:
        options = {"data_folder_in": str(folder), "data_folder_out": str(folder), "polling_interval": 0,
                   "control_folder": str(folder / "control")}
        with Connection("filesystem://", transport_options=options) as connection:
            queue = connection.SimpleQueue("fs-test")
            while len(received) < MESSAGES:
                message = queue.get(timeout=60)  # a partial file would raise JSONDecodeError here
                received.append(message.payload["index"])
                assert len(message.payload["pad"]) == PAYLOAD_BYTES
                message.ack()
            queue.close()
    finally:
        producer.wait(timeout=60)
    assert sorted(received) == list(range(MESSAGES))
    assert not [path.name for path in folder.iterdir() if path.name.endswith(".partial")]
