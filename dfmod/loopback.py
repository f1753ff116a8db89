"""Loopback helpers for running dfmod's collaborators locally: free ports, readiness waits, a moto S3 server,
and children that stop with their parent.

Used by ``dfmod up``, ``dfmod bench`` and the test fixtures, which all start real servers on 127.0.0.1.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager


def die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """In a child (between fork and exec, or first thing in a process of its own): stop with the parent, even
    one killed by SIGKILL.

    Linux only (``PR_SET_PDEATHSIG``): the kernel sends the child SIGTERM when the thread that started it
    dies. Elsewhere it does nothing, and the parent's own clean-up is all there is.
    """
    import ctypes

    pr_set_pdeathsig = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


#: Signals whose Python handlers raise (SystemExit from the SIGTERM handlers of `dfmod bench` and `dfmod up`,
#: KeyboardInterrupt): blocked in the parent while :func:`start_child` forks.
HELD_WHILE_FORKING = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP})


def _in_the_child(mask: set, parent_pid: int, own_process_group: bool) -> None:  # pragma: no cover - child
    die_with_parent()
    if os.getppid() != parent_pid:  # the parent died before the line above: nobody would send the signal
        os._exit(1)
    if own_process_group:
        os.setpgrp()
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # the parent's mask from before start_child held signals


def start_child(args: list[str], *, own_process_group: bool = False, **popen_kwargs) -> subprocess.Popen:
    """``subprocess.Popen(args, **popen_kwargs)`` for a child that stops with its parent, even one killed by
    SIGKILL (Linux), optionally in a process group of its own (a Ctrl-C in the terminal then reaches only the
    parent, which stops its children in order).

    On Linux the parent's :data:`HELD_WHILE_FORKING` signals wait while it forks, and one that came meanwhile
    is handled once the child exists; if its handler raises, the child is killed before the exception goes on.
    Why: with a ``preexec_fn`` (which ``PR_SET_PDEATHSIG`` needs), CPython runs the interpreter's at-fork hooks
    around the fork, logging's among them (it takes its module lock before the fork and gives it back after).
    A handler that raises inside one of them has its exception printed as "ignored" and dropped, and the
    lock can stay taken: the process neither exits nor logs again. A `dfmod bench` sent SIGTERM as it
    started a worker hung that way, its upload threads waiting for the lock (CI, 2026-12-06).
    """
    if not sys.platform.startswith("linux"):
        return subprocess.Popen(args, start_new_session=own_process_group, **popen_kwargs)
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, HELD_WHILE_FORKING)
    process = None
    try:
        process = subprocess.Popen(
            args, preexec_fn=functools.partial(_in_the_child, mask, os.getpid(), own_process_group), **popen_kwargs
        )
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # a held signal's handler runs here
    except BaseException:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        if process is not None:
            process.kill()
            process.wait()
        raise
    return process


def stop_child(process: subprocess.Popen, timeout_s: float, signum: int = signal.SIGTERM) -> None:
    """Send ``signum`` to a child still running, wait up to ``timeout_s`` for it to exit, else kill it; always
    reaped on return."""
    if process.poll() is not None:
        return
    process.send_signal(signum)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


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
    process = start_child(moto_command(port, server), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_child(process, timeout_s=10)
