"""Run an ASGI app with a real uvicorn server on 127.0.0.1 in a background thread."""

from __future__ import annotations

import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import uvicorn

from app.serving import GatewayHttpProtocol


class ServerThread:
    """A uvicorn server on a free loopback port, started and stopped from synchronous tests, set up
    as `replicate-gateway serve` sets it up (no proxy headers, the gateway's HTTP protocol)."""

    def __init__(self, app: Any, *, lifespan: str = "on") -> None:
        config = uvicorn.Config(
            app, host="127.0.0.1", port=0, log_config=None, lifespan=lifespan, loop="asyncio",
            access_log=False, timeout_graceful_shutdown=2, http=GatewayHttpProtocol, proxy_headers=False,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.port = 0

    def start(self) -> ServerThread:
        """Start serving and wait until the socket is bound."""
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        """The server's base URL."""
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        """Stop serving and wait for the thread to end."""
        self.server.should_exit = True
        self.thread.join(timeout=10)


async def read_body(receive: Callable[[], Awaitable[Any]]) -> bytes:
    """An ASGI request's whole body, read message by message."""
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            return body
