"""Fault injectors for recovery tests, without touching the machine's shared Postgres and Redis.

* :class:`TcpProxy` sits between a process and a service on loopback. ``drop()`` resets every open
  connection and refuses new ones (what clients see while a database restarts), ``restore()`` listens
  again on the same port; ``stall()`` keeps connections open but forwards nothing (a hung server).
* :class:`PrivateRedis` is a ``redis-server`` of the test's own on a free port, restartable empty.
* :class:`PrivatePostgres` is a throwaway cluster (initdb + pg_ctl) on a free port, restartable.
* :class:`StallableS3` is a moto S3 server whose process can be stopped and continued (SIGSTOP/SIGCONT).
* :class:`RedisUserWithout` is an ACL user of the shared Redis that may run every command but the named
  ones: a broker that refuses one step (an ack, a publish, a registration) while the rest works.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from glob import glob
from pathlib import Path

from dfmod.loopback import free_port, moto_command, start_child, wait_for_port


def _reset(sock: socket.socket) -> None:
    """Close with RST, as a killed server's kernel would (SO_LINGER 0), and wake the threads blocked on it.

    ``close()`` alone frees the descriptor but not the connection while a pump thread is blocked in
    ``recv()`` on it: the kernel closes it only when that call returns. A reply lost in the drop would then
    leave the client waiting forever on a connection that looks open. ``shutdown()`` ends those calls first.
    """
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


class TcpProxy:
    """A byte-forwarding proxy 127.0.0.1:``port`` -> ``target_host``:``target_port``."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._stalled = threading.Event()
        self.accepted = 0
        self.restore()

    def restore(self) -> None:
        """Accept connections again (after :meth:`drop`) and forward bytes (after :meth:`stall`)."""
        self._stalled.clear()
        with self._lock:
            if self._listener is not None:
                return
            listener = socket.socket()
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", self.port))
            listener.listen(64)
            self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def drop(self) -> None:
        """Reset every open connection and refuse new ones, like a server that went down."""
        with self._lock:
            listener, self._listener = self._listener, None
            sockets, self._sockets = self._sockets, set()
        if listener is not None:
            try:
                listener.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept(); close() alone would not
            except OSError:
                pass
            listener.close()
        for sock in sockets:
            _reset(sock)

    def stall(self) -> None:
        """Keep connections open but forward nothing, like a server that stopped answering."""
        self._stalled.set()

    def close(self) -> None:
        self.drop()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed by drop()
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                dropped = self._listener is not listener  # drop() ran while this one was being connected
                if not dropped:
                    self._sockets.update((client, upstream))
                    self.accepted += 1
            if dropped:
                _reset(client)
                _reset(upstream)
                return
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                while self._stalled.is_set():
                    time.sleep(0.05)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


class PrivateRedis:
    """A ``redis-server`` on a free loopback port, without persistence: a restart comes back empty."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed")
        self.binary = binary
        self.workdir = workdir
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = start_child(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port, timeout=10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def restart(self, down_s: float = 0.0) -> None:
        self.stop()
        time.sleep(down_s)
        self.start()


class PrivatePostgres:
    """A throwaway cluster (initdb + pg_ctl) on a free loopback port; restartable."""

    def __init__(self) -> None:
        initdb = sorted(glob("/usr/lib/postgresql/*/bin/initdb"))
        if not initdb and not shutil.which("initdb"):
            raise RuntimeError("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
        self.bin = Path(initdb[-1]).parent if initdb else Path(shutil.which("initdb")).parent
        self.dir = Path(tempfile.mkdtemp(prefix="dfmod-faults-pg-"))
        self.port = free_port()
        self.run_as: list[str] = []
        if os.geteuid() == 0:  # the server refuses to run as root
            shutil.chown(self.dir, "postgres")
            self.run_as = ["runuser", "-u", "postgres", "--"]
        self._run("initdb", "-D", str(self.dir), "-A", "trust", "-U", "postgres")
        self.start()

    def _run(self, tool: str, *args: str) -> None:
        subprocess.run([*self.run_as, str(self.bin / tool), *args], check=True, capture_output=True, timeout=120)

    def _pg_ctl(self, *args: str) -> None:
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run("pg_ctl", "-D", str(self.dir), "-o", options, "-l", str(self.dir / "log"), "-w", *args)

    def start(self) -> None:
        self._pg_ctl("start")

    def restart(self) -> None:
        self._pg_ctl("restart", "-m", "fast")

    def stop(self) -> None:
        try:
            self._pg_ctl("stop", "-m", "immediate")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"


class StallableS3:
    def __init__(self) -> None:
        self.port = free_port()
        self.process = start_child(moto_command(self.port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port)
        self.url = f"http://127.0.0.1:{self.port}"

    def _signal_all(self, signum: int) -> None:
        """The server and its children (granian serves from a worker process)."""
        import psutil

        for process in [psutil.Process(self.process.pid), *psutil.Process(self.process.pid).children(recursive=True)]:
            try:
                process.send_signal(signum)
            except psutil.NoSuchProcess:
                pass

    def stall(self, seconds: float) -> None:
        self._signal_all(signal.SIGSTOP)
        try:
            time.sleep(seconds)
        finally:
            self._signal_all(signal.SIGCONT)

    def stop(self) -> None:
        self._signal_all(signal.SIGCONT)
        self.process.terminate()
        self.process.wait(timeout=20)


class RedisUserWithout:
    """A Redis ACL user allowed every command but ``denied`` (e.g. ``"zrem"``); ``url`` connects as it.

    A context manager: the user is deleted on exit. ``allow_everything()`` lifts the restriction early (so
    that clean-up through the same user, such as kombu restoring unacked messages, can work).
    """

    def __init__(self, redis_url: str, name: str, *denied: str) -> None:
        import redis

        self.admin = redis.Redis.from_url(redis_url)
        self.name = name
        host, database = redis_url.rsplit("/", 1)
        self.url = host.replace("redis://", f"redis://{name}:pw@") + f"/{database}"
        self._set("+@all", *(f"-{command}" for command in denied))

    def _set(self, *commands: str) -> None:
        self.admin.acl_setuser(self.name, enabled=True, passwords=["+pw"], keys=["*"], channels=["*"],
                               commands=list(commands), reset=True)

    def allow_everything(self) -> None:
        self._set("+@all")

    def __enter__(self) -> RedisUserWithout:
        return self

    def __exit__(self, *_exc) -> None:
        self.admin.acl_deluser(self.name)
        self.admin.close()
