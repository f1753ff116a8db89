"""Loopback helpers for running dfmod's collaborators locally: free ports, readiness waits, a moto S3 server,
and children that stop with their parent.

Used by ``dfmod up``, ``dfmod bench`` and the test fixtures, which all start real servers on 127.0.0.1.
"""

from __future__ import annotations

import importlib.util
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager


def die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """``preexec_fn`` for children that must not outlive their parent, even one killed by SIGKILL.

    Linux only (``PR_SET_PDEATHSIG``): the kernel sends the child SIGTERM when the thread that started it
    dies. Elsewhere it does nothing, and the parent's own clean-up is all there is.
    """
    import ctypes

    pr_set_pdeathsig = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def child_preexec():
    """The ``preexec_fn`` to pass to ``subprocess.Popen`` for a child that stops with its parent."""
    return die_with_parent if sys.platform.startswith("linux") else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_open(port):
            return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def moto_command(port: int, server: str | None = None) -> list[str]:
    """The command line of a moto S3 server on ``127.0.0.1:port``: moto_server's application behind granian
    where it is installed, else behind werkzeug's server without two per-request costs (:mod:`dfmod.moto_main`;
    ``server`` picks one)."""
    if importlib.util.find_spec("moto") is None or importlib.util.find_spec("flask") is None:
        raise RuntimeError("moto_server is not installed (pip install 'moto[server]')")
    return [sys.executable, "-m", "dfmod.moto_main", "-H", "127.0.0.1", "-p", str(port),
            *(["--server", server] if server else [])]


@contextmanager
def moto_server(server: str | None = None) -> Iterator[str]:
    """A real S3-compatible HTTP server (moto's) on a free loopback port; yields its endpoint URL."""
    port = free_port()
    process = subprocess.Popen(
        moto_command(port, server), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=child_preexec()
    )
    try:
        wait_for_port(port)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=10)
