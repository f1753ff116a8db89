"""A per-route cap on request bodies, enforced at the ASGI layer before anything reads the body.

FastAPI parses a request's body (spooling multipart files to disk, JSON into memory) before the route's
dependencies run, so without this a 4 GB POST with no key would be read in full before the key check
answered 401. This middleware sits outside the application:

* a ``Content-Length`` over the route's limit is answered ``413 too_large`` at once, and the body is
  never read, whatever the credentials;
* a body without a length (chunked) is counted as it streams; the request is cut off with the same 413
  as soon as it passes the limit, so at most the limit (plus one chunk) is ever buffered.

Limits are chosen by method and path prefix (:func:`route_limits`); anything not listed gets the small
default, enough for every JSON body the API takes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

DEFAULT_LIMIT = 64 * 1024
# Multipart framing around an upload: boundaries, part headers and the form's other fields.
MULTIPART_OVERHEAD = 64 * 1024
EVENTS_LIMIT = 2 * 1024 * 1024


@dataclass(frozen=True)
class RouteLimit:
    method: str
    path_prefix: str
    max_bytes: int


def route_limits(max_upload_bytes: int) -> list[RouteLimit]:
    """The API's body limits: uploads get the image limit, S3 notifications a few MB, the rest 64 KiB."""
    return [
        RouteLimit("POST", "/v1/images:register", DEFAULT_LIMIT),
        RouteLimit("POST", "/v1/images", max_upload_bytes + MULTIPART_OVERHEAD),
        RouteLimit("POST", "/v1/events/s3", EVENTS_LIMIT),
    ]


class _BodyTooLarge(HTTPException):
    """Raised from ``receive`` to stop whoever is reading the body. An HTTPException, so where it reaches the
    error handler unwrapped it already answers ``413 too_large``; elsewhere the middleware's send rewrites
    the response."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body exceeds this endpoint's limit of {limit} bytes")


def _too_large_body(limit: int) -> bytes:
    return json.dumps(
        {"error": "too_large", "message": f"the request body exceeds this endpoint's limit of {limit} bytes"}
    ).encode()


class BodyLimitMiddleware:
    """Answers 413 (JSON error shape) for bodies over the route's limit, before the app sees them."""

    def __init__(self, app: ASGIApp, limits: list[RouteLimit], default: int = DEFAULT_LIMIT) -> None:
        self.app = app
        self.limits = limits
        self.default = default

    def limit_for(self, method: str, path: str) -> int:
        for rule in self.limits:
            if method == rule.method and (path == rule.path_prefix or path.startswith(rule.path_prefix + "/")):
                return rule.max_bytes
        return self.default

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["method"], scope["path"])
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await _send_413(send, limit, close=True)
            return

        received = 0
        exceeded = False
        response_started = False

        async def counted_receive() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    exceeded = True
                    raise _BodyTooLarge(limit)
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal response_started
            if exceeded:
                # Whatever the layers in between made of our exception (FastAPI's "error parsing the
                # body" 400, an exception group from a middleware's task group), the answer is our 413.
                if message["type"] == "http.response.start" and not response_started:
                    response_started = True
                    await _send_413(send, limit, close=True)
                return
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:
            # Raised past every error handler: answer 413 if that was the cause and nothing was sent yet.
            if not exceeded or response_started:
                raise
            await _send_413(send, limit, close=True)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _send_413(send: Send, limit: int, close: bool) -> None:
    body = _too_large_body(limit)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        # The unread body is still on the wire: ask the client to stop and drop the connection.
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": 413, "headers": headers})
    await send({"type": "http.response.body", "body": body})
