"""Pure ASGI middleware: a request-body size limit enforced on the bytes actually received."""

from __future__ import annotations

from collections.abc import Iterable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import PayloadTooLarge, problem_response


def body_too_large(limit: int) -> PayloadTooLarge:
    """The error for a body over `limit` bytes."""
    return PayloadTooLarge(f"The request body must be at most {limit} bytes")


def announced_too_large(headers: Iterable[tuple[bytes, bytes]], limit: int) -> bool:
    """Whether a Content-Length header announces more than `limit` bytes (or is not a number)."""
    return any(name == b"content-length" and (not value.isdigit() or int(value) > limit)
               for name, value in headers)


def limited(receive: Receive, limit: int) -> Receive:
    """`receive`, raising PayloadTooLarge once more than `limit` body bytes have arrived; raised
    inside the route's body read, so the route's error handling renders it."""
    received = 0

    async def limited_receive() -> Message:
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise body_too_large(limit)
        return message

    return limited_receive


class BodySizeLimit:
    """Refuse bodies over `max_bytes` with 413, whether announced by Content-Length or not."""

    def __init__(self, app: ASGIApp, *, max_bytes: int, upload_max_bytes: int | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        # File uploads (POST .../v1/files) stream to storage, so they may be far larger.
        self.upload_max_bytes = upload_max_bytes

    def _limit(self, scope: Scope) -> int:
        if self.upload_max_bytes is not None and scope.get("method") == "POST" \
                and scope.get("path", "").endswith("/v1/files"):
            return self.upload_max_bytes
        return self.max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self._limit(scope)
        if announced_too_large(scope.get("headers", []), limit):
            await problem_response(body_too_large(limit))(scope, receive, send)
            return
        await self.app(scope, limited(receive, limit), send)
