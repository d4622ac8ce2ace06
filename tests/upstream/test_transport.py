"""The gateway's own upstream connections, through its client: errors classed by whether a request
can have been sent, no cookie kept, no redirect followed, headers and bodies passed exactly."""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from app.errors import UpstreamInvalid, UpstreamStatus, UpstreamTimeout, UpstreamUnavailable
from app.upstream.client import UpstreamClient, UpstreamFailure
from tests.helpers import free_port

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
Connect = Callable[[str], Awaitable[UpstreamClient]]

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
async def connect() -> AsyncIterator[Connect]:
    # As the gateway builds it: no transport given, so it sends on its own connections.
    clients: list[UpstreamClient] = []

    async def make(base: str) -> UpstreamClient:
        client = UpstreamClient(name="relay", base_url=base + "/replicate", token="upstream-key",
                                connect_timeout=1.0, request_timeout=1.0, create_timeout=0.3,
                                max_body_bytes=10_000)
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.aclose()


async def test_a_refused_connection_was_never_sent(connect: Connect) -> None:
    client = await connect(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(UpstreamFailure) as caught:
        await client.create_prediction("v1/predictions", {"input": {}}, prefer=None, cancel_after=None,
                                       wait_seconds=None)
    assert isinstance(caught.value.error, UpstreamUnavailable)
    assert caught.value.maybe_sent is False
    assert await client.reachable() is False


async def test_a_token_that_cannot_be_sent_refuses_each_call_before_connecting(
    serve: Callable[[Handler], Awaitable[str]]
) -> None:
    arrived: list[bytes] = []

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        arrived.append(await reader.read(100))
        writer.close()

    base = await serve(record)
    client = UpstreamClient(name="relay", base_url=base + "/replicate", token="key\r\nX-Injected: 1",
                            connect_timeout=1.0, request_timeout=1.0, create_timeout=0.3, max_body_bytes=10_000)
    try:
        for _ in range(2):
            with pytest.raises(UpstreamFailure) as caught:
                await client.get_prediction("abc")
            assert isinstance(caught.value.error, UpstreamInvalid)
            assert caught.value.maybe_sent is False
    finally:
        await client.aclose()
    assert arrived == []


async def test_a_connection_closed_after_the_request_arrived_may_have_been_sent(
    connect: Connect, serve: Callable[[Handler], Awaitable[str]]
) -> None:
    received: list[bytes] = []

    async def close_after_reading(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.append(await _read_request(reader))
        writer.close()

    client = await connect(await serve(close_after_reading))
    with pytest.raises(UpstreamFailure) as caught:
        await client.create_prediction("v1/predictions", {"input": {}}, prefer=None, cancel_after=None,
                                       wait_seconds=None)
    assert isinstance(caught.value.error, UpstreamUnavailable)
    assert caught.value.maybe_sent is True
    assert received
    assert received[0].endswith(b'{"input":{}}')


async def test_a_silent_upstream_is_a_time_out_that_may_have_been_sent(
    connect: Connect, serve: Callable[[Handler], Awaitable[str]]
) -> None:
    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        await asyncio.sleep(3)
        writer.close()

    client = await connect(await serve(never_answer))
    with pytest.raises(UpstreamFailure) as caught:
        await client.create_prediction("v1/predictions", {"input": {}}, prefer=None, cancel_after=None,
                                       wait_seconds=None)
    assert isinstance(caught.value.error, UpstreamTimeout)
    assert caught.value.maybe_sent is True


async def test_a_body_cut_short_may_have_been_sent(
    connect: Connect, serve: Callable[[Handler], Awaitable[str]]
) -> None:
    async def half_a_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 201 Created\r\nContent-Length: 100\r\n\r\n{\"id\": \"a")
        await writer.drain()
        writer.close()

    client = await connect(await serve(half_a_body))
    with pytest.raises(UpstreamFailure) as caught:
        await client.create_prediction("v1/predictions", {"input": {}}, prefer=None, cancel_after=None,
                                       wait_seconds=None)
    assert caught.value.maybe_sent is True


async def test_cookies_are_never_replayed_and_redirects_never_followed(
    connect: Connect, serve: Callable[[Handler], Awaitable[str]]
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

    client = await connect(await serve(set_cookie_and_redirect))
    for upstream_id in ("a", "b"):
        with pytest.raises(UpstreamFailure):
            await client.get_prediction(upstream_id)
    assert len(requests) == 2
    assert all(b"cookie" not in r.lower().replace(b"set-cookie", b"") for r in requests)
    assert all(b"/elsewhere" not in r for r in requests)


async def test_headers_body_path_and_gzip_pass_through(
    connect: Connect, serve: Callable[[Handler], Awaitable[str]]
) -> None:
    requests: list[bytes] = []
    payload = b'{"id": "abc", "status": "starting"}'

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                requests.append(await _read_request(reader))
            except asyncio.IncompleteReadError:
                break
            writer.write(_answer("201 Created", gzip.compress(payload), "Content-Encoding: gzip",
                                 "Content-Type: application/json"))
            await writer.drain()
        writer.close()

    client = await connect(await serve(echo))
    reply = await client.create_prediction("v1/models/o/n/predictions", {"input": {"a": 1}}, prefer="wait=5",
                                           cancel_after="30s", wait_seconds=5)
    assert reply == {"id": "abc", "status": "starting"}
    head = requests[0].lower()
    assert head.startswith(b"post /replicate/v1/models/o/n/predictions http/1.1")
    assert head.count(b"content-length:") == 1
    assert head.count(b"content-type: application/json") == 1
    assert b"authorization: bearer upstream-key" in head
    assert b"prefer: wait=5" in head
    assert b"cancel-after: 30s" in head
    assert b"user-agent: replicate-gateway" in head
    assert requests[0].endswith(b'{"input":{"a":1}}')
    # An id is one encoded path segment, never a way out of it.
    await client.get_prediction("../../admin x")
    assert requests[1].lower().startswith(b"get /replicate/v1/predictions/..%2f..%2fadmin%20x http/1.1")
    await client.get_prediction("..")
    assert requests[2].startswith(b"GET /replicate/v1/predictions/%2E%2E HTTP/1.1")


async def test_an_error_status_keeps_its_retry_after_and_a_huge_body_is_refused(
    connect: Connect, serve: Callable[[Handler], Awaitable[str]]
) -> None:
    answers = [_answer("503 Service Unavailable", b"{}", "Retry-After: 7"),
               _answer("200 OK", b"[" + b"1," * 10_000 + b"1]")]

    async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while answers:
            try:
                await _read_request(reader)
            except asyncio.IncompleteReadError:
                break
            writer.write(answers.pop(0))
            await writer.drain()
        writer.close()

    client = await connect(await serve(reply))
    with pytest.raises(UpstreamFailure) as unavailable:
        await client.get_prediction("a")
    assert isinstance(unavailable.value.error, UpstreamStatus)
    assert unavailable.value.error.headers == {"Retry-After": "7"}
    with pytest.raises(UpstreamFailure) as too_large:
        await client.get_json("v1/models/o/n")
    assert "too large" in too_large.value.error.detail
