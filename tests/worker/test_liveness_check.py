"""The liveness rule itself (worker.liveness.check), on heartbeat files with chosen ages: no worker process."""

from __future__ import annotations

import os
import time

import pytest

from worker import liveness
from worker.liveness import BATCH_PREFIX, LOOP_FILE, Heartbeat, check


def _age(path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_no_heartbeat_means_not_started(tmp_path):
    verdict = check(tmp_path / "missing", 30)
    assert not verdict.alive and "not started consuming" in verdict.reason


def test_fresh_loop_and_short_batch_are_alive(tmp_path):
    heartbeat = Heartbeat(tmp_path)
    heartbeat.beat()
    with heartbeat.batch():
        marker = next(tmp_path.glob(f"{BATCH_PREFIX}*"))
        _age(marker, 10)
        assert check(tmp_path, 30).alive
    assert not list(tmp_path.glob(f"{BATCH_PREFIX}*"))  # the marker goes with the batch


def test_silent_loop_fails(tmp_path):
    Heartbeat(tmp_path).beat()
    _age(tmp_path / LOOP_FILE, 31)
    verdict = check(tmp_path, 30)
    assert not verdict.alive and "silent for 31" in verdict.reason


def test_a_batch_stuck_in_a_pool_thread_fails_while_the_loop_beats(tmp_path):
    heartbeat = Heartbeat(tmp_path)
    with heartbeat.batch():
        heartbeat.beat()  # the threads pool's loop keeps turning
        _age(next(tmp_path.glob(f"{BATCH_PREFIX}*")), 45)
        verdict = check(tmp_path, 30)
    assert not verdict.alive and "a batch has run for 45" in verdict.reason


def test_a_failed_batch_still_clears_its_marker_and_beats(tmp_path):
    heartbeat = Heartbeat(tmp_path)  # no beat yet
    with pytest.raises(RuntimeError), heartbeat.batch():
        raise RuntimeError("decode failed")
    assert not list(tmp_path.glob(f"{BATCH_PREFIX}*"))
    assert check(tmp_path, 5).alive


def test_markers_of_a_previous_process_are_cleared(tmp_path):
    (tmp_path / f"{BATCH_PREFIX}left-by-a-killed-worker").touch()
    _age(tmp_path / f"{BATCH_PREFIX}left-by-a-killed-worker", 1000)
    liveness.install(tmp_path)
    try:
        assert check(tmp_path, 30).alive
    finally:
        liveness._current = None


def test_batch_hook_is_a_no_op_without_a_heartbeat(tmp_path):
    liveness._current = None
    with liveness.batch_in_progress():
        pass
    assert not list(tmp_path.iterdir())
