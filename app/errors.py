"""Errors rendered to clients as Replicate-style `application/problem+json`.

    GatewayError (500)
    ├── BadRequest (400)
    ├── Unauthenticated (401)
    ├── PaymentRequired (402)
    ├── Forbidden (403)
    ├── NotFound (404)
    ├── MethodNotAllowed (405)
    ├── Conflict (409)
    ├── PayloadTooLarge (413)
    ├── UnsupportedMediaType (415)
    ├── ValidationFailed (422, with invalid_fields)
    ├── Throttled (429, with Retry-After)
    ├── DatabaseUnavailable (503, with Retry-After)
    └── UpstreamError
        ├── UpstreamStatus (the upstream's own 4xx/5xx status, scrubbed body)
        ├── UpstreamInvalid (502)
        ├── UpstreamUnavailable (502)
        ├── UpstreamCircuitOpen (503, with Retry-After)
        └── UpstreamTimeout (504)
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Mapping
from typing import Any, ClassVar, cast

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from sqlalchemy.exc import DBAPIError, DisconnectionError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from app.db import database_unavailable, unstorable_text

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"


class GatewayError(Exception):
    """Base of every error rendered to clients."""

    status: ClassVar[int] = 500
    title: ClassVar[str] = "Internal Server Error"
    default_detail: ClassVar[str | None] = None  # when none is given; else the title

    def __init__(
        self,
        detail: str | None = None,
        *,
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        self.detail = detail or self.default_detail or self.title
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})
        super().__init__(self.detail)

    def to_body(self) -> dict[str, Any]:
        """The problem+json body."""
        return {"title": self.title, "detail": self.detail, "status": self.status, **self.extra}


class BadRequest(GatewayError):
    status, title = 400, "Bad Request"


class Unauthenticated(GatewayError):
    status, title = 401, "Unauthenticated"

    def __init__(self, detail: str = "You did not pass a valid authentication token") -> None:
        super().__init__(detail, headers={"WWW-Authenticate": "Bearer"})


class PaymentRequired(GatewayError):
    status, title = 402, "Payment Required"


class Forbidden(GatewayError):
    status, title = 403, "Forbidden"


class NotFound(GatewayError):
    status, title = 404, "Not found"


class MethodNotAllowed(GatewayError):
    status, title = 405, "Method Not Allowed"


class Conflict(GatewayError):
    status, title = 409, "Conflict"


class PayloadTooLarge(GatewayError):
    status, title = 413, "Request Entity Too Large"


class UnsupportedMediaType(GatewayError):
    status, title = 415, "Unsupported Media Type"


class ValidationFailed(GatewayError):
    status, title = 422, "Input validation failed"

    def __init__(self, invalid_fields: list[dict[str, str]]) -> None:
        detail = "".join(f"- {f['field']}: {f['description']}\n" for f in invalid_fields)
        super().__init__(detail, extra={"invalid_fields": invalid_fields})


class Throttled(GatewayError):
    status, title = 429, "Request was throttled"

    def __init__(self, retry_after: int, detail: str | None = None) -> None:
        retry_after = max(1, int(retry_after))
        super().__init__(
            detail or f"Request was throttled. Expected available in {retry_after} seconds.",
            headers={"Retry-After": str(retry_after)},
        )


class DatabaseUnavailable(GatewayError):
    """The database could not be reached or could not take the request now. A create answered so
    has sent nothing upstream: trying it again cannot run it twice."""

    status, title = 503, "Service Unavailable"
    # Python's client waits exactly this long between its retries of a GET, ten times in all:
    # about half a minute, as long as a database restart or failover usually takes.
    RETRY_AFTER_SECONDS: ClassVar[int] = 3

    def __init__(self) -> None:
        super().__init__("The gateway's database is unavailable; try again shortly",
                         headers={"Retry-After": str(self.RETRY_AFTER_SECONDS)})


class UpstreamError(GatewayError):
    status, title = 502, "Bad Gateway"


class UpstreamStatus(UpstreamError):
    """The upstream answered with an error status that we pass on, scrubbed."""

    def __init__(
        self,
        status: int,
        title: str,
        detail: str,
        *,
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(detail, headers=headers, extra=extra)
        self.status = status  # type: ignore[misc]
        self.title = title  # type: ignore[misc]


class UpstreamInvalid(UpstreamError):
    status, title = 502, "Bad Gateway"
    default_detail = "The upstream service returned an invalid response"


class UpstreamUnavailable(UpstreamError):
    status, title = 502, "Bad Gateway"
    default_detail = "The upstream service could not be reached"


class UpstreamCircuitOpen(UpstreamError):
    status, title = 503, "Service Unavailable"

    def __init__(self, retry_after: int) -> None:
        super().__init__("Every upstream that serves this model is failing; try again shortly",
                         headers={"Retry-After": str(max(1, retry_after))})


class UpstreamTimeout(UpstreamError):
    status, title = 504, "Gateway Timeout"
    default_detail = "The upstream service did not answer in time"


_TEXT: dict[str, Any] = {"type": "string"}
PROBLEM_SCHEMA: dict[str, Any] = {
    "title": "Problem",
    "type": "object",
    "required": ["title", "detail", "status"],
    "properties": {
        "title": _TEXT,
        "detail": _TEXT,
        "status": {"type": "integer"},
        "invalid_fields": {"type": "array", "items": {
            "type": "object", "required": ["type", "field", "description"],
            "properties": {"type": _TEXT, "field": _TEXT, "description": _TEXT},
        }},
    },
}


def document_problems(document: dict[str, Any]) -> dict[str, Any]:
    """The OpenAPI document with each 422 described as the problem it is answered with, not as
    the framework's own validation body, which the gateway never sends."""
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    for framework_schema in ("HTTPValidationError", "ValidationError"):
        schemas.pop(framework_schema, None)
    schemas["Problem"] = PROBLEM_SCHEMA
    for operations in document.get("paths", {}).values():
        for operation in operations.values():
            if "422" in operation.get("responses", {}):
                operation["responses"]["422"] = {
                    "description": ValidationFailed.title,
                    "content": {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}},
                }
    return document


