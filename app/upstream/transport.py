"""An httpx transport over aiohttp: the same client API, a pool that stays fast under load.

httpx's own pool costs more per request the more requests are in flight (encode/httpx#3215);
with an upstream answering in 50 ms at 64 concurrent requests it falls to about a tenth of
aiohttp's throughput (bench/RESULTS.md). Errors are mapped by when they happened, because the
gateway decides from them whether a create may have reached the upstream: only a failure to
connect means nothing was sent.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import httpx

CHUNK_BYTES = 64 * 1024


def _mapped(exc: BaseException, request: httpx.Request) -> httpx.TransportError:
    """The httpx error for an aiohttp failure; anything after connecting may have been sent."""
    message = type(exc).__name__
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return httpx.ConnectTimeout(message, request=request)
    if isinstance(exc, aiohttp.ClientConnectorError):
        return httpx.ConnectError(message, request=request)
    if isinstance(exc, aiohttp.InvalidURL):
        return httpx.UnsupportedProtocol(message, request=request)
    if isinstance(exc, TimeoutError):  # aiohttp's read time-outs are TimeoutErrors too
        return httpx.ReadTimeout(message, request=request)
    return httpx.ReadError(message, request=request)


class _Body(httpx.AsyncByteStream):
    """An aiohttp response body as an httpx stream; closing it returns the connection."""

    def __init__(self, response: aiohttp.ClientResponse, request: httpx.Request) -> None:
        self._response = response
        self._request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.content.iter_chunked(CHUNK_BYTES):
                yield chunk
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise _mapped(exc, self._request) from None

    async def aclose(self) -> None:
        self._response.release()


class AiohttpTransport(httpx.AsyncBaseTransport):
    """Sends httpx requests with one pooled aiohttp session, made inside the running loop.

    The session keeps no cookie (a shared client must never replay one caller's upstream
    cookie for another: GHSA-7vwr-g6pm-9hc8), reads no proxy settings and follows no redirect."""

    def __init__(self, *, max_connections: int = 200, keepalive_seconds: float = 15.0) -> None:
        self._max_connections = max_connections
        self._keepalive_seconds = keepalive_seconds
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._max_connections,
                                               keepalive_timeout=self._keepalive_seconds),
                cookie_jar=aiohttp.DummyCookieJar(),
                trust_env=False,
                auto_decompress=False,  # httpx decodes, as it would with its own transport
            )
        return self._session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send one request; the response body streams until the caller closes it."""
        timeout = request.extensions.get("timeout", {})
        body = await request.aread()
        try:
            response = await self._client().request(
                request.method,
                str(request.url),
                headers=list(request.headers.multi_items()),
                data=body or None,
                allow_redirects=False,
                compress=False,
                skip_auto_headers=("Accept-Encoding", "User-Agent", "Content-Type"),
                timeout=aiohttp.ClientTimeout(
                    total=None,
                    connect=timeout.get("pool"),
                    sock_connect=timeout.get("connect"),
                    sock_read=timeout.get("read"),
                ),
            )
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise _mapped(exc, request) from None
        return httpx.Response(
            status_code=response.status,
            headers=list(response.raw_headers),
            stream=_Body(response, request),
            request=request,
            extensions={"http_version": b"HTTP/1.1"},
        )

    async def aclose(self) -> None:
        """Close the pooled connections."""
        if self._session is not None:
            await self._session.close()
            self._session = None
