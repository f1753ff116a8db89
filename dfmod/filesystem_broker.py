"""kombu's filesystem transport (the embedded broker of ``dfmod up`` and the bench) with its messages written
atomically.

kombu writes a message by creating its file under its final name and then writing the payload, under an
advisory lock that the consumer does not take: a consumer listing the folder in between moves the file away
and reads an empty or partial payload. Celery then stops the worker with "Unrecoverable error:
JSONDecodeError" (seen in the bench's tests, where a worker starts while a backlog is being enqueued).
:class:`Channel` writes the payload to a hidden file in the same folder, which the consumer's name filter
skips, and renames it to its final name: the consumer sees whole messages or none.
"""

from __future__ import annotations

import os
import uuid
from time import monotonic

import kombu.transport
from kombu.exceptions import ChannelError
from kombu.transport import filesystem as kombu_filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps


class Channel(kombu_filesystem.Channel):
    def _put(self, queue, payload, **kwargs) -> None:
        # kombu's name: delivery order is the sorted names, and the consumer keeps files ending ".QUEUE.msg".
        name = f"{int(round(monotonic() * 1000))}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        partial = os.path.join(self.data_folder_out, f".{name}.partial")
        try:
            with open(partial, "wb") as handle:
                handle.write(str_to_bytes(dumps(payload)))
            os.replace(partial, final)  # atomic within one folder
        except OSError as exc:
            try:
                os.unlink(partial)
            except OSError:
                pass
            raise ChannelError(f"Cannot add file {final!r} to directory") from exc


class Transport(kombu_filesystem.Transport):
    Channel = Channel


def install() -> None:
    """Serve ``filesystem://`` broker URLs with :class:`Transport` in this process."""
    kombu.transport.TRANSPORT_ALIASES["filesystem"] = f"{__name__}:Transport"
    getattr(kombu.transport, "_transport_cache", {}).pop("filesystem", None)
