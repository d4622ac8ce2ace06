"""Request ids, Prometheus metrics and health checks; none of them shows a secret."""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import logging
import re
import secrets
from collections.abc import Iterable

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from sqlalchemy import func, select, text
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.accounting.daily import UsageDaily
from app.accounting.usage import UNFINISHED
from app.columns import utcnow
from app.deps import StateDep
from app.foreground import Foreground
from app.predictions.models import Prediction
from app.state import GatewayState
from app.webhooks.models import DeliveryStatus, WebhookDelivery

REQUEST_ID = contextvars.ContextVar("request_id", default="")
_CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}\Z")


class Metrics:
    """The gateway's Prometheus metrics, in a registry of their own (one per app)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("gateway_requests_total", "HTTP requests by route and status",
                                ["method", "route", "status"], registry=self.registry)
        self.upstream_latency = Histogram("gateway_upstream_seconds", "Upstream call latency",
                                          ["upstream", "operation"], registry=self.registry)
        self.upstream_errors = Counter("gateway_upstream_errors_total", "Failed upstream calls",
                                       ["upstream", "operation", "kind"], registry=self.registry)
        self.predictions = Gauge("gateway_predictions",
                                 "Predictions by status (failed includes aborted; refused creates are not counted)",
                                 ["status"], registry=self.registry)
        self.spend = Gauge("gateway_spend_usd", "Settled spend in the ledger, USD", registry=self.registry)
        self.reconciler_lag = Gauge("gateway_reconciler_lag_seconds",
                                    "How late the most overdue reconciler poll is", registry=self.registry)
        self.outbox_depth = Gauge("gateway_webhook_outbox_pending", "Webhook deliveries not yet sent",
                                  registry=self.registry)
        self.redis_errors = Counter("gateway_redis_errors_total",
                                    "Failed Redis limit calls (admit: the database checked the limits)",
                                    ["operation"], registry=self.registry)
        for operation in ("admit", "undo", "release"):
            self.redis_errors.labels(operation)
        # Bounded by the routes' templates (never raw paths), methods and statuses.
        self._request_counters: dict[tuple[str, str, int], Counter] = {}
        # Bounded by the configured upstreams and the client's few operations.
        self._latency_children: dict[tuple[str, str], Histogram] = {}

    def count_request(self, method: str, route: str, status: int) -> None:
        """Count one answered request by its route template."""
        # Each child counter is looked up once: labels() takes a lock and builds a key per call.
        key = (method, route, status)
        counter = self._request_counters.get(key)
        if counter is None:
            counter = self._request_counters[key] = self.requests.labels(method, route, str(status))
        counter.inc()

    def observe_upstream(self, upstream: str, operation: str, seconds: float | None, error: str | None) -> None:
        """Record one upstream call (its latency, unless `seconds` is None) and its error, if any."""
        if seconds is not None:
            key = (upstream, operation)
            child = self._latency_children.get(key)
            if child is None:
                child = self._latency_children[key] = self.upstream_latency.labels(upstream, operation)
            child.observe(seconds)
        if error is not None:
            self.upstream_errors.labels(upstream, operation, error).inc()

    def redis_failed(self, operation: str) -> None:
        """Count one failed Redis call of the shared limits."""
        self.redis_errors.labels(operation).inc()


class RequestIds:
    """Each request's id: the caller's X-Request-Id when it is 1 to 128 safe characters, else
    a new one."""

    def __init__(self) -> None:
        # Unique without a random draw per request: a random per-process half and a counter.
        self._process_part = secrets.token_hex(8)
        self._counter = itertools.count()

    def for_request(self, headers: Iterable[tuple[bytes, bytes]]) -> str:
        """The id for a request with these (lower-cased) headers."""
        given = next((value for name, value in headers if name == b"x-request-id"), b"").decode("latin-1")
        return given if _CLIENT_REQUEST_ID.match(given) else f"{self._process_part}{next(self._counter):016x}"


class RequestContext:
    """Accept or mint an X-Request-Id, echo it, count the request by its route template, and
    keep `foreground` told of the requests in progress."""

    def __init__(self, app: ASGIApp, *, metrics: Metrics, foreground: Foreground | None = None,
                 request_ids: RequestIds | None = None) -> None:
        self.app = app
        self.metrics = metrics
        self.foreground = foreground if foreground is not None else Foreground()
        self.request_ids = request_ids if request_ids is not None else RequestIds()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = self.request_ids.for_request(scope["headers"])
        token = REQUEST_ID.set(request_id)
        status = 500
        answered = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, answered
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                answered = True
            await send(message)

        self.foreground.started()
        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            # The framework raises a route's error again after its handler (`on_unexpected`) has
            # logged it and the 500 is sent, for the server to log; uvicorn then logged it again
            # and closed the connection, which a client reusing it found gone. An answer cut
            # short still ends its connection.
            if not answered:
                raise
        finally:
            self.foreground.finished()
            REQUEST_ID.reset(token)
            self.metrics.count_request(scope["method"], _route_template(scope), status)


def _route_template(scope: Scope) -> str:
    # Label by template, never by the raw path: ids and capability tokens must not become labels.
    # Routing leaves the matched route in the scope.
    route = scope.get("route")
    path = getattr(route, "path_format", None) or getattr(route, "path", None)
    return str(path) if path else "unmatched"


class RequestIdFilter(logging.Filter):
    """Adds the current request id to every log record."""

    def filter(self, record: logging.LogRecord) -> bool:
        request_id = REQUEST_ID.get()
        if request_id:
            record.request_id = request_id
        return True


router = APIRouter()


@router.get("/healthz")
async def healthz() -> Response:
    """The process is alive."""
    return Response(b'{"status":"ok"}', media_type="application/json")


@router.get("/readyz")
async def readyz(state: StateDep) -> Response:
    """The database answers and at least one upstream is reachable; status only, no detail."""
    database, upstream = await asyncio.gather(_database_answers(state), _any_upstream_reachable(state))
    checks = {"database": "ok" if database else "unavailable", "upstream": "ok" if upstream else "unavailable"}
    ready = database and upstream
    body = {"status": "ok" if ready else "unavailable", **checks}
    return Response(orjson.dumps(body), status_code=200 if ready else 503, media_type="application/json")


async def _database_answers(state: GatewayState) -> bool:
    try:
        # A read session: a probe neither takes nor waits for SQLite's write lock.
        async with state.read_sessions() as session:
            await session.execute(text("SELECT 1"))
    except Exception:
        return False
    return True


async def _any_upstream_reachable(state: GatewayState) -> bool:
    # All at once: with every upstream down, one after another would take each one's time-out.
    checks = [asyncio.ensure_future(upstream.client.reachable()) for upstream in state.registry.all]
    try:
        for check in asyncio.as_completed(checks):
            if await check:
                return True
        return False
    finally:
        for check in checks:
            check.cancel()



@router.get("/metrics")
async def metrics(request: Request, state: StateDep) -> Response:
    """Prometheus metrics: requests, upstream latency and errors, predictions, spend, lag, outbox."""
    registry: Metrics = request.app.state.metrics
    # A read session, which neither takes nor waits for SQLite's write lock; finished predictions
    # and spend come from the daily rollup, not from every prediction ever made (at a million
    # predictions on SQLite that walk took 280 ms a scrape, holding the write lock throughout).
    async with state.read_sessions() as session:
        succeeded, failed, canceled, spent = (await session.execute(select(
            func.coalesce(func.sum(UsageDaily.succeeded), 0), func.coalesce(func.sum(UsageDaily.failed), 0),
            func.coalesce(func.sum(UsageDaily.canceled), 0), func.coalesce(func.sum(UsageDaily.cost_micros), 0),
        ))).one()
        unfinished = dict((await session.execute(
            select(Prediction.status, func.count()).where(Prediction.status.in_(UNFINISHED))
            .group_by(Prediction.status))).all())
        oldest_due = await session.scalar(select(func.min(Prediction.next_poll_at)).where(
            Prediction.status.in_(UNFINISHED)))
        pending = await session.scalar(select(func.count()).select_from(WebhookDelivery).where(
            WebhookDelivery.status == DeliveryStatus.PENDING))
    counts = {**unfinished, "succeeded": succeeded, "failed": failed, "canceled": canceled}
    for status in (*UNFINISHED, "succeeded", "failed", "canceled"):
        registry.predictions.labels(status).set(counts.get(status, 0))
    registry.spend.set(int(spent or 0) / 1_000_000)
    registry.reconciler_lag.set(max(0.0, (utcnow() - oldest_due).total_seconds()) if oldest_due else 0.0)
    registry.outbox_depth.set(int(pending or 0))
    return Response(generate_latest(registry.registry), media_type=CONTENT_TYPE_LATEST)
