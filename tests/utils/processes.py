"""Real dfmod processes for integration tests, started with their own environment and stopped by any signal."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

from dfmod.loopback import free_port, start_child, stop_child, wait_for_port

REPO_ROOT = Path(__file__).resolve().parents[2]


class WorkerProcess:
    """A real ``dfmod worker`` subprocess with its own environment; killable with any signal."""

    def __init__(self, env: dict, log_path: Path) -> None:
        self.env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    def command(self) -> list[str]:
        """The command line; subclasses run a variant of the worker (e.g. one with slow batches)."""
        return [sys.executable, "-m", "dfmod", "worker", "--hostname", f"test-{uuid.uuid4().hex[:6]}@%h"]

    def start(self) -> WorkerProcess:
        log = open(self.log_path, "ab")
        self.process = start_child(
            self.command(), env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
        )
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"worker exited at start:\n{self.log()}")
            if b" ready." in self.log_path.read_bytes():
                return self
            time.sleep(0.2)
        raise TimeoutError(f"worker not ready:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def stop(self, sig: int = 15, timeout: float = 30) -> None:
        if self.process:
            stop_child(self.process, timeout, sig)


class ApiProcess:
    """A real ``dfmod api`` subprocess on a free loopback port; ``url`` is its base URL."""

    def __init__(self, env: dict, log_path) -> None:
        self.port = free_port()
        self.log_path = log_path
        self.log = open(log_path, "ab")
        self.process = start_child(
            [sys.executable, "-m", "dfmod", "api", "--port", str(self.port), "--log-level", "warning"],
            env={**os.environ, **env, "PYTHONUNBUFFERED": "1"}, stdout=self.log, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
        )
        wait_for_port(self.port, timeout=60)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        stop_child(self.process, timeout_s=20)
        self.log.close()
