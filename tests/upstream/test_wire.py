"""The upstream connection pool over real sockets: keep-alive reuse, its limit, framing, and failures."""

from __future__ import annotations

import asyncio
import gzip
import shutil
import ssl
import subprocess
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from app.upstream.wire import AnswerTimeout, BodyTooLarge, ConnectFailed, ConnectionBroken, WirePool
from tests.helpers import free_port

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Upstream:
    """A raw HTTP server: counts connections and requests, answers with what `answer` returns."""

    def __init__(self, answer: Callable[[bytes], Awaitable[bytes | None]]) -> None:
        self.answer = answer
        self.connections = 0
        self.open = 0
        self.most_open = 0
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    break
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                request = head + (await reader.readexactly(length) if length else b"")
                self.requests.append(request)
                reply = await self.answer(request)
                if reply is None:  # close without answering
                    break
                writer.write(reply)
                await writer.drain()
                if b"connection: close" in reply.lower() or reply.startswith(b"HTTP/1.0"):
                    break
        finally:
            self.open -= 1
            writer.close()

    async def start(self) -> str:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/replicate"


def ok(body: bytes = b'{"ok": true}', *headers: str, status: str = "200 OK") -> bytes:
    lines = [f"HTTP/1.1 {status}", f"Content-Length: {len(body)}", *headers, "", ""]
    return "\r\n".join(lines).encode() + body


@pytest.fixture
async def upstreams() -> AsyncIterator[list[Upstream]]:
    made: list[Upstream] = []
    yield made
    for upstream in made:
        if upstream.server is not None:
            upstream.server.close()


async def start(upstreams: list[Upstream], answer: Callable[[bytes], Awaitable[bytes | None]],
                **pool_options: object) -> tuple[Upstream, WirePool]:
    upstream = Upstream(answer)
    upstreams.append(upstream)
    base = await upstream.start()
    options: dict[str, object] = {"max_body_bytes": 10_000, **pool_options}
    return upstream, WirePool(base, **options)  # type: ignore[arg-type]


async def get(pool: WirePool, path: str = "v1/predictions/abc", timeout: float = 2.0,
              connect_timeout: float = 1.0) -> tuple[int, bytes]:
    answer = await pool.request(pool.head("GET", path, {"Accept": "application/json"}, None), None,
                                connect_timeout=connect_timeout, answer_timeout=timeout)
    return answer.status, answer.body


async def test_calls_in_turn_share_one_keep_alive_connection(upstreams: list[Upstream]) -> None:
    async def answer(_: bytes) -> bytes:
        return ok()

    upstream, pool = await start(upstreams, answer)
    for _ in range(5):
        assert await get(pool) == (200, b'{"ok": true}')
    assert upstream.connections == 1
    assert upstream.requests[0].startswith(b"GET /replicate/v1/predictions/abc HTTP/1.1\r\nHost: 127.0.0.1:")
    pool.close()


async def test_the_body_and_its_length_are_sent_as_given(upstreams: list[Upstream]) -> None:
    async def answer(_: bytes) -> bytes:
        return ok(b"{}", status="201 Created")

    upstream, pool = await start(upstreams, answer)
    head = pool.head("POST", "v1/predictions", {"Content-Type": "application/json"}, 12)
    reply = await pool.request(head, b'{"input":{}}', connect_timeout=1.0, answer_timeout=2.0)
    assert reply.status == 201
    assert b"\r\nContent-Length: 12\r\n" in upstream.requests[0]
    assert upstream.requests[0].endswith(b'\r\n\r\n{"input":{}}')
    pool.close()


async def test_no_more_connections_than_the_limit_and_every_call_is_answered(upstreams: list[Upstream]) -> None:
    async def slow(_: bytes) -> bytes:
        await asyncio.sleep(0.05)
        return ok()

    upstream, pool = await start(upstreams, slow, max_connections=2)
    results = await asyncio.gather(*(get(pool) for _ in range(8)))
    assert results == [(200, b'{"ok": true}')] * 8
    assert upstream.most_open == 2
    pool.close()


