"""A webhook receiver on 127.0.0.1 that records every request and can be scripted to misbehave."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Self

from tests.servers import ServerThread, read_body

Message = dict[str, Any]


@dataclass
class Received:
    """One request as the receiver got it."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes
    status: int = 0  # what the receiver answered

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class _Reply:
    status: int
    remaining: int
    headers: dict[str, str] = field(default_factory=dict)
    hang_seconds: float = 0.0


class Receiver:
    """Answers `default_status` unless scripted with `answer()`; records every request."""

    def __init__(self, default_status: int = 204) -> None:
        self.default_status = default_status
        self._lock = threading.Lock()
        self._requests: list[Received] = []
        self._script: list[_Reply] = []
        self._server: ServerThread | None = None
        self.port = 0

    # ---- scripting and inspection (test thread) ----

    def answer(self, status: int, count: int = 1, *, headers: dict[str, str] | None = None,
               hang_seconds: float = 0.0) -> None:
        """Answer the next `count` requests with `status` (after `hang_seconds`)."""
        with self._lock:
            self._script.append(_Reply(status, count, dict(headers or {}), hang_seconds))

    def redirect(self, location: str, count: int = 1) -> None:
        """Answer the next `count` requests with a 302 to `location`."""
        self.answer(302, count, headers={"location": location})

    @property
    def requests(self) -> list[Received]:
        with self._lock:
            return list(self._requests)

    def wait_for(self, count: int, timeout: float = 15, *, answered: int | None = None) -> list[Received]:
        """Wait until `count` requests arrived (those answered with `answered`, when given)."""
        deadline = time.monotonic() + timeout
        while True:
            matching = [r for r in self.requests if answered is None or r.status == answered]
            if len(matching) >= count:
                return matching
            if time.monotonic() > deadline:
                raise AssertionError(f"the receiver got {len(matching)} of {count} requests: {self.requests}")
            time.sleep(0.05)

    # ---- lifecycle ----

    def start(self, port: int = 0) -> Self:
        """Serve on 127.0.0.1 (on `port`, or a free one)."""
        server = ServerThread(self.app, lifespan="off")
        server.server.config.port = port
        server.server.config.interface = "asgi3"  # a bound method is not auto-detected as ASGI 3
        self._server = server.start()
        self.port = server.port
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    # ---- ASGI application (server thread) ----

    async def app(self, scope: Message, receive: Callable[[], Awaitable[Message]],
                  send: Callable[[Message], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            return
        body = await read_body(receive)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        received = Received(scope["method"], scope["path"], scope["query_string"].decode("latin-1"),
                            headers, body)
        with self._lock:
            reply = self._script[0] if self._script else None
            if reply is not None:
                reply.remaining -= 1
                if reply.remaining <= 0:
                    self._script.pop(0)
            received.status = reply.status if reply else self.default_status
            self._requests.append(received)
        if reply is not None and reply.hang_seconds:
            await asyncio.sleep(reply.hang_seconds)
        extra = [(k.encode(), v.encode()) for k, v in (reply.headers if reply else {}).items()]
        await send({"type": "http.response.start", "status": received.status,
                    "headers": [(b"content-length", b"0"), (b"set-cookie", b"receiver=1; Path=/"), *extra]})
        await send({"type": "http.response.body", "body": b""})
