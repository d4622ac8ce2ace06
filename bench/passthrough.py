"""A minimal FastAPI pass-through, for bench/transports.py: one upstream client, no database.

Run by uvicorn (`uvicorn bench.passthrough:app`), configured by environment variables:

  PASSTHROUGH_UPSTREAM  the fake relay's base, e.g. http://127.0.0.1:9101/replicate
  PASSTHROUGH_CLIENT    httpx (httpx.AsyncClient, default transport),
                        httpx-aiohttp (httpx.AsyncClient(transport=gateway_aiohttp_transport()):
                        httpx_aiohttp.AiohttpTransport, a cookie-less session, errors remapped),
                        aiohttp (aiohttp.ClientSession)
                        none (no upstream call at all: a canned prediction, FastAPI's own ceiling)
  PASSTHROUGH_JSON      orjson or json (parse the upstream's answer, rewrite its URLs, serialise)

Each request does what the gateway's hot path does minus the database: forward with the
upstream's key, read the body whole, parse it, rewrite the api.replicate.com URLs, answer JSON.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response

sys.path.insert(0, str(Path(__file__).resolve().parent))

UPSTREAM = os.environ.get("PASSTHROUGH_UPSTREAM", "http://127.0.0.1:9101/replicate").rstrip("/")
CLIENT = os.environ.get("PASSTHROUGH_CLIENT", "httpx")
JSON = os.environ.get("PASSTHROUGH_JSON", "orjson")
HEADERS = {"Authorization": "Bearer bench-upstream-key", "Accept": "application/json",
           "User-Agent": "replicate-gateway"}
LIMIT = 200

if JSON == "orjson":
    import orjson

    loads = orjson.loads
    dumps = orjson.dumps
else:
    loads = json.loads

    def dumps(value: Any) -> bytes:
        return json.dumps(value, separators=(",", ":")).encode()


def gateway_aiohttp_transport() -> Any:
    """The transport recommended for app/upstream/client.py (see RESULTS.md): httpx-aiohttp with
    its own cookie-less session, and the errors mapped so that "maybe sent" stays true."""
    import aiohttp
    import httpx
    import httpx_aiohttp

    class GatewayAiohttpTransport(httpx_aiohttp.AiohttpTransport):
        # httpx-aiohttp 0.2 maps every aiohttp.ClientConnectionError, including a connection the
        # upstream dropped after our request went out (ServerDisconnectedError) and a read
        # time-out (ServerTimeoutError), to httpx.ConnectTimeout, which means "never sent".
        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            try:
                return await super().handle_async_request(request)
            except httpx.TransportError as exc:
                cause = exc.__cause__
                if isinstance(cause, aiohttp.ConnectionTimeoutError):
                    raise httpx.ConnectTimeout(str(cause), request=request) from cause
                if isinstance(cause, aiohttp.ClientConnectorError):
                    raise httpx.ConnectError(str(cause), request=request) from cause
                if isinstance(cause, aiohttp.ServerTimeoutError | TimeoutError):
                    raise httpx.ReadTimeout(str(cause), request=request) from cause
                if isinstance(cause, aiohttp.ClientError | OSError):
                    raise httpx.ReadError(str(cause), request=request) from cause
                raise

    def session() -> aiohttp.ClientSession:
        # Made at the first request, inside the running loop (the transport calls this once).
        return aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=200, keepalive_timeout=5),
            cookie_jar=aiohttp.DummyCookieJar(),  # never replay one caller's upstream cookie for another
        )

    return GatewayAiohttpTransport(client=session)


class Upstream:
    """`call(method, path, body) -> (status, bytes)` over the configured client."""

    async def start(self) -> None:
        if CLIENT == "none":
            import upstream as fake  # bench/upstream.py

            canned = fake.dumps(fake.prediction("prd" + "x" * 23, "processing", "bench/load",
                                                {"prompt": "a lighthouse at dusk"}))

            async def call(method: str, path: str, body: bytes | None) -> tuple[int, bytes]:
                return 200, canned

            self.call = call
            return
        if CLIENT in ("httpx", "httpx-aiohttp"):
            import httpx

            transport = gateway_aiohttp_transport() if CLIENT == "httpx-aiohttp" else None
            self._httpx = httpx.AsyncClient(
                base_url=UPSTREAM + "/", headers=HEADERS, transport=transport,
                timeout=httpx.Timeout(10, connect=5), follow_redirects=False, trust_env=False,
                limits=httpx.Limits(max_connections=LIMIT, max_keepalive_connections=50),
            )
            self.call = self._call_httpx
        else:
            import aiohttp

            self._session = aiohttp.ClientSession(
                base_url=UPSTREAM + "/", headers=HEADERS,
                connector=aiohttp.TCPConnector(limit=LIMIT, keepalive_timeout=5),
                cookie_jar=aiohttp.DummyCookieJar(),
                timeout=aiohttp.ClientTimeout(sock_connect=5, sock_read=10),
            )
            self.call = self._call_aiohttp

    async def _call_httpx(self, method: str, path: str, body: bytes | None) -> tuple[int, bytes]:
        headers = {"Content-Type": "application/json"} if body is not None else None
        request = self._httpx.build_request(method, path, content=body, headers=headers)
        response = await self._httpx.send(request, stream=True)
        try:
            chunks = [chunk async for chunk in response.aiter_bytes()]
        finally:
            await response.aclose()
        return response.status_code, b"".join(chunks)

    async def _call_aiohttp(self, method: str, path: str, body: bytes | None) -> tuple[int, bytes]:
        headers = {"Content-Type": "application/json"} if body is not None else None
        async with self._session.request(method, path, data=body, headers=headers,
                                         allow_redirects=False) as response:
            return response.status, await response.read()

    async def close(self) -> None:
        if CLIENT == "none":
            return
        if CLIENT in ("httpx", "httpx-aiohttp"):
            await self._httpx.aclose()
            if CLIENT == "httpx-aiohttp":
                await self._httpx._transport.client.close()  # type: ignore[attr-defined]
        else:
            await self._session.close()


upstream = Upstream()


@asynccontextmanager
async def lifespan(_: FastAPI) -> AsyncIterator[None]:
    await upstream.start()
    try:
        yield
    finally:
        await upstream.close()


app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)


def _rewrite(value: Any, public: str) -> Any:
    if isinstance(value, dict):
        return {k: _rewrite(v, public) for k, v in value.items()}
    if isinstance(value, list):
        return [_rewrite(v, public) for v in value]
    if isinstance(value, str) and value.startswith("https://api.replicate.com/v1"):
        return public + value[len("https://api.replicate.com/v1"):]
    return value


def _answer(status: int, raw: bytes, request: Request) -> Response:
    data = loads(raw)
    public = f"http://{request.url.netloc}/replicate/v1"
    return Response(dumps(_rewrite(data, public)), status_code=status, media_type="application/json")


@app.post("/replicate/v1/models/{owner}/{name}/predictions")
async def create(owner: str, name: str, request: Request) -> Response:
    body = loads(await request.body())
    status, raw = await upstream.call("POST", f"v1/models/{owner}/{name}/predictions",
                                      dumps({"input": body["input"]}))
    return _answer(status, raw, request)


@app.get("/replicate/v1/predictions/{prediction_id}")
async def get(prediction_id: str, request: Request) -> Response:
    status, raw = await upstream.call("GET", f"v1/predictions/{prediction_id}", None)
    return _answer(status, raw, request)
