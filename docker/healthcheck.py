"""Container HEALTHCHECK for the dfmod image (Docker/Podman; Kubernetes uses the chart's probes).

One image runs several roles, so the check asks the role that is running. A worker keeps a heartbeat
(``DFMOD_HEARTBEAT_DIR``, default ``DFMOD_DATA_DIR/heartbeat``; see :mod:`worker.liveness`): where one exists,
the container is healthy while the consuming loop beat within ``DFMOD_HEALTHCHECK_MAX_AGE_S`` (120) seconds
and no batch has run longer; a metrics endpoint would answer even with the consumer hung. Otherwise
``dfmod api`` must answer ``/healthz`` on port 8000 (or the worker ``/metrics`` on ``DFMOD_METRICS_PORT``,
before its first beat). ``DFMOD_HEALTHCHECK_URL`` replaces all of it with one URL. No curl in the image.
"""

from __future__ import annotations

import os
import sys
import urllib.request
from pathlib import Path


def _heartbeat_dir() -> Path:
    explicit = os.environ.get("DFMOD_HEARTBEAT_DIR")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("DFMOD_DATA_DIR", "dfmod-data")) / "heartbeat"


def main() -> int:
    override = os.environ.get("DFMOD_HEALTHCHECK_URL")
    heartbeat = _heartbeat_dir()
    if not override and (heartbeat / "loop").exists():
        from worker.liveness import check

        verdict = check(heartbeat, float(os.environ.get("DFMOD_HEALTHCHECK_MAX_AGE_S", "120")))
        if not verdict.alive:
            print(f"unhealthy: {verdict.reason}", file=sys.stderr)
        return 0 if verdict.alive else 1
    if override:
        urls = [override]
    else:
        api_port = os.environ.get("DFMOD_API_PORT", "8000")
        metrics_port = os.environ.get("DFMOD_METRICS_PORT") or "9100"
        urls = [f"http://127.0.0.1:{api_port}/healthz", f"http://127.0.0.1:{metrics_port}/metrics"]
    for url in urls:
        try:
            with urllib.request.urlopen(url, timeout=3) as response:  # loopback only
                if response.status == 200:
                    return 0
        except OSError:
            continue
    print(f"unhealthy: no answer from {', '.join(urls)}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
