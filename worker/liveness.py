"""Worker liveness: a heartbeat that only a working consumer can keep fresh, and the check the probe runs.

A probe on ``/metrics`` proves only that the metrics thread answers; a wedged consuming loop or a batch stuck
in a CUDA call still gets 200. So liveness is read from files in ``Settings.heartbeat_dir`` instead:

* ``loop``: touched by a timer on the consumer's own event loop (:class:`LoopHeartbeatStep`). The timer fires
  between polls, so it goes stale when the loop stops turning: a frozen process, a deadlocked consumer, or a
  solo-pool batch (which runs on the loop) that never ends. It is also touched when a batch ends.
* ``batch-<id>``: created when a batch starts and removed when it ends (:func:`batch_in_progress`), so a batch
  stuck in a pool thread (threads pool, whose loop keeps turning) is seen too.

:func:`check` (``dfmod worker-alive --max-age S``, the chart's exec livenessProbe) fails when the loop beat
is older than ``max_age_s`` or a batch has run longer than that. Choose ``max_age_s`` above the longest
batch a healthy worker runs (``dfmod_batch_seconds``) and above the beat interval.

With the embedded (filesystem) broker Celery has no event loop and its timer runs in a thread of its own, so
the ``loop`` file proves less there; ``dfmod up`` does not use liveness probes.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

LOOP_FILE = "loop"
BATCH_PREFIX = "batch-"


def _touch(path: Path) -> None:
    now = time.time()
    try:
        os.utime(path, (now, now))
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()


class Heartbeat:
    """Writes the heartbeat files of one worker process."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        # Leftovers of a previous process in the same directory would read as a batch stuck for ever.
        for stale in self.directory.glob(f"{BATCH_PREFIX}*"):
            stale.unlink(missing_ok=True)

    def beat(self) -> None:
        _touch(self.directory / LOOP_FILE)

    @contextmanager
    def batch(self) -> Iterator[None]:
        marker = self.directory / f"{BATCH_PREFIX}{uuid.uuid4().hex}"
        _touch(marker)
        try:
            yield
        finally:
            marker.unlink(missing_ok=True)
            self.beat()


_current: Heartbeat | None = None


def install(directory: Path) -> Heartbeat:
    """Make ``directory`` this process's heartbeat; the loop step and the batch hook write there."""
    global _current
    _current = Heartbeat(directory)
    _current.beat()
    return _current


@contextmanager
def batch_in_progress() -> Iterator[None]:
    """Wrap one batch: marks it in flight and beats when it ends (a no-op when no heartbeat is installed)."""
    if _current is None:
        yield
        return
    with _current.batch():
        yield


def loop_heartbeat_step(interval_s: float):
    """A Celery consumer bootstep that beats every ``interval_s`` on the consumer's event-loop timer.

    Started again after every broker reconnection (Celery restarts consumer steps, and clears its timer), so
    the beat never silently stops the way a one-off timer would.
    """
    from celery import bootsteps

    class LoopHeartbeatStep(bootsteps.StartStopStep):
        requires = {"celery.worker.consumer.tasks:Tasks"}

        def __init__(self, parent, **kwargs):
            super().__init__(parent, **kwargs)
            self._tref = None

        def start(self, consumer):
            if _current is None:
                return
            _current.beat()
            self._tref = consumer.timer.call_repeatedly(interval_s, _current.beat, priority=10)

        def stop(self, consumer):
            if self._tref is not None:
                self._tref.cancel()
                self._tref = None

        shutdown = stop

    return LoopHeartbeatStep


@dataclass(frozen=True)
class Verdict:
    alive: bool
    reason: str


def check(directory: Path, max_age_s: float, now: float | None = None) -> Verdict:
    """Alive when the loop beat is at most ``max_age_s`` old and no batch has run longer than that."""
    directory = Path(directory)
    now = time.time() if now is None else now
    try:
        loop_age = now - (directory / LOOP_FILE).stat().st_mtime
    except FileNotFoundError:
        return Verdict(False, f"no heartbeat in {directory}: the worker has not started consuming")
    if loop_age > max_age_s:
        return Verdict(False, f"consumer loop silent for {loop_age:.1f} s (limit {max_age_s:g} s)")
    oldest = 0.0
    for marker in directory.glob(f"{BATCH_PREFIX}*"):
        try:
            oldest = max(oldest, now - marker.stat().st_mtime)
        except FileNotFoundError:
            continue  # the batch ended while we looked
    if oldest > max_age_s:
        return Verdict(False, f"a batch has run for {oldest:.1f} s (limit {max_age_s:g} s)")
    return Verdict(True, f"loop beat {loop_age:.1f} s ago, longest batch in flight {oldest:.1f} s")
