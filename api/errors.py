"""One JSON error shape for every failure, ``{"error": CODE, "message": TEXT}``, made by one handler.

Endpoints and the core raise :class:`dfmod.errors.DfmodError` (or a subclass: storage, imaging, keys,
review); request validation, routing errors, database outages and bugs are turned into one here, so
every answer that is not a success has the same shape, and an outage is a 503 with ``Retry-After``,
never a bare 500.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import InterfaceError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from dfmod.errors import DfmodError, database_unavailable

logger = logging.getLogger(__name__)

_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}


def as_dfmod_error(exc: Exception) -> DfmodError:
    """The :class:`DfmodError` an exception answers as."""
    if isinstance(exc, DfmodError):
        return exc
    if isinstance(exc, RequestValidationError):
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error.get('loc', ()))}: {error.get('msg')}" for error in exc.errors()
        )
        return DfmodError(problems, code="invalid_request", http_status=422)
    if isinstance(exc, StarletteHTTPException):
        return DfmodError(
            str(exc.detail), code=_HTTP_CODES.get(exc.status_code, "http_error"), http_status=exc.status_code,
            headers=dict(exc.headers or {}),
        )
    if isinstance(exc, (OperationalError, InterfaceError)):
        logger.warning("database unavailable: %s", exc)
        return database_unavailable(exc)
    return DfmodError("an unexpected error occurred; it has been logged", code="internal_error", http_status=500)


def _printable(text: str) -> str:
    """Text that encodes as UTF-8: messages may quote hostile input (a lone surrogate would make a 500)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


async def render_error(_request: Request, exc: Exception) -> JSONResponse:
    error = as_dfmod_error(exc)
    return JSONResponse(
        {"error": error.code, "message": _printable(error.message)[:2000]}, status_code=error.http_status,
        headers=error.headers or None,
    )


def install_error_handlers(app: FastAPI) -> None:
    """Route every kind of failure through :func:`render_error`."""
    for kind in (DfmodError, RequestValidationError, StarletteHTTPException, OperationalError, InterfaceError, Exception):
        app.add_exception_handler(kind, render_error)
