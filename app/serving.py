"""uvicorn's HTTP protocol with each response sent in one piece, the hot routes' without ASGI."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol, cast

import uvicorn
from starlette.types import Receive, Scope
from uvicorn.protocols.http.httptools_impl import (
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)

from app.errors import GatewayError, problem_response

log = logging.getLogger(__name__)

# Sends a whole answer: status, headers and body.
Respond = Callable[[int, list[tuple[bytes, bytes]], bytes], Awaitable[None]]


class CoalescingTransport:
    """A transport whose writes made in one turn of the event loop leave as one write.

    uvicorn writes a response's status line and headers, then its body, each straight to the
    socket: two system calls and two TCP segments for every response, where one does."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not self._pending:
            self._loop.call_soon(self.flush)
        self._pending.append(data)

    def flush(self) -> None:
        """Send what is waiting (if the connection is still open)."""
        if self._pending:
            data = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
            self._pending.clear()
            if not self._transport.is_closing():
                self._transport.write(data)

    def writelines(self, data: Iterable[bytes]) -> None:
        for piece in data:
            self.write(piece)

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class CoalescingHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol writing through a `CoalescingTransport`."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(CoalescingTransport(transport, self.loop))  # type: ignore[arg-type]


class DirectApp(Protocol):
    """An app some of whose requests the server may answer without ASGI's messages."""

    def fast_route(self, scope: Scope) -> Any:
        """A route for this request, or None: then it goes through ASGI."""

    async def fast_answer(self, scope: Scope, receive: Receive, route: Any, respond: Respond) -> None:
        """Answer a request `fast_route` matched: its status, headers and body, through `respond`."""


class GatewayHttpProtocol(CoalescingHttpToolsProtocol):
    """uvicorn's httptools protocol, with the gateway's fast-lane requests answered directly.

    For a request its fast lane serves, the app hands over the status, headers and body whole,
    and they are written here as one piece: no ASGI run wrapper, no start and body messages, no
    header checks for headers the gateway made itself. Everything else about the connection
    (keep-alive, pipelining, flow control, `Expect: 100-continue`, shutdown) stays uvicorn's, and
    every other request, and every request when uvicorn's access log is on, goes through ASGI."""

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        route = None
        if not cycle.access_log and not getattr(self.config, "reset_contextvars", False):
            fast_route = getattr(app, "fast_route", None)
            route = fast_route(cycle.scope) if fast_route is not None else None
        if route is None:
            super()._start_asgi_task(cycle, app)
            return
        task = self.loop.create_task(_answer_directly(cycle, app, route))
        task.add_done_callback(self.tasks.discard)
        self.tasks.add(task)


async def _answer_directly(cycle: RequestResponseCycle, app: DirectApp, route: Any) -> None:
    """What uvicorn's cycle does with an app's start and body messages, for a whole answer."""

    async def respond(status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        if cycle.flow.write_paused and not cycle.disconnected:
            await cycle.flow.drain()
        if cycle.disconnected or cycle.response_started:
            return
        cycle.response_started = True
        cycle.waiting_for_100_continue = False
        head = [STATUS_LINE[status]]
        for name, value in (*cycle.default_headers, *headers):
            head += (name, b": ", value, b"\r\n")
        if not cycle.keep_alive:
            head.append(b"connection: close\r\n")
        head += (b"\r\n", body)
        cycle.transport.write(b"".join(head))
        cycle.response_complete = True
        cycle.message_event.set()
        if not cycle.keep_alive:
            cycle.transport.close()
        cycle.on_response()

    try:
        await app.fast_answer(cast(Scope, cycle.scope), cast(Receive, cycle.receive), route, respond)
    except Exception as exc:
        # The fast lane renders every error itself: this is a bug in it (or in sending).
        log.error("request.failed", exc_info=exc)
        if cycle.response_started:
            cycle.transport.close()
        else:
            problem = problem_response(GatewayError("An unexpected error occurred"))
            await respond(problem.status_code, problem.raw_headers, bytes(problem.body))


class DrainingServer(uvicorn.Server):
    """uvicorn's server, telling the app when its graceful shutdown begins (`on_drain`), so that
    what would keep a connection open for long, an event stream, can end itself at once."""

    def __init__(self, config: uvicorn.Config, on_drain: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_drain = on_drain

    async def shutdown(self, sockets: Any = None) -> None:
        self._on_drain()
        await super().shutdown(sockets)
