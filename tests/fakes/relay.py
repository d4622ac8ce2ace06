"""A fake Replicate-format relay (CometAPI-like) served over real HTTP by uvicorn, for tests."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import secrets
import socket
import string
import struct
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Self

import uvicorn

RELAY_BRAND = "FakeRelay"
DEFAULT_KEY = "sk-relay-canary-7f3a9c1e5b"
PREFIX = "/replicate/v1"
COOKIE = "relay_session=secret-cookie; Path=/"
TERMINAL = frozenset({"succeeded", "failed", "canceled"})
FAULT_KINDS = frozenset({"status", "throttle", "hang", "late", "non_json", "huge", "redirect", "reset"})
# Faults that answer normally, only later: "hang" before making its answer, "late" after it (a
# stale answer, from before anything that happened meanwhile).
_DELAYS = frozenset({"hang", "late"})
DEFAULT_SETTINGS: dict[str, Any] = {
    "starting_seconds": 0.3,
    "processing_seconds": 0.6,
    "predict_time": 2.5,
    "versions_supported": True,
    "honour_prefer": True,
    "versions": {},
    # Outputs served by the relay itself at stable URLs (downloadable, gone after forget()).
    "outputs_on_relay": False,
    # Logs and errors that name the relay: its base URL, host, brand and its prediction id.
    "names_itself": False,
    # A cancel takes effect as it arrives; its answer comes this much later, as from a relay
    # that passes the cancel on and waits for its own upstream's answer.
    "cancel_seconds": 0.0,
}
NOT_FOUND = {"detail": "Not found"}
DELIVERY = "/delivery"


def output_bytes(prediction_id: str, name: str) -> bytes:
    """The content of one relay-served output file (deterministic, so tests can compare)."""
    return b"RIFF\x00\x00\x00\x00WEBPVP8 " + f"{prediction_id}/{name}".encode() * 64

Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Result = tuple[int, Any]

_ALNUM = string.ascii_lowercase + string.digits
_CHUNK = 64 * 1024


def _rand(n: int) -> str:
    return "".join(secrets.choice(_ALNUM) for _ in range(n))


def _iso(ns: int, digits: int) -> str:
    """UTC timestamp with `digits` fractional digits (3 = ms, 9 = ns), Z-suffixed."""
    secs, rem = divmod(ns, 10**9)
    stamp = datetime.fromtimestamp(secs, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{stamp}.{rem // 10 ** (9 - digits):0{digits}d}Z"


@dataclass
class Call:
    """One request as received by the relay."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes
    had_key: bool
    prediction_id: str | None = None
    status: int | None = None

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class _Fault:
    kind: str
    remaining: int
    params: dict[str, Any]
    path_contains: str | None = None
    method: str | None = None


@dataclass
class _Prediction:
    data: dict[str, Any]
    created_ns: int
    t0: float
    starting: float
    processing: float
    predict_time: float
    forgotten: bool = False


