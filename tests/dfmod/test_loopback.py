"""dfmod.loopback.start_child: children that stop with their parent, and a parent that can always be stopped."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import uuid

import psutil
import pytest

from dfmod.loopback import start_child, stop_child
from tests.utils.processes import REPO_ROOT

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")


def _alive_with(marker: str) -> list[psutil.Process]:
    """The processes whose last argument is ``marker`` (the children below; their parents only mention it)."""
    found = []
    for process in psutil.process_iter():
        try:
            if process.cmdline()[-1:] == [marker]:
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def test_a_sigterm_that_arrives_while_the_child_is_forked_still_stops_the_parent_and_the_child():
    """The SIGTERM is sent from inside an at-fork hook, where CPython used to run the parent's handler: its
    SystemExit was dropped as "ignored" and the parent went on (a bench stopped by CI hung that way, holding
    logging's lock). Held while forking, it is handled once the child exists, and the child is killed."""
    marker = f"dfmod-test-child-{uuid.uuid4().hex}"
    parent = textwrap.dedent(f"""
        import logging, os, signal, sys
        from dfmod.loopback import start_child, stop_child
        signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
        os.register_at_fork(before=lambda: os.kill(os.getpid(), signal.SIGTERM))
        start_child([sys.executable, "-c", "import time; time.sleep(120)", "{marker}"])
        logging.getLogger("parent").warning("the parent went on after its SIGTERM")
    """)
    done = subprocess.run([sys.executable, "-c", parent], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 128 + signal.SIGTERM, done.stderr
    assert "ignored" not in done.stderr and "went on" not in done.stderr, done.stderr
    assert not _alive_with(marker)


def test_the_child_can_be_stopped_and_gets_its_own_process_group_when_asked():
    """The signals held while forking are not held in the child: SIGTERM stops it."""
    for own_group in (False, True):
        child = start_child([sys.executable, "-c", "import time; time.sleep(120)"], own_process_group=own_group)
        try:
            assert (os.getpgid(child.pid) == child.pid) is own_group
            child.terminate()
            assert child.wait(timeout=30) == -signal.SIGTERM
        finally:
            if child.poll() is None:
                child.kill()
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == set()  # and the parent's own mask is as it was


def test_a_child_stops_when_its_parent_is_killed():
    marker = f"dfmod-test-orphan-{uuid.uuid4().hex}"
    parent = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from dfmod.loopback import start_child, stop_child
            start_child([sys.executable, "-c", "import time; time.sleep(120)", "{marker}"])
            print("started", flush=True)
            time.sleep(120)
        """)],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert parent.stdout.readline().strip() == "started"
        assert len(_alive_with(marker)) == 1
        parent.kill()
        parent.wait(timeout=30)
        _, alive = psutil.wait_procs(_alive_with(marker), timeout=30)
        assert not alive, alive
    finally:
        if parent.poll() is None:
            parent.kill()


def test_stop_child_signals_then_kills_a_child_that_ignores_it_and_reaps_it():
    ignores_sigterm = "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print(1, flush=True); time.sleep(120)"
    child = start_child([sys.executable, "-c", ignores_sigterm], stdout=subprocess.PIPE)
    try:
        assert child.stdout.readline() == b"1\n"  # its handler is in place
        stop_child(child, timeout_s=1)
        assert child.returncode == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
    obeys = start_child([sys.executable, "-c", "import time; time.sleep(120)"])
    stop_child(obeys, timeout_s=30, signum=signal.SIGINT)
    assert obeys.returncode != -signal.SIGKILL and obeys.returncode is not None
    stop_child(obeys, timeout_s=30)  # an exited child: nothing to do
