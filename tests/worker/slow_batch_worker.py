"""``dfmod worker`` whose every batch takes ``DFMOD_TEST_SLOW_BATCH_S`` seconds longer, for the liveness and
in-flight tests: the delay sits inside the batch hook (:func:`worker.liveness.batch_in_progress`), where a
slow model, a slow S3 or a stuck CUDA call would hold a real batch. Run as a script, never imported."""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager

from worker import liveness

_real_batch_in_progress = liveness.batch_in_progress
_delay_s = float(os.environ["DFMOD_TEST_SLOW_BATCH_S"])


@contextmanager
def _slow_batch_in_progress():
    with _real_batch_in_progress():
        time.sleep(_delay_s)
        yield


liveness.batch_in_progress = _slow_batch_in_progress

if __name__ == "__main__":
    from dfmod.cli import app

    sys.exit(app(["worker", *sys.argv[1:]]))
