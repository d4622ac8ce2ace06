"""One pooled HTTP client per upstream, with a header allow-list and scrubbed error mapping."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
import orjson

from app.errors import (
    GatewayError,
    Throttled,
    UpstreamInvalid,
    UpstreamStatus,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from app.outbound import outbound_client
from app.upstream.transport import AiohttpTransport

log = logging.getLogger(__name__)

Observer = Callable[[str, str, float, str | None], None]  # upstream, operation, seconds, error
DEFAULT_RETRY_AFTER = 5
MAX_RETRY_AFTER = 600
_URL_PATTERN = re.compile(r"\b(?:https?|wss?)://[^\s\"'<>]+", re.IGNORECASE)
_STATUS_TITLES = {400: "Bad Request", 402: "Payment Required", 404: "Not found", 409: "Conflict",
                  413: "Request Entity Too Large", 422: "Input validation failed"}
_STATUS_DETAILS = {
    400: "The upstream service rejected the request as invalid",
    402: "The upstream service refused to run the prediction: its account is out of credit",
    404: "The model, version or prediction was not found upstream",
    413: "The request is too large for the upstream service",
    422: "The upstream service rejected the input",
}
_KEY_PATTERN = re.compile(r"\b(?:sk|r8|gw|whsec)[-_][A-Za-z0-9_\-]{6,}")


def _segment(value: str) -> str:
    """One percent-encoded path segment; "." and ".." too, which URL joining would resolve."""
    encoded = quote(value, safe="")
    return encoded.replace(".", "%2E") if encoded in (".", "..") else encoded


def _is_seconds(value: str) -> bool:
    """Whether a Retry-After value is plain ASCII digits (not an HTTP date, not "²")."""
    return value.isascii() and value.isdigit()


@dataclass(frozen=True)
class UpstreamFailure(Exception):
    """An upstream call that failed; `error` is what the client sees."""

    error: GatewayError
    maybe_sent: bool


class UpstreamClient:
    """Calls one upstream (a relay or Replicate) at `{base_url}/v1/...`."""

    def __init__(
        self,
        *,
        name: str,
        base_url: str,
        token: str | None,
        connect_timeout: float,
        request_timeout: float,
        create_timeout: float,
        max_body_bytes: int,
        transport: httpx.AsyncBaseTransport | None = None,
        observer: Observer | None = None,
    ) -> None:
        self.name = name
        self.base_url = base_url.rstrip("/")
        self._token = token
        self._request_timeout = request_timeout
        self._create_timeout = create_timeout
        self._connect_timeout = connect_timeout
        self._max_body_bytes = max_body_bytes
        self._observer = observer
        headers = {"User-Agent": "replicate-gateway", "Accept": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._http = outbound_client(
            base_url=self.base_url + "/",
            headers=headers,
            transport=transport if transport is not None else AiohttpTransport(max_connections=200),
            timeout=httpx.Timeout(request_timeout, connect=connect_timeout),
        )
        self._secrets = [s for s in (token, self.base_url, httpx.URL(self.base_url).host) if s]

    async def aclose(self) -> None:
        """Close the pooled connections."""
        await self._http.aclose()

    async def reachable(self) -> bool:
        """Whether the upstream answers HTTP at all (any status), for the readiness check."""
        try:
            response = await self._http.get("v1/", timeout=self._connect_timeout)
        except httpx.HTTPError:
            return False
        await response.aclose()
        return True

    async def create_prediction(
        self,
        path: str,
        body: dict[str, Any],
        *,
        prefer: str | None,
        cancel_after: str | None,
        wait_seconds: int | None,
    ) -> dict[str, Any]:
        """POST a create; never retried, since bytes may have reached the upstream."""
        headers = {"Content-Type": "application/json"}
        if prefer:
            headers["Prefer"] = prefer
        if cancel_after:
            headers["Cancel-After"] = cancel_after
        read_timeout = self._create_timeout + (wait_seconds or 0)
        reply: dict[str, Any] = await self._call(
            "POST", path, operation="create", content=orjson.dumps(body), headers=headers,
            request_timeout=httpx.Timeout(read_timeout, connect=self._connect_timeout),
        )
        return reply

    async def get_prediction(self, upstream_id: str) -> dict[str, Any]:
        """GET one prediction by its upstream id."""
        reply: dict[str, Any] = await self._call("GET", "v1/predictions/" + _segment(upstream_id), operation="get")
        return reply

    async def cancel_prediction(self, upstream_id: str) -> dict[str, Any]:
        """POST a cancel; never retried."""
        path = "v1/predictions/" + _segment(upstream_id) + "/cancel"
        reply: dict[str, Any] = await self._call("POST", path, operation="cancel")
        return reply

    async def get_json(self, path: str) -> Any:
        """GET any read-only JSON resource, such as a model or a version."""
        return await self._call("GET", path, expect_object=False)

    async def _call(
        self,
        method: str,
        path: str,
        *,
        operation: str = "read",
        content: bytes | None = None,
        headers: dict[str, str] | None = None,
        request_timeout: httpx.Timeout | None = None,
        expect_object: bool = True,
    ) -> Any:
        started = time.perf_counter()
        error: str | None = None
        try:
            return await self._send(method, path, content=content, headers=headers,
                                    request_timeout=request_timeout, expect_object=expect_object)
        except UpstreamFailure as failure:
            error = str(failure.error.status)
            raise
        finally:
            if self._observer is not None:
                self._observer(self.name, operation, time.perf_counter() - started, error)

    async def _send(
        self,
        method: str,
        path: str,
        *,
        content: bytes | None,
        headers: dict[str, str] | None,
        request_timeout: httpx.Timeout | None,
        expect_object: bool,
    ) -> Any:
        request = self._http.build_request(
            method, path, content=content, headers=headers,
            timeout=request_timeout if request_timeout is not None else httpx.USE_CLIENT_DEFAULT,
        )
        try:
            response = await self._http.send(request, stream=True)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.UnsupportedProtocol) as exc:
            log.warning("upstream.unreachable", extra={"upstream": self.name, "error": type(exc).__name__})
            raise UpstreamFailure(UpstreamUnavailable(), maybe_sent=False) from None
        except httpx.TimeoutException as exc:
            log.warning("upstream.timeout", extra={"upstream": self.name, "error": type(exc).__name__})
            raise UpstreamFailure(UpstreamTimeout(), maybe_sent=True) from None
        except httpx.TransportError as exc:
            log.warning("upstream.transport_error", extra={"upstream": self.name, "error": type(exc).__name__})
            raise UpstreamFailure(UpstreamUnavailable(), maybe_sent=True) from None
        try:
            body = await self._read_capped(response)
        finally:
            await response.aclose()
        return self._interpret(response, body, expect_object=expect_object)

    async def _read_capped(self, response: httpx.Response) -> bytes:
        chunks: list[bytes] = []
        size = 0
        try:
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > self._max_body_bytes:
                    log.warning("upstream.body_too_large", extra={"upstream": self.name})
                    raise UpstreamFailure(
                        UpstreamInvalid("The upstream service returned a response that is too large"),
                        maybe_sent=True,
                    )
                chunks.append(chunk)
        except httpx.TimeoutException:
            raise UpstreamFailure(UpstreamTimeout(), maybe_sent=True) from None
        except httpx.TransportError:
            raise UpstreamFailure(UpstreamUnavailable(), maybe_sent=True) from None
        return b"".join(chunks)

    def _interpret(self, response: httpx.Response, body: bytes, *, expect_object: bool) -> Any:
        status = response.status_code
        if 200 <= status < 300:
            try:
                data = orjson.loads(body)
            except orjson.JSONDecodeError:
                log.warning("upstream.invalid_json", extra={"upstream": self.name, "status": status})
                raise UpstreamFailure(UpstreamInvalid(), maybe_sent=True) from None
            if expect_object and not isinstance(data, dict):
                raise UpstreamFailure(UpstreamInvalid(), maybe_sent=True)
            return data
        log.warning("upstream.error_status", extra={"upstream": self.name, "status": status})
        if status == 429:
            raise UpstreamFailure(
                Throttled(self._retry_after(response), "The upstream service is throttling requests"),
                maybe_sent=False,
            )
        if status in (401, 403):
            raise UpstreamFailure(
                UpstreamInvalid("The upstream service rejected the gateway's credentials"),
                maybe_sent=False,
            )
        if 300 <= status < 400 or status < 200:
            raise UpstreamFailure(UpstreamInvalid(), maybe_sent=True)
        title, detail, extra = self._scrubbed_problem(body, status)
        headers = {}
        if status in (503, 504) and _is_seconds(response.headers.get("retry-after", "")):
            headers["Retry-After"] = str(self._retry_after(response))
        error = UpstreamStatus(status, title, detail, headers=headers, extra=extra)
        raise UpstreamFailure(error, maybe_sent=status >= 500)

    def _retry_after(self, response: httpx.Response) -> int:
        value = response.headers.get("retry-after", "").strip()
        if _is_seconds(value):
            return min(max(1, int(value)), MAX_RETRY_AFTER)
        return DEFAULT_RETRY_AFTER

    def _scrubbed_problem(self, body: bytes, status: int) -> tuple[str, str, dict[str, Any]]:
        # The upstream's own title and detail can name the relay, its account or its hosts
        # (npm shows error bodies verbatim), so only structured field errors pass through.
        title = _STATUS_TITLES.get(status, "Upstream error")
        detail = _STATUS_DETAILS.get(status) or f"The upstream service refused the request (status {status})"
        if status >= 500:
            return "Upstream error", f"The upstream service failed (status {status})", {}
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            data = None
        fields = data.get("invalid_fields") if isinstance(data, dict) else None
        if not isinstance(fields, list) or not fields:
            return title, detail, {}
        invalid_fields = [
            {key: self.scrub(f.get(key)) for key in ("type", "field", "description")}
            for f in fields[:50] if isinstance(f, dict)
        ]
        if not invalid_fields:
            return title, detail, {}
        detail = "".join(f"- {f['field']}: {f['description']}\n" for f in invalid_fields)
        return "Input validation failed", detail, {"invalid_fields": invalid_fields}

    def scrub(self, value: Any) -> str:
        """A short text with no URL, host, key or credential-looking value left in it."""
        if not isinstance(value, str):
            return ""
        # Scrub before shortening, so no secret is cut in two and half of it kept.
        text = _URL_PATTERN.sub("[url]", value[:20000])
        text = _KEY_PATTERN.sub("[redacted]", text)
        for secret in self._secrets:
            text = re.sub(re.escape(secret), "[upstream]", text, flags=re.IGNORECASE)
        return text[:2000]
