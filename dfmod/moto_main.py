"""moto_server's main with two per-request costs taken out: the S3 server of dfmod's tests and bench.

``python -m dfmod.moto_main -H 127.0.0.1 -p PORT`` (what :func:`dfmod.loopback.moto_command` runs) is
moto_server with its S3 behaviour unchanged:

* moto's dispatcher matches each request's Host header against the names of its service packages, and
  lists its package directory for that on every request (``os.listdir`` and a stat call per package: about
  half of its CPU per 30 KB GET, 2.6 against 1.3-1.6 ms). The list cannot change while it runs, so it is
  read once.
* werkzeug's development server closes every connection (``Connection: close``), because after each
  response it reads whatever the client sent, to skip a request body the application left unread, and
  would swallow the next request of a kept connection. So every GET paid a TCP connect, an accept and a
  new thread, in the server and in the client. A request without a body (GET, HEAD, DELETE: all that the
  worker sends) has nothing to skip: its connection stays open and the skipping is not done; requests
  with a body still close theirs. Headers and body go out as two writes, so ``TCP_NODELAY``: on a kept
  connection Nagle's algorithm would hold the body until the client's delayed ACK.

This is test infrastructure: a deployment's S3 is AWS, MinIO or R2, not on the worker's machine.
"""

from __future__ import annotations

import selectors
import socket
import sys
import threading

_request = threading.local()


class _SkipDrainSelector:
    """werkzeug's after-response read, told there is nothing to read when the request had no body."""

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()

    def register(self, *args, **kwargs):
        return self._selector.register(*args, **kwargs)

    def select(self, timeout=None):
        if getattr(_request, "without_body", False):
            return []
        return self._selector.select(timeout)

    def close(self) -> None:
        self._selector.close()


class _SelectorsForWerkzeug:
    """What ``werkzeug.serving`` sees as its ``selectors`` module."""

    DefaultSelector = _SkipDrainSelector

    def __getattr__(self, name: str):
        return getattr(selectors, name)


def _without_body(headers) -> bool:
    return headers.get("Transfer-Encoding") is None and headers.get("Content-Length", "0").strip() == "0"


def main(argv: list[str]) -> None:
    import moto.backends
    import moto.server
    import werkzeug.serving

    if hasattr(moto.backends, "list_of_moto_modules"):
        modules = tuple(moto.backends.list_of_moto_modules())
        moto.backends.list_of_moto_modules = lambda: modules

    class KeepAliveWithoutBody(moto.server.MotoRequestHandler):
        def setup(self) -> None:
            super().setup()
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def run_wsgi(self) -> None:
            _request.without_body = _without_body(self.headers)
            try:
                super().run_wsgi()
            finally:
                _request.without_body = False

        def send_header(self, keyword: str, value: str) -> None:
            if keyword.lower() == "connection" and value.lower() == "close" and getattr(_request, "without_body", False):
                return  # kept open: http.server reads the next request on it
            super().send_header(keyword, value)

    werkzeug.serving.selectors = _SelectorsForWerkzeug()
    moto.server.MotoRequestHandler = KeepAliveWithoutBody
    moto.server.main(argv)


if __name__ == "__main__":
    main(sys.argv[1:])
