"""The application factory: wires settings, database, upstream client and routes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from fastapi import FastAPI
from starlette.types import Receive, Scope, Send

from app import __version__
from app.accounting import limits, pricing
from app.admin.router import router as admin_router
from app.config import Settings
from app.dashboard.router import router as dashboard_router
from app.db import (
    HotReads,
    ReportReads,
    Transactions,
    make_engine,
    make_read_sessionmaker,
    make_sessionmaker,
    schema_is_current,
)
from app.errors import document_problems, install_error_handlers
from app.files.router import router as files_router
from app.foreground import Foreground
from app.jobs.reconciler import Reconciler
from app.logging import configure_logging
from app.middleware import BodySizeLimit
from app.observability import Metrics, RequestContext, RequestIdFilter, RequestIds
from app.observability import router as observability_router
from app.outputs.archiver import OutputArchiver
from app.outputs.router import router as outputs_router
from app.predictions.fastlane import FastLane, FastRoute
from app.predictions.headers import MAX_WAIT_SECONDS
from app.predictions.router import router as predictions_router
from app.predictions.router import streams_router
from app.predictions.service import PredictionService
from app.routes import API_PREFIXES
from app.schema import Base as _all_tables  # noqa: F401  (every table known to the ORM)
from app.serving import Respond
from app.state import GatewayState
from app.storage import LocalStorage
from app.tokens.cache import TokenCache
from app.tokens.service import load_instance_key
from app.upstream.registry import Registry
from app.webhooks.delivery import STOP_TIMEOUT as DELIVERY_STOP_TIMEOUT
from app.webhooks.delivery import Deliverer
from app.webhooks.router import inbound_router as webhooks_inbound_router
from app.webhooks.router import router as webhooks_router

# The Python client 1.x appends /v1 itself, so a base URL that already ends in /v1 asks for these.
_DOUBLED_PREFIXES = ("/replicate/v1/v1/", "/v1/v1/")
log = logging.getLogger(__name__)


class GatewayApp(FastAPI):
    """FastAPI behind the gateway's own front layers: the fast lane, then request ids and counting
    and the body limit, run before the framework's middleware stack, which only what the fast
    lane passes on goes through."""

    fast_lane: FastLane | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        if scope["path"].startswith(_DOUBLED_PREFIXES):
            raw_path = scope.get("raw_path") or scope["path"].encode()
            scope = {**scope, "path": scope["path"].replace("/v1/v1/", "/v1/", 1),
                     "raw_path": raw_path.replace(b"/v1/v1/", b"/v1/", 1)}
        if self.fast_lane is not None:
            scope["app"] = self  # as the framework would, for routes that reach the app's state
            await self.fast_lane(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)

    def openapi(self) -> dict[str, Any]:
        """The framework's document, with its errors described as the problems they are."""
        if self.openapi_schema is None:
            self.openapi_schema = document_problems(super().openapi())
        return self.openapi_schema

    async def framework(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The framework's own handling: its middleware stack, routing and dependencies."""
        await super().__call__(scope, receive, send)

    def drain(self) -> None:
        """The server stops taking requests: open event streams end now (app/serving.py)."""
        gateway = getattr(self.state, "gateway", None)
        if gateway is not None:
            gateway.draining = True

    def fast_route(self, scope: Scope) -> FastRoute | None:
        """The fast lane's route for this HTTP request, if it serves it (app/serving.py)."""
        return None if self.fast_lane is None else self.fast_lane.route(scope)

    async def fast_answer(self, scope: Scope, receive: Receive, route: FastRoute, respond: Respond) -> None:
        """Answer a request `fast_route` matched through `respond`, for a server that sends the
        whole answer itself instead of taking it as ASGI messages."""
        if self.fast_lane is None:
            raise RuntimeError("this app has no fast lane")
        scope["app"] = self
        await self.fast_lane.answer(scope, receive, route, respond)


class SchemaOutOfDate(RuntimeError):
    """The database is not at the migration revision this code expects."""


def _secret_values(settings: Settings) -> list[str]:
    values: list[str] = []
    for upstream in settings.effective_upstreams():
        values.append(upstream.url)
        token = upstream.resolved_token()
        host = httpx.URL(upstream.url).host
        values += [v for v in (token, host) if v and v != "api.replicate.com"]
    for secret in (settings.admin_token, settings.secret_key,
                   settings.upstream_webhook_secret):
        if secret is not None:
            values.append(secret.get_secret_value())
    values += limits.url_secrets(settings)
    return values


def create_app(
    settings: Settings | None = None,
    *,
    upstream_transport: httpx.AsyncBaseTransport | None = None,
) -> GatewayApp:
    """Build the gateway; `upstream_transport` lets the demo and tests supply the upstream."""
    settings = settings or Settings()
    configure_logging(settings.log_level, _secret_values(settings), RequestIdFilter())
    metrics = Metrics()
    # Counted by the outermost middleware; the reconciler steps aside for what it counts.
    foreground = Foreground()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = make_engine(settings.database_url, pool_size=settings.database_pool_size)
        registry: Registry | None = None
        hot_reads: HotReads | None = None
        report_reads: ReportReads | None = None
        transactions: Transactions | None = None
        redis = limits.connect(settings)
        try:
            if not await schema_is_current(engine):
                raise SchemaOutOfDate(
                    "The database schema is not current; run `replicate-gateway migrate` first"
                )
            for rule in pricing.unestimated(settings.prices):
                log.warning("prices.metered_estimate_reserved", extra={
                    "model": rule.model, "metered_estimate_usd": str(settings.metered_estimate),
                    "detail": "per-second or per-token price with no estimate: each create reserves its "
                              "fixed parts plus GATEWAY_METERED_ESTIMATE"})
            sessions = make_sessionmaker(engine)
            read_sessions = make_read_sessionmaker(engine)
            hot_reads = HotReads(engine, read_sessions)
            report_reads = ReportReads(engine, read_sessions)
            transactions = Transactions(engine, sessions)
            async with sessions() as session:
                key = await load_instance_key(
                    session, settings.secret_key.get_secret_value() if settings.secret_key else None
                )
            registry = Registry.from_settings(settings, upstream_transport, metrics.observe_upstream)
            app.state.gateway = GatewayState(
                settings=settings,
                engine=engine,
                sessions=sessions,
                read_sessions=read_sessions,
                hot_reads=hot_reads,
                report_reads=report_reads,
                registry=registry,
                key=key,
                predictions=PredictionService(
                    transactions=transactions, read_sessions=read_sessions, hot_reads=hot_reads, registry=registry,
                    settings=settings,
                    key=key, limits=limits.SharedLimits.from_settings(settings, redis, metrics.redis_failed),
                ),
                storage=LocalStorage(settings.storage_dir),
                token_cache=TokenCache(settings.auth_cache_seconds),
            )
            app.state.gateway.predictions.resume_deferred()
            archiver = OutputArchiver(sessions=sessions, storage=app.state.gateway.storage,
                                      settings=settings, key=key)
            reconciler = Reconciler(
                sessions=sessions, transactions=transactions, read_sessions=read_sessions, registry=registry,
                service=app.state.gateway.predictions, settings=settings, archiver=archiver,
                foreground=foreground,
            )
            stop = asyncio.Event()
            reconciling = asyncio.create_task(reconciler.run_until(stop), name="reconciler")
            deliverer = Deliverer(sessions=sessions, settings=settings, key=key, hot_reads=hot_reads)
            delivering = asyncio.create_task(deliverer.run_until(stop), name="webhooks")
            try:
                yield
            finally:
                await app.state.gateway.predictions.finish_continuing(
                    max((u.client.longest_create_seconds(MAX_WAIT_SECONDS) for u in registry.all), default=0))
                stop.set()
                try:
                    await asyncio.wait_for(reconciling, timeout=settings.request_timeout + 5)
                except TimeoutError:
                    log.error("reconciler.stop_timed_out")
                try:
                    await asyncio.wait_for(delivering, timeout=DELIVERY_STOP_TIMEOUT)
                except TimeoutError:
                    log.error("webhooks.stop_timed_out")
                await deliverer.aclose()
                await archiver.aclose()
                await app.state.gateway.predictions.deferred.aclose()
        finally:
            if registry is not None:
                await registry.aclose()
            if redis is not None:
                await redis.aclose()
            if hot_reads is not None:
                hot_reads.dispose()
            if report_reads is not None:
                report_reads.dispose()
            if transactions is not None:
                transactions.dispose()
            await engine.dispose()

    app = GatewayApp(
        title="replicate-gateway",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json",
    )
    app.state.metrics = metrics
    install_error_handlers(app)
    app.include_router(observability_router)
    for prefix in API_PREFIXES:
        app.include_router(predictions_router, prefix=prefix)
        app.include_router(webhooks_router, prefix=prefix)
        app.include_router(webhooks_inbound_router, prefix=prefix)
        app.include_router(files_router, prefix=prefix)
        app.include_router(streams_router, prefix=prefix)
        app.include_router(outputs_router, prefix=prefix)
    app.include_router(admin_router, prefix="/admin/v1")
    app.include_router(dashboard_router)
    # The hot routes first, each with its request id, count and body limit; then, for the rest,
    # the same three outermost, so every answer (a 413 too) carries the request id and is
    # counted. An upload's form fields get the ordinary body allowance on top of the file limit.
    request_ids = RequestIds()
    app.fast_lane = FastLane(
        RequestContext(
            BodySizeLimit(app.framework, max_bytes=settings.max_body_bytes,
                          upload_max_bytes=settings.max_file_bytes + settings.max_body_bytes),
            metrics=metrics, foreground=foreground, request_ids=request_ids,
        ),
        metrics=metrics, foreground=foreground, request_ids=request_ids, max_body_bytes=settings.max_body_bytes,
    )
    return app
