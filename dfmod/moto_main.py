"""moto's S3 server with its per-request costs taken out: the S3 server of dfmod's tests and bench.

``python -m dfmod.moto_main -H 127.0.0.1 -p PORT [--server granian|werkzeug]`` (what
:func:`dfmod.loopback.moto_command` runs) serves moto_server's own WSGI application, so S3 behaves as under
moto_server. What differs is the HTTP server around it, which on the two cores of a development machine is
most of the S3 server's CPU (the worker reads every image through it, and it competes with the worker):

* ``granian`` (the default where it is installed, as in the ``test`` extra): a Rust HTTP server (hyper)
  with one worker process running the application. Per 30 KB GET, with 16 client threads as the worker
  fetches: 1.1 against 2.1 ms of server CPU, and 1.1 against 2.3 ms of wall time, than the werkzeug server
  below (``python scripts/service_costs.py``). One difference: HTTP header names with an underscore reach
  moto with dashes (WSGI folds both into one environ key, and granian keeps no original spelling), so an
  object's metadata key ``trace_id`` comes back as ``trace-id``; dfmod stores no object metadata.
* ``werkzeug``: moto_server's development server, which keeps underscored metadata names, with two costs
  removed. moto's dispatcher matches each request's Host header against the names of its service packages,
  and lists its package directory for that on every request (about half of its CPU per GET); the list
  cannot change while it runs, so it is read once (in both modes). And werkzeug closed every connection
  (``Connection: close``), because after each response it reads whatever the client sent, to skip a request
  body the application left unread; so every GET paid a TCP connect, an accept and a new thread. A request
  without a body (GET, HEAD, DELETE: all that the worker sends) now keeps its connection, with
  ``TCP_NODELAY`` (headers and body go out as two writes, and Nagle's algorithm would hold the body until the
  client's delayed ACK); requests with a body still close theirs.

This is test infrastructure: a deployment's S3 is AWS, MinIO or R2, not on the worker's machine.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
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


def _read_module_list_once() -> None:
    import moto.backends

    if hasattr(moto.backends, "list_of_moto_modules"):
        modules = tuple(moto.backends.list_of_moto_modules())
        moto.backends.list_of_moto_modules = lambda: modules


def make_app():
    """moto_server's WSGI application, as granian's factory calls it in its worker process."""
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app

    from dfmod.loopback import die_with_parent

    # The worker is granian's child, not ours: it must stop with its parent too, even one killed by SIGKILL.
    die_with_parent()
    _read_module_list_once()
    app = DomainDispatcherApplication(create_backend_app)
    app.debug = True  # as moto_server's main sets it
    return app


def serve_granian(host: str, port: int) -> None:
    from granian import Granian

    os.environ.setdefault("MOTO_PORT", str(port))  # moto builds some URLs with it, as under moto_server
    # One application thread: moto holds the GIL throughout a request, so more threads only add switching
    # (1.1 against 1.3 ms of CPU per GET with four).
    Granian(
        "dfmod.moto_main:make_app", factory=True, address=host, port=port, interface="wsgi", workers=1,
        blocking_threads=1, log_enabled=False,
    ).serve()


def serve_werkzeug(argv: list[str]) -> None:
    import moto.server
    import werkzeug.serving

    _read_module_list_once()

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


def default_server() -> str:
    return "granian" if importlib.util.find_spec("granian") is not None else "werkzeug"


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m dfmod.moto_main", description=__doc__.splitlines()[0])
    parser.add_argument("-H", "--host", default="127.0.0.1")
    parser.add_argument("-p", "--port", type=int, default=5000)
    parser.add_argument("--server", choices=("granian", "werkzeug"), default=default_server())
    args = parser.parse_args(argv)
    if args.server == "granian":
        serve_granian(args.host, args.port)
    else:
        serve_werkzeug(["-H", args.host, "-p", str(args.port)])


if __name__ == "__main__":
    main(sys.argv[1:])
