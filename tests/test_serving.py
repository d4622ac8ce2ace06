"""The HTTP protocol's coalescing transport: one write per turn of the loop, nothing lost or late."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import httpx

from app.serving import CoalescingTransport
from tests.servers import ServerThread


class RecordingTransport:
    """Stands in for the event loop's transport: records what reaches it."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 1)}.get(name, default)


def _coalescing() -> tuple[CoalescingTransport, RecordingTransport]:
    real = RecordingTransport()
    return CoalescingTransport(real, asyncio.get_running_loop()), real  # type: ignore[arg-type]


def test_writes_made_in_one_turn_of_the_loop_leave_as_one() -> None:
    async def scenario() -> list[bytes]:
        transport, real = _coalescing()
        transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
        transport.write(b"{}")
        assert real.writes == []  # not before the turn ends
        await asyncio.sleep(0)
        transport.write(b"next")
        await asyncio.sleep(0)
        return real.writes

    assert asyncio.run(scenario()) == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}", b"next"]


def test_closing_sends_what_waits_first_and_nothing_is_written_after() -> None:
    async def scenario() -> tuple[list[bytes], bool, Any]:
        transport, real = _coalescing()
        transport.write(b"last words")
        transport.close()
        transport.write(b"too late")
        await asyncio.sleep(0)
        return real.writes, real.closed, transport.get_extra_info("peername")

    assert asyncio.run(scenario()) == ([b"last words"], True, ("127.0.0.1", 1))


async def _hello(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    await receive()
    if scope["path"] == "/stream":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for part in (b"one ", b"two ", b"three"):
            await send({"type": "http.response.body", "body": part, "more_body": True})
            await asyncio.sleep(0.01)
        await send({"type": "http.response.body", "body": b""})
        return
    body = scope["path"].encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def test_a_server_with_it_answers_keep_alive_streamed_and_closing_requests() -> None:
    server = ServerThread(_hello, lifespan="off").start()
    try:
        with httpx.Client(base_url=server.url) as client:
            assert [client.get(f"/{n}").text for n in range(20)] == [f"/{n}" for n in range(20)]
            with client.stream("GET", "/stream") as streamed:
                assert b"".join(streamed.iter_raw()) == b"one two three"
            closing = client.get("/bye", headers={"Connection": "close"})
            assert (closing.text, closing.headers["connection"]) == ("/bye", "close")
        # A raw HTTP/1.0 request: the server answers, then closes the connection.
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw:
            raw.sendall(b"GET /old HTTP/1.0\r\n\r\n")
            received = b""
            while chunk := raw.recv(65536):
                received += chunk
        assert received.startswith(b"HTTP/1.1 200 OK\r\n")
        assert received.endswith(b"\r\n\r\n/old")
    finally:
        server.stop()


def test_writelines_and_end_of_file_keep_the_order_of_what_was_written() -> None:
    async def scenario() -> list[bytes]:
        transport, real = _coalescing()
        real.write_eof = lambda: real.writes.append(b"<eof>")  # type: ignore[attr-defined]
        transport.write(b"head ")
        transport.writelines([b"body ", b"more"])
        transport.write_eof()
        await asyncio.sleep(0)
        return real.writes

    assert asyncio.run(scenario()) == [b"head body more", b"<eof>"]
