"""Pure ASGI middleware: a request-body size limit enforced on the bytes actually received."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import PayloadTooLarge, problem_response


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

    @staticmethod
    def _error(limit: int) -> PayloadTooLarge:
        return PayloadTooLarge(f"The request body must be at most {limit} bytes")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self._limit(scope)
        for name, value in scope.get("headers", []):
            if name == b"content-length" and (not value.isdigit() or int(value) > limit):
                await problem_response(self._error(limit))(scope, receive, send)
                return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # Raised inside the route's body read, so the error handlers render it.
                    raise self._error(limit)
            return message

        await self.app(scope, limited_receive, send)
