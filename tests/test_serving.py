"""The HTTP protocol's coalescing transport: one write per turn of the loop, nothing lost or late."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import httpx
import pytest

from app.predictions.service import PredictionService
from app.serving import CoalescingTransport
from tests.conftest import Gateway
from tests.servers import ServerThread, read_body


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


class _LaneApp:
    """An app whose fast lane serves /fast/...: records what went through ASGI and what not."""

    def __init__(self) -> None:
        self.through_asgi: list[str] = []
        self.answered_directly: list[str] = []

    def fast_route(self, scope: dict[str, Any]) -> str | None:
        path: str = scope["path"]
        return path if path.startswith("/fast/") else None

    async def fast_answer(self, scope: dict[str, Any], receive: Any, route: str, respond: Any) -> None:
        self.answered_directly.append(route)
        body = await read_body(receive)
        if route == "/fast/bug":
            raise RuntimeError("a bug in the fast lane")
        answer = route.encode() + b":" + body
        await respond(201, [(b"content-type", b"text/plain"), (b"content-length", str(len(answer)).encode())],
                      answer)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            self.through_asgi.append(scope["path"])
        await _hello(scope, receive, send)


def _read_answers(raw: socket.socket, count: int) -> list[tuple[bytes, bytes]]:
    """`count` answers with Content-Length bodies from a raw connection: (head, body) each."""
    buffer, answers = b"", []
    while len(answers) < count:
        while b"\r\n\r\n" not in buffer:
            chunk = raw.recv(65536)
            assert chunk, f"connection closed after {len(answers)} answers"
            buffer += chunk
        head, buffer = buffer.split(b"\r\n\r\n", 1)
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        while len(buffer) < length:
            buffer += raw.recv(65536)
        answers.append((head, buffer[:length]))
        buffer = buffer[length:]
    return answers


def test_fast_lane_requests_are_answered_without_asgi_and_the_rest_through_it() -> None:
    app = _LaneApp()
    server = ServerThread(app, lifespan="off").start()
    try:
        with httpx.Client(base_url=server.url) as client:
            answers = [client.get(f"/fast/{n}") for n in range(5)]
            posted = client.post("/fast/post", content=b"x" * 100_000)
            other = client.get("/other")
            failed = client.get("/fast/bug")
    finally:
        server.stop()
    assert [(a.status_code, a.text) for a in answers] == [(201, f"/fast/{n}:") for n in range(5)]
    assert all("date" in a.headers and "x-request-id" not in a.headers for a in answers)
    assert (posted.status_code, posted.content) == (201, b"/fast/post:" + b"x" * 100_000)
    assert other.text == "/other"
    assert failed.status_code == 500
    assert failed.headers["content-type"] == "application/problem+json"
    assert failed.json() == {"title": "Internal Server Error", "detail": "An unexpected error occurred",
                             "status": 500}
    assert app.through_asgi == ["/other"]
    assert app.answered_directly == [*(f"/fast/{n}" for n in range(5)), "/fast/post", "/fast/bug"]


def test_direct_answers_keep_pipelined_order_continue_and_close_like_uvicorn() -> None:
    app = _LaneApp()
    server = ServerThread(app, lifespan="off").start()
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw:
            # Pipelined, mixed with a request that goes through ASGI: answered in order.
            raw.sendall(b"GET /fast/a HTTP/1.1\r\nHost: x\r\n\r\n"
                        b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n"
                        b"POST /fast/b HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc")
            assert [body for _, body in _read_answers(raw, 3)] == [b"/fast/a:", b"/slow", b"/fast/b:abc"]
            # Expect: 100-continue: the interim answer once the body is asked for, then the answer.
            raw.sendall(b"POST /fast/c HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
            assert raw.recv(65536) == b"HTTP/1.1 100 Continue\r\n\r\n"
            raw.sendall(b"data")
            ((head, body),) = _read_answers(raw, 1)
            assert head.startswith(b"HTTP/1.1 201 Created\r\n")
            assert body == b"/fast/c:data"
        for request in (b"GET /fast/old HTTP/1.0\r\n\r\n",
                        b"GET /fast/old HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"):
            with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw:
                raw.sendall(request)
                received = b""
                while chunk := raw.recv(65536):  # the server closes the connection after answering
                    received += chunk
            assert b"\r\nconnection: close\r\n" in received
            assert received.endswith(b"\r\n\r\n/fast/old:")
    finally:
        server.stop()
    assert app.through_asgi == ["/slow"]


def test_after_a_routes_unexpected_error_the_connection_serves_the_next_request(
    gateway: Gateway, token: str, log_lines: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A bug is the one path no real input takes: the route's service is made to raise.
    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(PredictionService, "page", broken)
    request = f"Host: x\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
    with socket.create_connection(("127.0.0.1", gateway.server.port), timeout=5) as raw:
        raw.sendall(b"GET /replicate/v1/predictions HTTP/1.1\r\n" + request)
        ((failed, _),) = _read_answers(raw, 1)
        # The client may reuse the connection at once: it must still be there.
        raw.sendall(b"GET /replicate/v1/account HTTP/1.1\r\n" + request)
        ((after, body),) = _read_answers(raw, 1)
    assert failed.startswith(b"HTTP/1.1 500 ")
    assert after.startswith(b"HTTP/1.1 200 "), after
    assert b'"type"' in body
    errors = [line for line in log_lines if '"level":"error"' in line]
    assert len(errors) == 1, errors  # the gateway's own line, not the server's again
    assert '"event":"request.failed"' in errors[0]
