"""dfmod's one error type: what went wrong (a code and a message) and how the HTTP API answers it.

Core modules (storage, imaging, keys, review, lifecycle) raise subclasses of :class:`DfmodError`; the API
renders every one of them with a single exception handler (``api/errors.py``) as
``{"error": CODE, "message": TEXT}`` with the error's HTTP status and headers. A code means the same
thing, with the same status, wherever it is raised. Workers and the CLI read ``code`` and ``message`` too.
"""

from __future__ import annotations

#: Seconds a client should wait before retrying after a 503 (an outage of the database, broker or storage).
RETRY_AFTER_S = 5


class DfmodError(Exception):
    """A failure with a machine-readable ``code``, a human ``message`` and the HTTP status it answers with."""

    code: str = "error"
    http_status: int = 400

    def __init__(
        self, message: str, *, code: str | None = None, http_status: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if http_status is not None:
            self.http_status = http_status
        self.headers = dict(headers or {})
        if self.http_status == 503:
            self.headers.setdefault("Retry-After", str(RETRY_AFTER_S))

    def __str__(self) -> str:
        return self.message


class NotFound(DfmodError):
    code = "not_found"
    http_status = 404


class Conflict(DfmodError):
    code = "conflict"
    http_status = 409


class Unavailable(DfmodError):
    """A dependency (database, broker, storage) is down for now: 503 with ``Retry-After``."""

    code = "unavailable"
    http_status = 503


def database_unavailable(exc: BaseException) -> Unavailable:
    """The error an outage of the database (``OperationalError`` and kin) becomes."""
    first_line = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
    return Unavailable(f"the database is unavailable ({first_line}); try again shortly", code="database_unavailable")