def problem_response(error: GatewayError) -> Response:
    """Render an error as problem+json with its headers."""
    return Response(
        content=orjson.dumps(error.to_body()),
        status_code=error.status,
        media_type=PROBLEM_JSON,
        headers=error.headers,
    )


def _field_path(location: tuple[Any, ...] | list[Any]) -> str:
    parts = [str(p) for p in location if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or "body"


def invalid_fields_from(errors: Any) -> list[dict[str, str]]:
    """Replicate's `invalid_fields` from pydantic's error list."""
    return [
        {"type": str(e.get("type", "invalid")), "field": _field_path(e.get("loc", ())),
         "description": str(e.get("msg", "is invalid"))}
        for e in errors
    ]


_STATUS_ERRORS: dict[int, type[GatewayError]] = {
    400: BadRequest, 401: Unauthenticated, 403: Forbidden, 404: NotFound,
    405: MethodNotAllowed, 413: PayloadTooLarge, 415: UnsupportedMediaType,
}


async def on_gateway_error(_: Request, exc: Exception) -> Response:
    """Our own errors, as they describe themselves."""
    return problem_response(cast(GatewayError, exc))


async def on_validation_error(_: Request, exc: Exception) -> Response:
    """The framework's request validation, as Replicate's 422 with invalid_fields."""
    errors = cast(RequestValidationError, exc).errors()
    return problem_response(ValidationFailed(invalid_fields_from(errors)))


async def on_http_error(_: Request, exc: Exception) -> Response:
    """The framework's own HTTP errors (no route, wrong method...)."""
    error_class = _STATUS_ERRORS.get(cast(StarletteHTTPException, exc).status_code)
    if error_class is NotFound or error_class is None:
        error: GatewayError = NotFound("The requested resource could not be found")
    elif error_class is Unauthenticated:
        error = Unauthenticated()
    else:
        error = error_class()
    return problem_response(error)


async def on_disconnect(request: Request, _: Exception) -> Response:
    """The caller went away while sending its body: nothing was recorded, nobody reads this."""
    log.info("request.client_disconnected", extra={"path": request.url.path})
    return problem_response(BadRequest("The client disconnected before sending the whole request"))


async def on_unexpected(request: Request, exc: Exception) -> Response:
    """A bug: logged with its traceback, answered as a plain 500 problem."""
    log.error("request.failed", exc_info=exc, extra={"path": request.url.path})
    return problem_response(GatewayError("An unexpected error occurred"))


class _Sparse:
    """Lets an event through at most once every `seconds`, and counts those held back meanwhile."""

    def __init__(self, seconds: float) -> None:
        self._seconds = seconds
        self._last = -seconds
        self._held_back = 0

    def take(self) -> int | None:
        """None to stay quiet; else how many were held back since the last one let through."""
        now = time.monotonic()
        if now - self._last < self._seconds:
            self._held_back += 1
            return None
        held_back, self._held_back, self._last = self._held_back, 0, now
        return held_back


# Every request fails alike while the database is away: one line every few seconds says so
# without a line per request.
_OUTAGE_LINES = _Sparse(5.0)


async def on_database_error(request: Request, exc: Exception) -> Response:
    """The database being away is a 503 the caller may retry, and a value it cannot hold a 400;
    any other database error is a bug."""
    if unstorable_text(exc):
        return problem_response(BadRequest("The request holds a character that cannot be stored, such as NUL"))
    if not database_unavailable(exc):
        return await on_unexpected(request, exc)
    held_back = _OUTAGE_LINES.take()
    if held_back is not None:
        # The type alone: a driver's message may name the database's host and user.
        log.warning("database.unavailable", extra={
            "path": request.url.path, "error": type(exc).__name__, "also_unavailable_since_last": held_back})
    return problem_response(DatabaseUnavailable())


# What the database and its drivers raise: asyncpg raises a socket's OSError when it cannot connect.
DATABASE_ERRORS: tuple[type[Exception], ...] = (DBAPIError, PoolTimeout, DisconnectionError, sqlite3.Error, OSError)


async def error_response(request: Request, exc: Exception) -> Response:
    """The answer to any exception a route raised, for code that runs outside the framework's handlers."""
    if isinstance(exc, GatewayError):
        return await on_gateway_error(request, exc)
    if isinstance(exc, ClientDisconnect):
        return await on_disconnect(request, exc)
    if isinstance(exc, DATABASE_ERRORS):
        return await on_database_error(request, exc)
    return await on_unexpected(request, exc)


def install_error_handlers(app: FastAPI) -> None:
    """Render every error, ours or the framework's, as problem+json; never a bare 500."""
    app.add_exception_handler(GatewayError, on_gateway_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(ClientDisconnect, on_disconnect)
    for database_error in DATABASE_ERRORS:
        app.add_exception_handler(database_error, on_database_error)
    app.add_exception_handler(Exception, on_unexpected)
