"""The aiohttp transport under httpx: errors mapped by whether the request can have been sent."""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest

from app.outbound import outbound_client
from app.upstream.transport import AiohttpTransport
from tests.helpers import free_port

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return head + (await reader.readexactly(length) if length else b"")


def _answer(status: str, body: bytes, *headers: str) -> bytes:
    lines = [f"HTTP/1.1 {status}", f"Content-Length: {len(body)}", *headers, "", ""]
    return "\r\n".join(lines).encode() + body


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Handler], Awaitable[str]]]:
    servers: list[asyncio.Server] = []

    async def start(handler: Handler) -> str:
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        servers.append(server)
        port = server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    yield start
    for server in servers:
        server.close()


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    # As the gateway builds it: the transport under the shared outgoing-client settings.
    async with outbound_client(transport=AiohttpTransport(), timeout=httpx.Timeout(1.0, connect=1.0)) as http:
        yield http


async def test_a_refused_connection_is_a_connect_error(client: httpx.AsyncClient) -> None:
    with pytest.raises(httpx.ConnectError):
        await client.post(f"http://127.0.0.1:{free_port()}/v1/predictions", content=b"{}")


async def test_a_connection_closed_after_the_request_arrived_is_not_a_connect_error(
    client: httpx.AsyncClient, serve: Callable[[Handler], Awaitable[str]]
) -> None:
    received: list[bytes] = []

    async def close_after_reading(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.append(await _read_request(reader))
        writer.close()

    base = await serve(close_after_reading)
    with pytest.raises(httpx.TransportError) as caught:
        await client.post(base + "/v1/predictions", content=b'{"input": {}}')
    assert not isinstance(caught.value, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout)
    assert received
    assert received[0].endswith(b'{"input": {}}')


async def test_a_silent_upstream_is_a_read_timeout(
    client: httpx.AsyncClient, serve: Callable[[Handler], Awaitable[str]]
) -> None:
    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        await asyncio.sleep(3)
        writer.close()

    base = await serve(never_answer)
    with pytest.raises(httpx.ReadTimeout):
        await client.post(base + "/v1/predictions", content=b"{}", timeout=httpx.Timeout(0.3, connect=1.0))


async def test_cookies_are_never_replayed_and_redirects_never_followed(
    client: httpx.AsyncClient, serve: Callable[[Handler], Awaitable[str]]
) -> None:
    requests: list[bytes] = []

    async def set_cookie_and_redirect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                requests.append(await _read_request(reader))
            except asyncio.IncompleteReadError:
                break
            writer.write(_answer("302 Found", b"", "Set-Cookie: relay=caller-one; Path=/", "Location: /elsewhere"))
            await writer.drain()
        writer.close()

    base = await serve(set_cookie_and_redirect)
    first = await client.get(base + "/v1/predictions/a")
    second = await client.get(base + "/v1/predictions/b")
    assert first.status_code == second.status_code == 302
    assert len(requests) == 2
    assert all(b"cookie" not in r.lower().replace(b"set-cookie", b"") for r in requests)


async def test_headers_body_and_gzip_pass_through(
    client: httpx.AsyncClient, serve: Callable[[Handler], Awaitable[str]]
) -> None:
    requests: list[bytes] = []
    payload = b'{"id": "abc", "status": "starting"}'

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        requests.append(await _read_request(reader))
        writer.write(_answer("201 Created", gzip.compress(payload), "Content-Encoding: gzip",
                             "Content-Type: application/json"))
        await writer.drain()
        writer.close()

    base = await serve(echo)
    response = await client.post(base + "/v1/predictions", content=b'{"input": {"a": 1}}',
                                 headers={"Authorization": "Bearer upstream-key", "Prefer": "wait=5"})
    assert response.status_code == 201
    assert response.content == payload
    head = requests[0].lower()
    assert head.count(b"content-length:") == 1
    assert b"authorization: bearer upstream-key" in head
    assert b"prefer: wait=5" in head
    assert requests[0].endswith(b'{"input": {"a": 1}}')
