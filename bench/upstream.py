"""A fast fake Replicate relay for the benchmark: raw asyncio + httptools (+ uvloop), no framework.

    python bench/upstream.py --port 9101 --delay-ms 50 [--workers 1]

Routes (any Authorization accepted, HTTP/1.1 keep-alive):

  POST /replicate/v1/models/{owner}/{name}/predictions   -> 201, a new prediction, status "starting"
  POST /replicate/v1/predictions                         -> the same
  GET  /replicate/v1/predictions/{id}                    -> 200, the prediction
  POST /replicate/v1/predictions/{id}/cancel             -> 200, status "canceled"

The model name decides how a prediction lives, so one gateway run can hold each kind:

  bench/running   ids "run...": every GET answers "processing" (a prediction that never ends)
  bench/finished  ids "fin...": the create already answers "succeeded" (final in the gateway's
                  ledger at once, so its GETs are served from the ledger)
  anything else   ids "prd...": the create answers "starting", every GET "succeeded", so the
                  gateway's reconciler settles a benchmark's creates at its first poll

Every answer waits --delay-ms first (call_later, no thread, no sleep loop).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import itertools
import json
import os
import signal
import socket
import sys
from datetime import UTC, datetime

import httptools

try:
    import orjson

    def dumps(value: object) -> bytes:
        return orjson.dumps(value)

    loads = orjson.loads
except ImportError:  # pragma: no cover
    def dumps(value: object) -> bytes:
        return json.dumps(value, separators=(",", ":")).encode()

    loads = json.loads

PREFIX = b"/replicate/v1/"
API = "https://api.replicate.com/v1/predictions/"
_counter = itertools.count()
_salt = base64.b32encode(os.urandom(5)).decode().lower()  # per process: ids unique across workers


def new_id(kind: str) -> str:
    return f"{kind}{_salt}{next(_counter):015d}"


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# A real upstream's timestamps are set once; one moment for all keeps every answer stable, so a
# GET of an unchanged prediction looks unchanged to the gateway, as it would in production.
STAMP = now()


def prediction(pid: str, status: str, model: str, inputs: object) -> dict[str, object]:
    done = status in ("succeeded", "failed", "canceled")
    return {
        "id": pid,
        "model": model,
        "version": "hidden",
        "input": inputs,
        "logs": "generating...\n" if status != "starting" else "",
        "output": ["https://replicate.delivery/xezq/bench/out-0.webp"] if status == "succeeded" else None,
        "data_removed": False,
        "error": None,
        "status": status,
        "created_at": STAMP,
        "started_at": STAMP if status != "starting" else None,
        "completed_at": STAMP if done else None,
        "urls": {
            "cancel": API + pid + "/cancel",
            "get": API + pid,
            "stream": "https://stream.replicate.com/v1/files/bench" + pid,
            "web": "https://replicate.com/p/" + pid,
        },
        "metrics": {"predict_time": 0.5, "total_time": 0.6} if done else {},
    }


def route(method: bytes, path: bytes, body: bytes) -> tuple[int, bytes]:
    if not path.startswith(PREFIX):
        return 404, b'{"detail":"not found"}'
    rest = path[len(PREFIX):].split(b"?", 1)[0].decode()
    parts = rest.split("/")
    if method == b"POST" and (
        (len(parts) == 4 and parts[0] == "models" and parts[3] == "predictions")
        or rest == "predictions"
    ):
        try:
            data = loads(body) if body else {}
        except ValueError:
            return 400, b'{"detail":"invalid JSON"}'
        model = f"{parts[1]}/{parts[2]}" if len(parts) == 4 else "bench/version"
        inputs = data.get("input", {}) if isinstance(data, dict) else {}
        if model == "bench/running":
            return 201, dumps(prediction(new_id("run"), "starting", model, inputs))
        if model == "bench/finished":
            return 201, dumps(prediction(new_id("fin"), "succeeded", model, inputs))
        return 201, dumps(prediction(new_id("prd"), "starting", model, inputs))
    if len(parts) == 2 and parts[0] == "predictions" and method == b"GET":
        pid = parts[1]
        status = "processing" if pid.startswith("run") else "succeeded"
        model = {"run": "bench/running", "fin": "bench/finished"}.get(pid[:3], "bench/load")
        return 200, dumps(prediction(pid, status, model, {"prompt": "a lighthouse at dusk"}))
    if len(parts) == 3 and parts[0] == "predictions" and parts[2] == "cancel" and method == b"POST":
        return 200, dumps(prediction(parts[1], "canceled", "bench/load", {}))
    return 404, b'{"detail":"not found"}'


REASONS = {200: b"OK", 201: b"Created", 400: b"Bad Request", 404: b"Not Found"}


class HttpProtocol(asyncio.Protocol):
    __slots__ = ("_body", "_delay", "_keep_alive", "_loop", "_parser", "_transport", "_url")

    def __init__(self, delay: float) -> None:
        self._delay = delay
        self._loop = asyncio.get_running_loop()
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._url = b""
        self._body: list[bytes] = []
        self._keep_alive = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            if self._transport is not None:
                self._transport.write(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                self._transport.close()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._url = b""
        self._body = []

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        method = self._parser.get_method()
        self._keep_alive = self._parser.should_keep_alive()
        status, payload = route(method, self._url, b"".join(self._body))
        head = (b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%s\r\n"
                % (status, REASONS.get(status, b"OK"), len(payload),
                   b"" if self._keep_alive else b"connection: close\r\n"))
        if self._delay > 0:
            self._loop.call_later(self._delay, self._send, head + payload, self._keep_alive)
        else:
            self._send(head + payload, self._keep_alive)

    def _send(self, data: bytes, keep_alive: bool) -> None:
        if self._transport is None:
            return
        self._transport.write(data)
        if not keep_alive:
            self._transport.close()


def serve_forever(sock: socket.socket, delay: float) -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover
        pass

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = loop.create_future()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
        server = await loop.create_server(lambda: HttpProtocol(delay), sock=sock, backlog=4096)
        async with server:
            await stop

    asyncio.run(main())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay-ms", type=float, default=0.0)
    parser.add_argument("--workers", type=int, default=1, help="processes sharing the port (SO_REUSEPORT)")
    args = parser.parse_args()
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        parser.error("the fake upstream listens on loopback only")
    delay = args.delay_ms / 1000.0
    children: list[int] = []
    for _ in range(max(1, args.workers)):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((args.host, args.port))
        sock.listen(4096)
        sock.setblocking(False)
        if args.workers <= 1:
            serve_forever(sock, delay)
            return 0
        pid = os.fork()
        if pid == 0:
            serve_forever(sock, delay)
            os._exit(0)
        sock.close()
        children.append(pid)

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for child in children:
        while True:
            try:
                os.waitpid(child, 0)
                break
            except InterruptedError:
                continue
            except ChildProcessError:
                break
    return 0


if __name__ == "__main__":
    sys.exit(main())
