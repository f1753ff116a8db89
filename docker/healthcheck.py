"""Container HEALTHCHECK for the dfmod image (Docker/Podman; Kubernetes uses the chart's probes).

One image runs several roles, so the check asks the endpoint of the role that is running:
``dfmod api`` serves ``/healthz`` on port 8000 and ``dfmod worker`` serves ``/metrics`` on
``DFMOD_METRICS_PORT`` (default 9100). The container is healthy when either answers 200.
``DFMOD_HEALTHCHECK_URL`` replaces both with one URL. Standard library only: no curl in the image.
"""

from __future__ import annotations

import os
import sys
import urllib.request


def main() -> int:
    override = os.environ.get("DFMOD_HEALTHCHECK_URL")
    if override:
        urls = [override]
    else:
        api_port = os.environ.get("DFMOD_API_PORT", "8000")
        metrics_port = os.environ.get("DFMOD_METRICS_PORT") or "9100"
        urls = [f"http://127.0.0.1:{api_port}/healthz", f"http://127.0.0.1:{metrics_port}/metrics"]
    for url in urls:
        try:
            with urllib.request.urlopen(url, timeout=3) as response:  # noqa: S310 - loopback only
                if response.status == 200:
                    return 0
        except OSError:
            continue
    print(f"unhealthy: no answer from {', '.join(urls)}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
