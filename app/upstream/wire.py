"""A lean HTTP/1.1 client for the upstreams' JSON calls: pooled keep-alive connections parsed by httptools."""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

import httptools

# Every create and every poll is one upstream call, and aiohttp's request machinery (its
# request and response objects, multidicts, stream readers, timers and connector) cost about
# as much CPU as the rest of a create's request handling. A JSON call needs far less: one write
# of a prepared head and body, one parser fed by the protocol, one future.


class WireError(Exception):
    """A call that got no usable answer; `sent` says whether bytes of it may have left."""

    sent = True


class ConnectFailed(WireError):
    """No connection could be had (refused, unresolvable, TLS failed, timed out, pool full): nothing was sent."""

    sent = False


class AnswerTimeout(WireError):
    """Sent, but no whole answer came within the time allowed."""


class ConnectionBroken(WireError):
    """Sent, then the connection closed, reset or answered something that is not HTTP."""


class BodyTooLarge(WireError):
    """The answer's body (decoded) passed the size allowed."""


@dataclass(frozen=True, slots=True)
class Answer:
    """A whole response: its status, its headers by lower-case name, and its decoded body."""

    status: int
    headers: Mapping[str, str]
    body: bytes


def _check_header(name: str, value: str) -> None:
    if any(char in name or char in value for char in "\r\n\0") or ":" in name:
        raise ValueError(f"header {name!r} cannot be sent: it holds a line break or a NUL")