class FakeRelay:
    """A Replicate-format relay on 127.0.0.1 with scriptable faults and a call log."""

    starting_seconds: float
    processing_seconds: float
    predict_time: float
    versions_supported: bool
    honour_prefer: bool
    versions: dict[str, str]
    outputs_on_relay: bool
    names_itself: bool
    cancel_seconds: float

    def __init__(self, key: str = DEFAULT_KEY, **settings: Any) -> None:
        unknown = set(settings) - set(DEFAULT_SETTINGS)
        if unknown:
            raise TypeError(f"unknown FakeRelay settings: {sorted(unknown)}")
        self.key = key
        self._settings = {**DEFAULT_SETTINGS, **settings}
        self._lock = threading.Lock()
        self._calls: list[Call] = []
        self._preds: dict[str, _Prediction] = {}
        self._faults: list[_Fault] = []
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._port: int | None = None
        self._stopping = False
        self._restore_settings()

    # ---- settings, control and inspection (called from the test thread) ----

    def _restore_settings(self) -> None:
        for name, value in self._settings.items():
            setattr(self, name, dict(value) if isinstance(value, dict) else value)

    def reset(self) -> None:
        """Forget predictions, calls and pending faults; restore constructor settings."""
        with self._lock:
            self._calls.clear()
            self._preds.clear()
            self._faults.clear()
            self._restore_settings()

    def clear_faults(self) -> None:
        """Drop the faults not yet used; predictions, calls and settings stay."""
        with self._lock:
            self._faults.clear()

    def fail_next(
        self,
        kind: str,
        count: int = 1,
        *,
        path_contains: str | None = None,
        method: str | None = None,
        **params: Any,
    ) -> None:
        """Make the next `count` matching requests misbehave as `kind` (see FAULT_KINDS), each
        after `after_seconds=` if given ("hang" takes `seconds=` and then answers normally;
        "late" answers as it would have at once, `seconds=` later)."""
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}")
        if kind == "status" and "status" not in params:
            raise ValueError("fail_next('status') needs status=<int>")
        fault = _Fault(kind, count, params, path_contains, method.upper() if method else None)
        with self._lock:
            self._faults.append(fault)

    def forget(self, upstream_id: str) -> None:
        """Simulate retention expiry: the prediction 404s from now on."""
        with self._lock:
            self._preds[upstream_id].forgotten = True

    def finish(self, upstream_id: str) -> None:
        """End a prediction's run now, as its scripted time would (a final one stays as it is)."""
        with self._lock:
            p = self._preds[upstream_id]
            elapsed = time.monotonic() - p.t0
            p.starting = min(p.starting, elapsed)
            p.processing = min(p.processing, elapsed - p.starting)
            self._advance(p)

    @property
    def calls(self) -> list[Call]:
        with self._lock:
            return list(self._calls)

    def creates(self) -> list[Call]:
        """Calls that actually created a prediction."""
        return [c for c in self.calls if c.prediction_id is not None]

    @property
    def predictions(self) -> dict[str, dict[str, Any]]:
        """Current state (advanced to now) of every prediction, by upstream id."""
        with self._lock:
            return {pid: json.loads(json.dumps(self._advance(p))) for pid, p in self._preds.items()}

    # ---- server lifecycle ----

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("FakeRelay is not started")
        return self._port

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def upstream_url(self) -> str:
        return self.base_url + "/replicate"

    def start(self) -> Self:
        if self._thread is not None:
            raise RuntimeError("FakeRelay already started")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self._port = sock.getsockname()[1]
        config = uvicorn.Config(
            self._app, host="127.0.0.1", port=self._port, log_level="warning", lifespan="off",
            loop="asyncio", http="h11", interface="asgi3", proxy_headers=False, access_log=False,
        )
        self._server = server = uvicorn.Server(config)
        self._stopping = False
        self._thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name="fake-relay", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 10
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("FakeRelay failed to start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is None or self._thread is None:
            return
        self._stopping = True  # wakes hanging requests and Prefer waits
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._server = self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- prediction state ----

    def _advance(self, p: _Prediction) -> dict[str, Any]:
        """Move a prediction along its timed lifecycle (call with the lock held)."""
        d = p.data
        elapsed = time.monotonic() - p.t0
        if d["status"] in TERMINAL or elapsed < p.starting:
            return d
        d["status"] = "processing"
        d["started_at"] = _iso(p.created_ns + int(p.starting * 1e9), 9)
        frac = (elapsed - p.starting) / p.processing if p.processing > 0 else 1.0
        d["logs"] = "".join(f"step {i}/3\n" for i in range(1, min(3, int(frac * 3) + 1) + 1))
        if isinstance(d["input"].get("log"), str):  # what the model itself prints, as given
            d["logs"] += d["input"]["log"]
        if self.names_itself:
            d["logs"] = f"fetching from {self.base_url} for {d['id']}\n" + d["logs"]
        if elapsed < p.starting + p.processing:
            return d
        d["completed_at"] = _iso(p.created_ns + int((p.starting + p.processing) * 1e9), 9)
        inp, metrics = d["input"], {"predict_time": p.predict_time}
        text = inp.get("text")
        if self.names_itself:
            d["logs"] += (f"{RELAY_BRAND} worker on 127.0.0.1 ran {d['id']} for "
                          f"{self.upstream_url}/v1/predictions/{d['id']}\n")
        if inp.get("fail") is True:
            d.update(status="failed", error=(f"{self.base_url.upper()} ({RELAY_BRAND.lower()}): prediction {d['id']} failed"
                                              if self.names_itself else "something went wrong"))
        elif d["model"].split("/")[0] == "llm" and isinstance(text, str):
            words = text.split()
            d.update(status="succeeded", output=words)
            metrics.update(input_token_count=len(words), output_token_count=len(words))
        else:
            try:
                n = int(inp.get("num_outputs", 1))
            except (TypeError, ValueError):
                n = 1
            if self.outputs_on_relay:
                urls = [f"{self.base_url}{DELIVERY}/{d['id']}/out-{i}.webp" for i in range(n)]
            else:
                urls = [f"https://replicate.delivery/xezq/{_rand(40)}/out-{i}.webp" for i in range(n)]
            d.update(status="succeeded", output=urls)
            metrics["image_count"] = n
        d["logs"] += "done\n"
        d["metrics"] = metrics
        return d

    def _create(self, model: str, inp: dict[str, Any], extra: dict[str, Any]) -> str:
        pid, now = _rand(26), time.time_ns()
        api = f"https://api.replicate.com/v1/predictions/{pid}"
        data = {
            "id": pid, "model": model, "version": "hidden", "input": inp, "logs": "",
            "output": None, "data_removed": False, "error": None, "source": "api",
            "status": "starting", "created_at": _iso(now, 3),
            "urls": {
                "cancel": f"{api}/cancel", "get": api,
                "stream": f"https://stream.replicate.com/v1/files/bcwr-{_rand(52)}",
                "web": f"https://replicate.com/p/{pid}",
            },
            **extra, "message": f"{RELAY_BRAND} - Replicate",
        }
        with self._lock:
            self._preds[pid] = _Prediction(
                data, now, time.monotonic(), self.starting_seconds, self.processing_seconds,
                self.predict_time,
            )
        return pid

    def _snapshot(self, pid: str) -> dict[str, Any] | None:
        with self._lock:
            p = self._preds.get(pid)
            return None if p is None or p.forgotten else json.loads(json.dumps(self._advance(p)))

    # ---- ASGI application (runs on the server thread) ----

    async def _app(self, scope: Message, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        headers: dict[str, str] = {}
        for k, v in scope["headers"]:
            name, value = k.decode("latin-1").lower(), v.decode("latin-1")
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        method, path = scope["method"], scope["path"]
        call = Call(method, path, scope["query_string"].decode("latin-1"), headers, body,
                    headers.get("authorization") == f"Bearer {self.key}")
        with self._lock:
            self._calls.append(call)
            fault = self._take_fault(method, path)

        async def reply(status: int, payload: bytes, extra: list[tuple[str, str]] | None = None,
                        ctype: str = "application/json") -> None:
            call.status = status
            hs = [("content-type", ctype), ("content-length", str(len(payload))),
                  ("set-cookie", COOKIE), *(extra or [])]
            await send({"type": "http.response.start", "status": status,
                        "headers": [(k.encode(), v.encode()) for k, v in hs]})
            await send({"type": "http.response.body", "body": payload})

        if fault is not None and fault.kind not in _DELAYS:
            # `after_seconds`: a fault that comes only after the upstream seemed to be working on it.
            await self._sleep(float(fault.params.get("after_seconds", 0)))
            await self._misbehave(fault, path, send, reply, call)
            return
        if fault is not None and fault.kind == "hang":
            await self._sleep(float(fault.params.get("seconds", 30)))
        if method == "GET" and path.startswith(DELIVERY + "/"):
            # Like replicate.delivery: no key needed, gone once the prediction is forgotten.
            content = self._delivery(path)
            if content is None:
                await reply(404, json.dumps(NOT_FOUND).encode())
            else:
                await reply(200, content, ctype="image/webp")
            return
        if not call.had_key:
            status, result = 401, {"detail": "Invalid token"}
        else:
            status, result = await self._route(method, path, body, headers, call)
        if fault is not None and fault.kind == "late":
            await self._sleep(float(fault.params.get("seconds", 1)))
        await reply(status, json.dumps(result).encode())

    def _delivery(self, path: str) -> bytes | None:
        parts = path[len(DELIVERY) + 1:].split("/")
        with self._lock:
            prediction = self._preds.get(parts[0]) if len(parts) == 2 else None
            if prediction is None or prediction.forgotten:
                return None
        return output_bytes(parts[0], parts[1])

    def _take_fault(self, method: str, path: str) -> _Fault | None:
        for f in self._faults:
            if (f.method in (None, method)) and (f.path_contains or "") in path:
                f.remaining -= 1
                if f.remaining <= 0:
                    self._faults.remove(f)
                return f
        return None

    async def _sleep(self, seconds: float) -> None:
        """Sleep on the server loop, waking early if the relay is stopping."""
        deadline = time.monotonic() + seconds
        while not self._stopping and time.monotonic() < deadline:
            await asyncio.sleep(min(0.02, max(0.0, deadline - time.monotonic())))

    async def _misbehave(self, f: _Fault, path: str, send: Send,
                         reply: Callable[..., Awaitable[None]], call: Call) -> None:
        def problem(status: int, title: str = "Upstream says no") -> dict[str, Any]:
            detail = f"failed at {self.base_url}{path} for key {self.key} ({RELAY_BRAND})"
            return {"title": title, "detail": detail, "status": status}

        if f.kind == "status":
            status = int(f.params["status"])
            body = problem(status)
            if status == 422:
                body["invalid_fields"] = [{"type": "required", "field": "input.prompt",
                                           "description": "prompt is required"}]
            extra = [(str(k), str(v)) for k, v in f.params.get("headers", {}).items()]
            await reply(status, json.dumps(body).encode(), extra)
        elif f.kind == "throttle":
            retry = str(f.params.get("retry_after", 7))
            await reply(429, json.dumps(problem(429, "Too many requests")).encode(),
                        [("retry-after", retry)])
        elif f.kind == "non_json":
            await reply(200, f"<html>{RELAY_BRAND} error page</html>".encode(), ctype="text/html")
        elif f.kind == "redirect":
            await reply(302, b"", [("location", "http://127.0.0.1:1/elsewhere")])
        elif f.kind == "huge":
            await self._send_huge(send, int(f.params.get("size", 20 * 1024 * 1024)),
                                  bool(f.params.get("content_length", False)))
            call.status = 200
        elif f.kind == "reset":
            await self._reset_connection(send)

    async def _send_huge(self, send: Send, size: int, content_length: bool) -> None:
        """Stream a `size`-byte JSON object ({"junk": "xxx..."}) in chunks (chunked by default)."""
        head, tail = b'{"junk":"', b'"}'
        fill = max(0, size - len(head) - len(tail))
        hs = [(b"content-type", b"application/json"), (b"set-cookie", COOKIE.encode())]
        if content_length:
            hs.append((b"content-length", str(len(head) + fill + len(tail)).encode()))
        await send({"type": "http.response.start", "status": 200, "headers": hs})
        await send({"type": "http.response.body", "body": head, "more_body": True})
        chunk = b"x" * _CHUNK
        while fill > 0:
            piece = chunk if fill >= _CHUNK else chunk[:fill]
            fill -= len(piece)
            await send({"type": "http.response.body", "body": piece, "more_body": True})
        await send({"type": "http.response.body", "body": tail})

    @staticmethod
    async def _reset_connection(send: Send) -> None:
        """Abort the TCP connection with an RST, without sending a byte of response.

        uvicorn passes its per-request cycle's bound `send` straight to a bare ASGI app, so
        the transport is reachable as `send.__self__.transport`. SO_LINGER=0 plus abort()
        makes the kernel send RST; the client sees httpx.ReadError or RemoteProtocolError.
        After the abort uvicorn marks the cycle disconnected and stays quiet.
        """
        transport = getattr(getattr(send, "__self__", None), "transport", None)
        if transport is None:
            raise RuntimeError("FakeRelay reset fault: uvicorn transport not reachable")
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
        await asyncio.sleep(0.01)  # let connection_lost run so uvicorn sees the disconnect

    async def _route(self, method: str, path: str, body: bytes, headers: dict[str, str],
                     call: Call) -> Result:
        if not path.startswith(PREFIX + "/"):
            return 404, NOT_FOUND
        parts = path[len(PREFIX) + 1:].split("/")
        match method, parts:
            case "POST", ["models", owner, name, "predictions"]:
                return await self._create_route(f"{owner}/{name}", body, headers, call, {})
            case "POST", ["deployments", owner, name, "predictions"]:
                model = f"{owner}/{name}"
                return await self._create_route(model, body, headers, call, {"deployment": model})
            case "POST", ["predictions"]:
                return await self._create_route(None, body, headers, call, {})
            case "GET", ["predictions", pid]:
                snap = self._snapshot(pid)
                return (200, snap) if snap else (404, NOT_FOUND)
            case "POST", ["predictions", pid, "cancel"]:
                canceled = self._cancel(pid)
                await self._sleep(self.cancel_seconds)
                return canceled
            case "GET", ["models", owner, name, *rest] if self.versions_supported:
                return self._model_route(owner, name, rest, call.query)
        return 404, NOT_FOUND

    async def _create_route(self, model: str | None, body: bytes, headers: dict[str, str],
                            call: Call, extra: dict[str, Any]) -> Result:
        try:
            payload = json.loads(body or b"null")
        except ValueError:
            return 400, {"detail": "Invalid JSON body"}
        inp = payload.get("input") if isinstance(payload, dict) else None
        if not isinstance(inp, dict):
            return 422, {"title": "Input validation failed", "status": 422, "invalid_fields": [
                {"type": "required", "field": "input", "description": "input is required"}]}
        if model is None:
            model = self.versions.get(str(payload.get("version")), "unknown/model")
        pid = call.prediction_id = self._create(model, inp, extra)
        wait = re.search(r"\bwait(?:=(\d+(?:\.\d+)?))?", headers.get("prefer", ""))
        if wait and self.honour_prefer:
            deadline = time.monotonic() + float(wait.group(1) or 60)
            while not self._stopping and time.monotonic() < deadline:
                snap = self._snapshot(pid)
                if snap is None or snap["status"] in TERMINAL:
                    break
                await asyncio.sleep(0.02)
        return 200, self._snapshot(pid)

    def _cancel(self, pid: str) -> Result:
        with self._lock:
            p = self._preds.get(pid)
            if p is None or p.forgotten:
                return 404, NOT_FOUND
            d = self._advance(p)
            if d["status"] not in TERMINAL:
                d.update(status="canceled", completed_at=_iso(time.time_ns(), 9))
            return 200, json.loads(json.dumps(d))

    def _model_route(self, owner: str, name: str, rest: list[str], query: str = "") -> Result:
        model = f"{owner}/{name}"
        vid = next((v for v, m in self.versions.items() if m == model),
                   hashlib.sha256(model.encode()).hexdigest())
        version = {
            "id": vid, "created_at": "2025-01-15T10:00:00.000000Z", "cog_version": "0.9.4",
            "relay": RELAY_BRAND,
            "openapi_schema": {"components": {"schemas": {
                "Output": {"type": "array", "items": {"type": "string", "format": "uri"}}}}},
        }
        match rest:
            case []:
                return 200, {
                    "url": f"https://replicate.com/{model}", "owner": owner, "name": name,
                    "description": f"{model} served by {RELAY_BRAND}", "visibility": "public",
                    "run_count": 1, "latest_version": None, "message": f"{RELAY_BRAND} - Replicate",
                    "default_example": {"id": _rand(26), "urls": {"get": "https://api.replicate.com/v1/predictions/x"}},
                }
            case ["versions"]:
                # Two pages, linked as Replicate links them (a relay passes its links on as they are).
                pages = f"https://api.replicate.com/v1/models/{model}/versions?cursor="
                extra = {"message": f"{RELAY_BRAND} - Replicate"}
                if query == "cursor=page-2":
                    return 200, {"next": None, "previous": pages + "page-1", "results": [{**version, "id": "0" * 64}],
                                 **extra}
                return 200, {"next": pages + "page-2", "previous": None, "results": [version], **extra}
            case ["versions", version_id]:
                return 200, {**version, "id": version_id}
        return 404, NOT_FOUND