async def test_waiting_for_a_free_connection_too_long_sent_nothing(upstreams: list[Upstream]) -> None:
    async def slow(_: bytes) -> bytes:
        await asyncio.sleep(0.5)
        return ok()

    upstream, pool = await start(upstreams, slow, max_connections=1)
    first = asyncio.ensure_future(get(pool))
    await asyncio.sleep(0.05)
    with pytest.raises(ConnectFailed) as caught:
        # Waiting for a free connection counts against the connect time-out, not the answer's.
        await get(pool, timeout=5, connect_timeout=0.1)
    assert caught.value.sent is False
    assert await first == (200, b'{"ok": true}')
    assert len(upstream.requests) == 1
    pool.close()


async def test_a_refused_connection_sent_nothing() -> None:
    pool = WirePool(f"http://127.0.0.1:{free_port()}", max_body_bytes=100)
    with pytest.raises(ConnectFailed) as caught:
        await get(pool)
    assert caught.value.sent is False


async def test_an_idle_connection_the_upstream_closed_is_not_reused(upstreams: list[Upstream]) -> None:
    async def answer_then_close(_: bytes) -> bytes | None:
        return ok(b"{}", "Keep-Alive: timeout=0")

    upstream, pool = await start(upstreams, answer_then_close)
    assert await get(pool) == (200, b"{}")
    # The upstream drops the idle connection, as servers do when their keep-alive time ends.
    assert upstream.server is not None
    for task in asyncio.all_tasks():
        if "handle" in repr(task.get_coro()):
            task.cancel()
    await asyncio.sleep(0.1)
    assert await get(pool) == (200, b"{}")
    assert upstream.connections == 2
    pool.close()


