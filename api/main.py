"""The FastAPI application: ``create_app(settings)`` wires settings, database, storage and the producer.

Run it with ``dfmod api`` (uvicorn) or ``uvicorn --factory api.main:app_from_env``. Start-up never runs
migrations: ``/readyz`` reports an unmigrated database instead, and ops run ``dfmod migrate``.

Also serves the review page (``/review``): static HTML, JS and CSS over the JSON API, no build step; and the
interactive API docs (``/docs``, ``/redoc``) with Swagger UI's and ReDoc's assets from the ``fastapi-offline``
package, so they work where no CDN can be reached.
"""

from __future__ import annotations

import time
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request, Response
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from sqlalchemy import text

from api import admin_routes, ingest_routes, review_routes, tenant_routes
from api.body_limit import BodyLimitMiddleware, route_limits
from api.errors import install_error_handlers
from api.ratelimit import RateLimiter
from dfmod import telemetry
from dfmod.db import make_engine, make_session_factory
from dfmod.queue import make_celery
from dfmod.queue_depth import QueueDepthCollector
from dfmod.settings import Settings
from dfmod.storage import make_storage
from dfmod.tenants import BucketDirectory

STATIC = Path(__file__).resolve().parent / "static"
REVIEW_PAGE = STATIC / "review"
FAVICON = STATIC / "favicon.ico"


@asynccontextmanager
async def _lifespan(app: FastAPI):
    yield
    # Close pooled database connections with the app, rather than whenever the garbage collector gets to them.
    app.state.engine.dispose()
    app.state.queue_depth.close()


def create_app(settings: Settings) -> FastAPI:
    # FastAPI's own /docs and /redoc load their scripts from a CDN (blank offline); these come from the package.
    app = FastAPIOffline(
        title="dfmod",
        version="0.1.0",
        description="Deepfake-image moderation: ingest images, classify them in batched workers, query verdicts.",
        lifespan=_lifespan,
        favicon_url="/favicon.ico",
        static_url="/docs/static",
    )
    app.state.settings = settings
    app.state.engine = make_engine(settings.resolved_database_url, settings.database_pool_size)
    app.state.session_factory = make_session_factory(app.state.engine)
    app.state.buckets = BucketDirectory(settings, app.state.session_factory)
    app.state.storage = make_storage(settings.for_api())
    app.state.storage.bucket_allowed = app.state.buckets.readable
    app.state.celery = make_celery(settings)
    app.state.rate_limiter = RateLimiter(settings)
    app.state.heatmaps_requested = {}
    # Per app, not the global registry: the queue depth is read from this app's broker at scrape time.
    app.state.broker_metrics = CollectorRegistry(auto_describe=False)
    app.state.queue_depth = QueueDepthCollector(settings)
    app.state.broker_metrics.register(app.state.queue_depth)
    install_error_handlers(app)
    app.include_router(ingest_routes.router)
    app.include_router(review_routes.router)
    app.include_router(admin_routes.router)
    app.include_router(tenant_routes.router)
    app.mount("/review/static", StaticFiles(directory=REVIEW_PAGE), name="review-static")

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> FileResponse:
        return FileResponse(FAVICON, media_type="image/x-icon", headers={"Cache-Control": "public, max-age=86400"})

    @app.get("/review", include_in_schema=False)
    def review_page() -> FileResponse:
        # The page holds no data until a reviewer signs in with a key; its scripts come from here only.
        return FileResponse(
            REVIEW_PAGE / "index.html",
            headers={
                "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; "
                "frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
                "X-Content-Type-Options": "nosniff",
                "Referrer-Policy": "no-referrer",
                "Cache-Control": "no-cache",
            },
        )

    @app.get("/review/", include_in_schema=False)
    def review_page_slash() -> RedirectResponse:
        return RedirectResponse("/review")

    @app.middleware("http")
    async def _observe(request: Request, call_next):
        started = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        template = getattr(route, "path", "unmatched")
        telemetry.HTTP_REQUESTS.labels(request.method, template, str(response.status_code)).inc()
        telemetry.HTTP_SECONDS.labels(request.method, template).observe(time.perf_counter() - started)
        return response

    # Outermost: bodies over a route's limit are refused before any other middleware, auth or parsing.
    app.add_middleware(BodyLimitMiddleware, limits=route_limits(settings.max_upload_bytes))

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False)
    def readyz() -> JSONResponse:
        checks = {
            "database": _check_database(app),
            "broker": _check_broker(app),
            "storage": _check_storage(app),
        }
        if settings.ready_requires_worker:
            checks["worker"] = _check_consumers(settings)
        ready = all(value == "ok" for value in checks.values())
        return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)

    @app.get("/metrics", include_in_schema=False)
    def prometheus_metrics() -> Response:
        body = generate_latest() + generate_latest(app.state.broker_metrics)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    return app


def _check_database(app: FastAPI) -> str:
    from dfmod.migrate import SchemaState, head_revision, schema_state

    try:
        with app.state.engine.connect() as connection:
            current = connection.execute(text("SELECT version_num FROM alembic_version")).scalar()
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        return f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:200]} (did you run `dfmod migrate`?)"
    # Only a schema *behind* the code makes a pod unready: a newer release's migrations are backward
    # compatible (expand/contract), so old pods keep serving through a rolling upgrade or a rollback.
    if schema_state(current) is SchemaState.behind:
        return f"error: schema at {current}, code expects {head_revision()}: run `dfmod migrate`"
    return "ok"


def _check_broker(app: FastAPI) -> str:
    try:
        with app.state.celery.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=2)
    except Exception as exc:  # noqa: BLE001
        return f"error: {type(exc).__name__}: {exc}"
    return "ok"


def _check_consumers(settings: Settings) -> str:
    from dfmod.consumers import live_consumers

    try:
        count = live_consumers(settings, settings.queue)
    except Exception as exc:  # noqa: BLE001
        return f"error: {type(exc).__name__}: {exc}"
    return "ok" if count else f"error: no worker is consuming {settings.queue}"


def _check_storage(app: FastAPI) -> str:
    try:
        app.state.storage.check()
    except Exception as exc:  # noqa: BLE001
        return f"error: {type(exc).__name__}: {exc}"
    return "ok"


def app_from_env() -> FastAPI:
    """Factory for ``uvicorn --factory api.main:app_from_env``: reads the environment once."""
    return create_app(Settings())
