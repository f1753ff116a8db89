"""Per-key rate limits (uploads, and every other keyed request), shared by every API replica through Redis.

Built on the `limits` library (moving windows, its Redis storage): counters live under the API key's id, so
a platform's keys are limited one by one whichever replica serves them. Off unless
``DFMOD_RATE_LIMIT_UPLOADS`` / ``DFMOD_RATE_LIMIT_READS`` are set (``dfmod up`` sets neither). A refused
request gets ``429 rate_limited`` with ``Retry-After``. If the counters' store is unreachable, requests
pass (logged): a limiter outage must not become an API outage.
"""

from __future__ import annotations

import logging
import math
import time

from fastapi import status

from dfmod.errors import DfmodError
from dfmod.settings import Settings

logger = logging.getLogger(__name__)

UPLOADS = "uploads"
READS = "reads"


class RateLimiter:
    def __init__(self, settings: Settings) -> None:
        from limits import parse_many

        self.rules = {
            kind: parse_many(value)
            for kind, value in ((UPLOADS, settings.rate_limit_uploads), (READS, settings.rate_limit_reads))
            if value
        }
        self._strategy = None
        if self.rules:
            from limits.storage import storage_from_string
            from limits.strategies import MovingWindowRateLimiter

            self._strategy = MovingWindowRateLimiter(storage_from_string(settings.resolved_rate_limit_storage_url))

    @property
    def enabled(self) -> bool:
        return self._strategy is not None

    def hit(self, kind: str, key_id: str) -> None:
        """Count one request of ``kind`` for ``key_id``; raise a 429 :class:`DfmodError` when over a limit."""
        if self._strategy is None or kind not in self.rules:
            return
        for rule in self.rules[kind]:
            try:
                allowed = self._strategy.hit(rule, "dfmod", kind, key_id)
                if allowed:
                    continue
                reset = self._strategy.get_window_stats(rule, "dfmod", kind, key_id).reset_time
            except Exception:  # fail open: the limiter's store is an optimisation, not the API
                logger.warning("rate-limit store unavailable; request let through", exc_info=True)
                return
            retry_after = max(1, math.ceil(reset - time.time()))
            raise DfmodError(
                f"this key made more than {rule} {kind} requests; retry in {retry_after} s",
                code="rate_limited", http_status=status.HTTP_429_TOO_MANY_REQUESTS,
                headers={"Retry-After": str(retry_after)},
            )