class _Connection(asyncio.Protocol):
    """One keep-alive connection carrying one request at a time."""

    def __init__(self, max_body_bytes: int) -> None:
        self._max_body_bytes = max_body_bytes
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future[Answer] | None = None
        self._reset()

    def _reset(self) -> None:
        self._status = 0
        self._headers: dict[str, str] = {}
        self._parts: list[bytes] = []
        self._size = 0
        self._decoder: zlib._Decompress | None = None
        self._until_eof = False
        self._headers_done = False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a stream transport (create_connection)

    def data_received(self, data: bytes) -> None:
        if self._waiter is None or self._waiter.done():
            self.close()  # bytes nobody asked for: the connection cannot be trusted again
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(ConnectionBroken("the upstream switched protocols"))
        except httptools.HttpParserError as error:
            # A callback's own error (a body too large, say) comes back as the parser's context.
            cause = error.__context__
            self._fail(cause if isinstance(cause, WireError)
                       else ConnectionBroken(f"the upstream's answer is not HTTP/1.1: {type(error).__name__}"))

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        if self._until_eof and self._headers_done:
            try:
                self._complete()
            except WireError as error:
                waiter.set_exception(error)
            return
        waiter.set_exception(ConnectionBroken(type(exc).__name__ if exc else "closed by the upstream"))

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self._status = self._parser.get_status_code()
        self._headers_done = True
        headers = self._headers
        encoding = headers.get("content-encoding", "identity").strip().lower()
        if encoding in ("gzip", "x-gzip", "deflate"):
            self._decoder = zlib.decompressobj(wbits=47)  # a gzip or zlib header, told apart by zlib
        elif encoding not in ("identity", ""):
            raise ConnectionBroken(f"the upstream sent a body in an unknown encoding ({encoding[:20]})")
        self._until_eof = ("content-length" not in headers and "transfer-encoding" not in headers
                           and self._status >= 200 and self._status not in (204, 304))

    def on_body(self, body: bytes) -> None:
        if self._decoder is not None:
            room = self._max_body_bytes - self._size + 1
            try:
                body = self._decoder.decompress(body, room)
            except zlib.error as error:
                raise ConnectionBroken("the upstream's compressed body is corrupt") from error
            if self._decoder.unconsumed_tail:
                raise BodyTooLarge()
        self._size += len(body)
        if self._size > self._max_body_bytes:
            raise BodyTooLarge()
        self._parts.append(body)

    def on_message_complete(self) -> None:
        self._complete()

    def _complete(self) -> None:
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        if self._status < 200:  # an interim answer (103 Early Hints): the real one follows
            self._reset()
            return
        if self._decoder is not None:
            tail = self._decoder.flush()
            self._size += len(tail)
            if self._size > self._max_body_bytes:
                raise BodyTooLarge()
            self._parts.append(tail)
        body = self._parts[0] if len(self._parts) == 1 else b"".join(self._parts)
        waiter.set_result(Answer(self._status, self._headers, body))
        if self._until_eof or not self._parser.should_keep_alive():
            self.close()

    def _fail(self, error: WireError) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(error)
        self.close()

    # for the pool
    def send(self, data: bytes, waiter: asyncio.Future[Answer]) -> None:
        self._reset()
        self._waiter = waiter
        if self.transport is None or self.transport.is_closing():
            waiter.set_exception(ConnectFailed("the connection closed before the request was written"))
            return
        self.transport.write(data)

    def timed_out(self) -> None:
        self._fail(AnswerTimeout())

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class WirePool:
    """Keep-alive connections to one upstream's origin, at most `max_connections` at once.

    `request` sends one request and returns its whole answer, or raises a `WireError` that says
    whether anything may have been sent. Nothing is ever retried here."""

    def __init__(self, base_url: str, *, max_connections: int = 200, keepalive_seconds: float = 15.0,
                 max_body_bytes: int) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("an upstream URL is http:// or https:// with a host")
        secure = parts.scheme == "https"
        default_port = 443 if secure else 80
        self._host = parts.hostname
        self._port = parts.port or default_port
        self._ssl: ssl.SSLContext | None = ssl.create_default_context() if secure else None
        host = f"[{self._host}]" if ":" in self._host else self._host
        self._host_header = host if self._port == default_port else f"{host}:{self._port}"
        self._path_prefix = parts.path.rstrip("/") + "/"
        self._max_connections = max_connections
        self._keepalive_seconds = keepalive_seconds
        self._max_body_bytes = max_body_bytes
        self._idle: list[_Connection] = []
        self._open = 0
        self._waiting: collections.deque[asyncio.Future[_Connection | None]] = collections.deque()
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None

    @staticmethod
    def header_lines(headers: Mapping[str, str]) -> str:
        """Header lines checked and joined once, for headers sent unchanged with many requests."""
        lines = []
        for name, value in headers.items():
            _check_header(name, value)
            lines.append(f"{name}: {value}\r\n")
        return "".join(lines)

    def head(self, method: str, path: str, headers: Mapping[str, str], content_length: int | None,
             *, fixed_lines: str = "") -> bytes:
        """The request line and headers for `path` (relative to the base URL, already encoded):
        `fixed_lines` (from `header_lines`), then `headers`."""
        if any(char in path for char in " \r\n\0"):
            raise ValueError("a request path holds a space, a line break or a NUL")
        lines = [f"{method} {self._path_prefix}{path} HTTP/1.1\r\nHost: {self._host_header}\r\n", fixed_lines,
                 self.header_lines(headers)]
        if content_length is not None:
            lines.append(f"Content-Length: {content_length}\r\n")
        lines.append("\r\n")
        return "".join(lines).encode("latin-1")

    async def request(self, head: bytes, body: bytes | None, *, connect_timeout: float,
                      answer_timeout: float, deadline: float | None = None) -> Answer:
        """Send a prepared head (and body) on a pooled connection and wait for the whole answer,
        for at most `answer_timeout` seconds and never past `deadline` (time.monotonic)."""
        loop = asyncio.get_running_loop()
        connection = await self._acquire(loop, connect_timeout)
        if deadline is not None:
            answer_timeout = max(min(answer_timeout, deadline - time.monotonic()), 0.001)
        waiter: asyncio.Future[Answer] = loop.create_future()
        timer = loop.call_later(answer_timeout, connection.timed_out)
        try:
            connection.send(head + body if body else head, waiter)
            answer = await waiter
        except BaseException:
            connection.close()
            self._release(connection)
            raise
        finally:
            timer.cancel()
        self._release(connection)
        return answer

    async def _acquire(self, loop: asyncio.AbstractEventLoop, connect_timeout: float) -> _Connection:
        if self._closed:
            raise ConnectFailed("the pool is closed")
        if loop is not self._loop:
            # Connections belong to the loop that made them; one left from another loop is dropped.
            self._loop, self._idle, self._open, self._waiting = loop, [], 0, collections.deque()
        now = time.monotonic()
        while self._idle:
            connection = self._idle.pop()
            if not connection.closed and now - connection.idle_since < self._keepalive_seconds:
                return connection
            connection.close()
            self._open -= 1
        # Waiting for a free connection and opening one share the connect time-out: a call then
        # takes at most that and its answer's time-out, which is what the reconciler allows a
        # create before it treats it as in doubt.
        deadline = now + connect_timeout
        if self._open >= self._max_connections:
            waiter: asyncio.Future[_Connection | None] = loop.create_future()
            self._waiting.append(waiter)
            try:
                handed = await asyncio.wait_for(waiter, connect_timeout)
            except BaseException as error:
                if waiter in self._waiting:
                    self._waiting.remove(waiter)
                elif waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                    # Handed a connection or a slot just as the wait ended: pass it on.
                    given = waiter.result()
                    if given is None:
                        self._free_slot()
                    else:
                        self._release(given)
                if isinstance(error, TimeoutError):
                    raise ConnectFailed("no connection to the upstream came free in time") from None
                raise
            if handed is not None and not handed.closed:
                return handed
            if handed is not None:
                handed.close()
            # A slot came free (or the connection handed over had closed): open a new one in it.
        else:
            self._open += 1
        try:
            _, connection = await asyncio.wait_for(loop.create_connection(
                lambda: _Connection(self._max_body_bytes), self._host, self._port, ssl=self._ssl,
                server_hostname=self._host if self._ssl else None), max(deadline - time.monotonic(), 0.001))
        except (OSError, TimeoutError, ssl.SSLError, UnicodeError, ValueError) as error:
            self._free_slot()
            raise ConnectFailed(type(error).__name__) from None
        except BaseException:
            self._free_slot()
            raise
        return connection

    def _release(self, connection: _Connection) -> None:
        if connection.closed or self._closed:
            connection.close()
            self._free_slot()
            return
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_result(connection)
                return
        connection.idle_since = time.monotonic()
        self._idle.append(connection)

    def _free_slot(self) -> None:
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the waiter opens its own connection in this slot
                return
        self._open -= 1

    def close(self) -> None:
        """Close every idle connection; connections in use close when their call ends."""
        self._closed = True
        for connection in self._idle:
            connection.close()
        self._open -= len(self._idle)
        self._idle.clear()
        for waiter in self._waiting:
            if not waiter.done():
                waiter.set_exception(ConnectFailed("the pool is closed"))
        self._waiting.clear()