async def test_connection_close_and_http_1_0_answers_are_not_reused(upstreams: list[Upstream]) -> None:
    replies = [ok(b"1", "Connection: close"), b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n2", ok(b"3")]

    async def answer(_: bytes) -> bytes:
        return replies.pop(0)

    upstream, pool = await start(upstreams, answer)
    assert [await get(pool) for _ in range(3)] == [(200, b"1"), (200, b"2"), (200, b"3")]
    assert upstream.connections == 3
    pool.close()


async def test_chunked_eof_delimited_interim_and_compressed_answers_are_read_whole(
        upstreams: list[Upstream]) -> None:
    payload = b'{"output": "' + b"x" * 3000 + b'"}'
    replies = [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{\"a\":\r\n3\r\n 1}\r\n0\r\n\r\n",
        b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n" + ok(b"after hints"),
        ok(gzip.compress(payload), "Content-Encoding: gzip"),
        ok(zlib.compress(payload), "Content-Encoding: deflate"),
        b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end",
    ]

    async def answer(_: bytes) -> bytes:
        return replies.pop(0)

    _, pool = await start(upstreams, answer)
    assert await get(pool) == (200, b'{"a": 1}')
    assert await get(pool) == (200, b"after hints")
    assert await get(pool) == (200, payload)
    assert await get(pool) == (200, payload)
    assert await get(pool) == (200, b"until the end")
    pool.close()


async def test_a_body_past_the_limit_is_refused_even_compressed(upstreams: list[Upstream]) -> None:
    bomb = gzip.compress(b"0" * 1_000_000)
    replies = [ok(b"y" * 20_000), ok(bomb, "Content-Encoding: gzip"), ok(b"fine")]

    async def answer(_: bytes) -> bytes:
        return replies.pop(0)

    _, pool = await start(upstreams, answer)
    assert len(bomb) < 10_000
    for _ in range(2):
        with pytest.raises(BodyTooLarge):
            await get(pool)
    assert await get(pool) == (200, b"fine")
    pool.close()


async def test_a_silent_upstream_times_out_and_a_cut_answer_is_broken_both_maybe_sent(
        upstreams: list[Upstream]) -> None:
    async def silent(_: bytes) -> bytes | None:
        await asyncio.sleep(1)
        return None

    _, pool = await start(upstreams, silent)
    with pytest.raises(AnswerTimeout) as timed_out:
        await get(pool, timeout=0.1)
    assert timed_out.value.sent is True

    async def cut(_: bytes) -> bytes:
        return b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\nConnection: close\r\n\r\n{\"id\""

    _, pool = await start(upstreams, cut)
    with pytest.raises(ConnectionBroken) as broken:
        await get(pool)
    assert broken.value.sent is True

    async def garbage(_: bytes) -> bytes:
        return b"SSH-2.0-OpenSSH\r\n\r\n"

    _, pool = await start(upstreams, garbage)
    with pytest.raises(ConnectionBroken):
        await get(pool)


async def test_a_cancelled_call_frees_its_connection_slot(upstreams: list[Upstream]) -> None:
    calls = 0

    async def first_slow(_: bytes) -> bytes:
        nonlocal calls
        calls += 1
        if calls == 1:
            await asyncio.sleep(0.3)
        return ok(b"%d" % calls)

    upstream, pool = await start(upstreams, first_slow, max_connections=1)
    slow = asyncio.ensure_future(get(pool))
    await asyncio.sleep(0.05)
    slow.cancel()
    with pytest.raises(asyncio.CancelledError):
        await slow
    # The cancelled call's connection is closed (its answer would arrive late); a new one is made.
    assert await get(pool) == (200, b"2")
    assert upstream.connections == 2
    pool.close()


def test_a_header_or_path_with_a_line_break_is_never_sent() -> None:
    pool = WirePool("http://127.0.0.1:9/replicate", max_body_bytes=100)
    with pytest.raises(ValueError, match="line break"):
        pool.head("POST", "v1/predictions", {"Prefer": "wait\r\nX-Injected: 1"}, None)
    with pytest.raises(ValueError, match="space"):
        pool.head("GET", "v1/predictions/a b", {}, None)
    assert pool.head("GET", "v1/x", {"Prefer": "wait=5"}, None) == (
        b"GET /replicate/v1/x HTTP/1.1\r\nHost: 127.0.0.1:9\r\nPrefer: wait=5\r\n\r\n")
    with pytest.raises(ValueError, match="line break"):
        WirePool.header_lines({"Authorization": "Bearer a\nb"})
    fixed = WirePool.header_lines({"Accept": "application/json", "User-Agent": "gw"})
    assert pool.head("GET", "v1/x", {"Prefer": "wait=5"}, 3, fixed_lines=fixed) == (
        b"GET /replicate/v1/x HTTP/1.1\r\nHost: 127.0.0.1:9\r\nAccept: application/json\r\nUser-Agent: gw\r\n"
        b"Prefer: wait=5\r\nContent-Length: 3\r\n\r\n")
    https = WirePool("https://relay.example/api/replicate/", max_body_bytes=100)
    assert https.head("GET", "v1/x", {}, None).startswith(b"GET /api/replicate/v1/x HTTP/1.1\r\nHost: relay.example\r\n")


async def test_https_upstreams_are_verified_and_spoken_to_over_tls(
        upstreams: list[Upstream], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("needs the openssl command to make a certificate")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)

    async def answer(_: bytes) -> bytes:
        return ok(b"over tls")

    upstream = Upstream(answer)
    upstreams.append(upstream)
    upstream.server = await asyncio.start_server(upstream.handle, "127.0.0.1", 0, ssl=context)
    base = f"https://127.0.0.1:{upstream.server.sockets[0].getsockname()[1]}/replicate"

    # Not trusted (self-signed): refused before any request is written.
    untrusted = WirePool(base, max_body_bytes=100)
    with pytest.raises(ConnectFailed) as caught:
        await get(untrusted)
    assert caught.value.sent is False
    assert upstream.requests == []

    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # the certificate as a trusted root
    trusted = WirePool(base, max_body_bytes=100)
    assert await get(trusted) == (200, b"over tls")
    assert await get(trusted) == (200, b"over tls")
    assert upstream.connections == 1
    trusted.close()


def test_a_pool_used_from_a_new_event_loop_opens_new_connections() -> None:
    async def answer(_: bytes) -> bytes:
        return ok(b"fresh")

    upstream = Upstream(answer)

    async def serve_and_call(pool: WirePool | None) -> WirePool:
        base = await upstream.start() if upstream.server is None else ""
        pool = pool or WirePool(base, max_body_bytes=100, max_connections=1)
        assert await get(pool) == (200, b"fresh")
        return pool

    async def both() -> None:
        pool = await serve_and_call(None)
        # The same pool in another loop (as an app started twice in one process would use it).
        await asyncio.to_thread(asyncio.run, serve_and_call(pool))
        assert upstream.connections == 2
        assert upstream.server is not None
        upstream.server.close()

    asyncio.run(both())
