"""The per-route body limit answers 413 before the application (auth, multipart spooling) sees the body."""

from __future__ import annotations

import asyncio
import json

from fastapi.testclient import TestClient

from api.body_limit import BodyLimitMiddleware, RouteLimit, route_limits
from api.main import create_app
from dfmod.settings import Settings


def _call(middleware, method: str, path: str, headers: list[tuple[bytes, bytes]], chunks: list[bytes]):
    sent, received = [], []
    pending = [{"type": "http.request", "body": chunk, "more_body": i < len(chunks) - 1} for i, chunk in enumerate(chunks)]

    async def receive():
        message = pending.pop(0) if pending else {"type": "http.disconnect"}
        received.append(message)
        return message

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "headers": headers}
    asyncio.run(middleware(scope, receive, send))
    return sent, received


class _ReadsEverything:
    """Stands in for FastAPI: reads the whole body, then answers 200 (a real app would check the key after)."""

    def __init__(self) -> None:
        self.called = False

    async def __call__(self, scope, receive, send):
        self.called = True
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def test_a_declared_length_over_the_limit_is_refused_without_reading_or_calling_the_app():
    app = _ReadsEverything()
    middleware = BodyLimitMiddleware(app, [RouteLimit("POST", "/v1/images", 1000)], default=100)
    sent, received = _call(middleware, "POST", "/v1/images", [(b"content-length", str(4 * 1024**3).encode())], [b"x"])
    assert not app.called and received == []
    assert sent[0]["status"] == 413
    assert json.loads(sent[1]["body"])["error"] == "too_large"


def test_a_streamed_body_is_cut_off_once_it_passes_the_limit():
    app = _ReadsEverything()
    middleware = BodyLimitMiddleware(app, [RouteLimit("POST", "/v1/images", 1000)], default=100)
    sent, received = _call(middleware, "POST", "/v1/images", [], [b"x" * 600] * 10)
    assert sent[0]["status"] == 413
    assert len(received) == 2  # stopped reading at the chunk that crossed the limit
    # Under the limit, the app runs as usual; other routes get the small default.
    ok, _ = _call(BodyLimitMiddleware(_ReadsEverything(), [RouteLimit("POST", "/v1/images", 1000)]), "POST", "/v1/images", [], [b"x" * 900])
    assert ok[0]["status"] == 200
    small, _ = _call(BodyLimitMiddleware(_ReadsEverything(), [], default=100), "POST", "/v1/keys", [], [b"x" * 101])
    assert small[0]["status"] == 413


def test_the_api_refuses_an_oversized_body_before_checking_the_key(tmp_path):
    settings = Settings(data_dir=tmp_path, max_upload_bytes=10_000)
    from dfmod import migrate

    migrate.upgrade(settings)
    limits = {rule.path_prefix: rule.max_bytes for rule in route_limits(settings.max_upload_bytes)}
    with TestClient(create_app(settings)) as client:
        # No key at all: a small body is a 401, a big one is refused for its size before auth runs.
        assert client.post("/v1/images", files={"file": ("a.jpg", b"x" * 100)}).status_code == 401
        big = client.post("/v1/images", files={"file": ("a.jpg", b"x" * (limits["/v1/images"] + 1))})
        assert big.status_code == 413 and big.json()["error"] == "too_large"

        def stream():
            for _ in range(100):
                yield b"y" * 1024

        streamed = client.post("/v1/keys", content=stream(), headers={"content-type": "application/json"})
        assert streamed.status_code == 413 and streamed.json()["error"] == "too_large", streamed.text
