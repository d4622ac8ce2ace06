"""One pooled HTTP client per upstream, with a header allow-list and scrubbed error mapping."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
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
from app.upstream import wire
from app.upstream.schemas import UpstreamPrediction, parse_prediction

log = logging.getLogger(__name__)

# upstream, operation, seconds (None: no call to time), error
Observer = Callable[[str, str, float | None, str | None], None]
DEFAULT_RETRY_AFTER = 5
MAX_RETRY_AFTER = 600
# An idempotent GET is sent again at most this many times, after a pause of about
# READ_RETRY_PAUSE, then twice that, each drawn between half and one and a half times it.
READ_RETRIES = 2
READ_RETRY_PAUSE = 0.1
# A retry needs at least this much of the read's time left to be worth sending.
_LEAST_RETRY_SECONDS = 0.25
_TRANSIENT_STATUSES = frozenset({502, 503, 504})
_URL_PATTERN = re.compile(r"\b(?:https?|wss?)://[^\s\"'<>]+", re.IGNORECASE)
_STATUS_TITLES = {400: "Bad Request", 404: "Not found", 409: "Conflict",
                  413: "Request Entity Too Large", 422: "Input validation failed"}
_STATUS_DETAILS = {
    400: "The upstream service rejected the request as invalid",
    402: "The upstream service refused to run the prediction: its account is out of credit",
    404: "The model, version or prediction was not found upstream",
    413: "The request is too large for the upstream service",
    422: "The upstream service rejected the input",
}
_KEY_PATTERN = re.compile(r"\b(?:sk|r8|gw|whsec)[-_][A-Za-z0-9_\-]{6,}")
# An upstream id shorter than this is not replaced in its prediction's text: it could be any word.
_LEAST_HIDDEN_ID = 8
HIDDEN = "[upstream]"


def _segment(value: str) -> str:
    """One percent-encoded path segment; "." and ".." too, which URL joining would resolve."""
    encoded = quote(value, safe="")
    return encoded.replace(".", "%2E") if encoded in (".", "..") else encoded


def _transient(error: GatewayError) -> bool:
    """Whether a failed idempotent read is worth sending again at once: the connection failed or
    broke, or the upstream (or a proxy before it) answered 502, 503 or 504 without asking for a
    longer wait. Not after a time-out, which has spent the read's time already."""
    if isinstance(error, UpstreamUnavailable):
        return True
    if isinstance(error, UpstreamStatus) and error.status in _TRANSIENT_STATUSES:
        retry_after = error.headers.get("Retry-After")
        return retry_after is None or int(retry_after) <= 1
    return False


def _is_seconds(value: str) -> bool:
    """Whether a Retry-After value is plain ASCII digits (not an HTTP date, not "²")."""
    return value.isascii() and value.isdigit()


def _hiding(base_url: str, token: str | None, brand_names: Sequence[str]) -> tuple[tuple[str, ...], re.Pattern[str]]:
    """What betrays an upstream in text it wrote (its key, URL, origin, host and brand names), as
    the fewest lower-case strings whose absence proves there is none, and the pattern replacing them."""
    url = httpx.URL(base_url)
    netloc = url.netloc.decode()
    # Longest first, so a whole URL goes before its host; brands only as whole words.
    places = sorted({s.lower() for s in (token, base_url, f"{url.scheme}://{netloc}", netloc, url.host) if s},
                    key=len, reverse=True)
    brands = sorted({b.lower() for b in brand_names}, key=len, reverse=True)
    pattern = re.compile("|".join(
        [re.escape(p) for p in places] + [rf"(?<![A-Za-z0-9]){re.escape(b)}(?![A-Za-z0-9])" for b in brands]
    ), re.IGNORECASE)
    # Every URL form holds the host: looking for the host alone is enough, and costs a fifth.
    every = {*places, *brands}
    return tuple(p for p in every if not any(q != p and q in p for q in every)), pattern


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
        brand_names: Sequence[str] = (),
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
        # An injected httpx transport (the demo's in-process relay, tests' mock transports) is
        # used through httpx; otherwise the gateway sends its calls on its own keep-alive
        # connections (app/upstream/wire.py), which cost a fraction of httpx's or aiohttp's
        # per-call work on every poll and create (bench/RESULTS.md).
        self._http: httpx.AsyncClient | None = None
        self._wire: wire.WirePool | None = None
        if transport is not None:
            self._http = outbound_client(
                base_url=self.base_url + "/",
                headers=headers,
                transport=transport,
                timeout=httpx.Timeout(request_timeout, connect=connect_timeout),
            )
        else:
            # No cookie is kept, no proxy read and no redirect followed: a shared client must
            # never replay one caller's upstream cookie for another (GHSA-7vwr-g6pm-9hc8).
            self._wire = wire.WirePool(self.base_url, max_connections=200, keepalive_seconds=15.0,
                                       max_body_bytes=max_body_bytes)
        self._headers = {**headers, "Accept-Encoding": "gzip, deflate"}
        self._json_headers = {**self._headers, "Content-Type": "application/json"}
        # Checked and joined once: the same lines start every call's head. A token that cannot
        # be sent leaves them unset, so each call is refused as it would be.
        self._lines: str | None = None
        self._json_lines: str | None = None
        with contextlib.suppress(ValueError):
            self._lines = wire.WirePool.header_lines(self._headers)
            self._json_lines = wire.WirePool.header_lines(self._json_headers)
        self._hidden, self._hidden_pattern = _hiding(self.base_url, token, brand_names)

    async def aclose(self) -> None:
        """Close the pooled connections."""
        if self._http is not None:
            await self._http.aclose()
        if self._wire is not None:
            self._wire.close()

    async def reachable(self) -> bool:
        """Whether the upstream answers HTTP at all (any status), for the readiness check."""
        try:
            await self._exchange("GET", "v1/", content=None, headers=None,
                                 connect_timeout=self._connect_timeout, read_timeout=self._connect_timeout)
        except UpstreamFailure:
            return False
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
        headers: dict[str, str] = {}  # Content-Type comes with the JSON body in _exchange
        if prefer:
            headers["Prefer"] = prefer
        if cancel_after:
            headers["Cancel-After"] = cancel_after
        reply: dict[str, Any] = await self._call(
            "POST", path, operation="create", content=orjson.dumps(body), headers=headers,
            read_timeout=self._create_timeout + (wait_seconds or 0),
        )
        return reply

    def answer_was_invalid(self, operation: str) -> None:
        """Count an answer its caller found invalid (not a prediction, or another one's) as an
        error of this upstream's."""
        if self._observer is not None:
            self._observer(self.name, operation, None, "invalid")

    def longest_call_seconds(self) -> float:
        """How long any other call here can take: connecting, then waiting for the answer."""
        return self._connect_timeout + self._request_timeout

    def longest_create_seconds(self, wait_seconds: int | None) -> float:
        """How long a create sent here can take before its outcome is known: connecting, then
        waiting for the answer."""
        return self._connect_timeout + self._create_timeout + (wait_seconds or 0)

    async def get_prediction(self, upstream_id: str, *, within: float | None = None) -> dict[str, Any]:
        """GET one prediction by its upstream id, all of it (retries included) within `within`
        seconds if given, else within the time any GET is allowed."""
        reply: dict[str, Any] = await self._read("v1/predictions/" + _segment(upstream_id), operation="get",
                                                 within=within)
        return reply

    async def cancel_prediction(self, upstream_id: str) -> dict[str, Any]:
        """POST a cancel; never retried."""
        path = "v1/predictions/" + _segment(upstream_id) + "/cancel"
        reply: dict[str, Any] = await self._call("POST", path, operation="cancel")
        return reply

    async def get_json(self, path: str) -> Any:
        """GET any read-only JSON resource, such as a model or a version."""
        return await self._read(path, operation="read", expect_object=False)

    async def _read(self, path: str, *, operation: str, expect_object: bool = True,
                    within: float | None = None) -> Any:
        """GET, sent again at most READ_RETRIES times after a failure a moment may mend, all
        within the time one GET is allowed (or `within`, if shorter): retries never make a read
        slower than its worst case."""
        longest = self.longest_call_seconds()
        deadline = time.monotonic() + (longest if within is None else min(within, longest))
        attempt = 0
        while True:
            remaining = deadline - time.monotonic()
            try:
                return await self._call(
                    "GET", path, operation=operation, expect_object=expect_object,
                    connect_timeout=min(self._connect_timeout, remaining),
                    read_timeout=min(self._request_timeout, remaining), deadline=deadline,
                )
            except UpstreamFailure as failure:
                attempt += 1
                if attempt > READ_RETRIES or not _transient(failure.error):
                    raise
                pause = READ_RETRY_PAUSE * 2 ** (attempt - 1) * random.uniform(0.5, 1.5)  # noqa: S311  (jitter, not security)
                if deadline - time.monotonic() - pause < _LEAST_RETRY_SECONDS:
                    raise
                log.info("upstream.read_retried", extra={"upstream": self.name, "operation": operation,
                                                          "attempt": attempt, "status": failure.error.status})
                await asyncio.sleep(pause)

    async def _call(
        self,
        method: str,
        path: str,
        *,
        operation: str = "read",
        content: bytes | None = None,
        headers: dict[str, str] | None = None,
        connect_timeout: float | None = None,
        read_timeout: float | None = None,
        deadline: float | None = None,
        expect_object: bool = True,
    ) -> Any:
        started = time.perf_counter()
        error: str | None = None
        try:
            status, response_headers, body = await self._exchange(
                method, path, content=content, headers=headers,
                connect_timeout=self._connect_timeout if connect_timeout is None else connect_timeout,
                read_timeout=read_timeout, deadline=deadline,
            )
            return self._interpret(status, response_headers, body, expect_object=expect_object)
        except UpstreamFailure as failure:
            error = str(failure.error.status)
            raise
        finally:
            if self._observer is not None:
                self._observer(self.name, operation, time.perf_counter() - started, error)

    async def _exchange(
        self,
        method: str,
        path: str,
        *,
        content: bytes | None,
        headers: dict[str, str] | None,
        connect_timeout: float,
        read_timeout: float | None,
        deadline: float | None = None,
    ) -> tuple[int, Mapping[str, str], bytes]:
        """One request and its whole (capped) body; a transport failure is an UpstreamFailure
        that says whether the request can have reached the upstream. With `deadline` (on the
        monotonic clock), waiting for the answer ends by then however long connecting took."""
        if self._http is not None:
            return await self._exchange_httpx(self._http, method, path, content=content, headers=headers,
                                              connect_timeout=connect_timeout, read_timeout=read_timeout)
        pool = self._wire
        if pool is None:
            raise RuntimeError("an upstream client has either an httpx transport or its own connections")
        fixed = self._json_headers if content is not None else self._headers
        fixed_lines = self._json_lines if content is not None else self._lines
        extra = headers or {}
        if fixed_lines is None or any(name in fixed for name in extra):
            extra, fixed_lines = {**fixed, **extra}, ""
        try:
            # Our paths are built of percent-encoded segments: sent exactly as they are.
            head = pool.head(method, path, extra, None if content is None else len(content),
                             fixed_lines=fixed_lines)
        except ValueError:
            log.warning("upstream.unsendable_header", extra={"upstream": self.name})
            raise UpstreamFailure(UpstreamInvalid("The request holds a header that cannot be sent upstream"),
                                  maybe_sent=False) from None
        try:
            answer = await pool.request(
                head, content, connect_timeout=connect_timeout,
                answer_timeout=read_timeout if read_timeout is not None else self._request_timeout,
                deadline=deadline)
        except wire.WireError as exc:
            raise self._transport_failure(exc) from None
        return answer.status, answer.headers, answer.body

    async def _read_capped(self, chunks: AsyncIterator[bytes]) -> bytes:
        parts: list[bytes] = []
        size = 0
        async for chunk in chunks:
            size += len(chunk)
            if size > self._max_body_bytes:
                raise self._too_large()
            parts.append(chunk)
        return b"".join(parts)

    def _transport_failure(self, exc: wire.WireError) -> UpstreamFailure:
        """Only a failure to connect proves nothing was sent; anything later may have been."""
        kind = type(exc).__name__
        if isinstance(exc, wire.BodyTooLarge):
            return self._too_large()
        if not exc.sent:
            log.warning("upstream.unreachable", extra={"upstream": self.name, "error": kind})
            return UpstreamFailure(UpstreamUnavailable(), maybe_sent=False)
        if isinstance(exc, wire.AnswerTimeout):
            log.warning("upstream.timeout", extra={"upstream": self.name, "error": kind})
            return UpstreamFailure(UpstreamTimeout(), maybe_sent=True)
        log.warning("upstream.transport_error", extra={"upstream": self.name, "error": kind})
        return UpstreamFailure(UpstreamUnavailable(), maybe_sent=True)

    def _too_large(self) -> UpstreamFailure:
        log.warning("upstream.body_too_large", extra={"upstream": self.name})
        return UpstreamFailure(
            UpstreamInvalid("The upstream service returned a response that is too large"), maybe_sent=True
        )

    async def _exchange_httpx(
        self,
        http: httpx.AsyncClient,
        method: str,
        path: str,
        *,
        content: bytes | None,
        headers: dict[str, str] | None,
        connect_timeout: float,
        read_timeout: float | None,
    ) -> tuple[int, Mapping[str, str], bytes]:
        request = http.build_request(
            method, path, content=content,
            headers={"Content-Type": "application/json", **(headers or {})} if content is not None else headers,
            timeout=httpx.Timeout(read_timeout if read_timeout is not None else self._request_timeout,
                                  connect=connect_timeout, pool=connect_timeout),
        )
        try:
            response = await http.send(request, stream=True)
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
            body = await self._read_capped(response.aiter_bytes())
        except httpx.TimeoutException:
            raise UpstreamFailure(UpstreamTimeout(), maybe_sent=True) from None
        except httpx.TransportError:
            raise UpstreamFailure(UpstreamUnavailable(), maybe_sent=True) from None
        finally:
            await response.aclose()
        return response.status_code, response.headers, body

    def _interpret(self, status: int, headers: Mapping[str, str], body: bytes, *, expect_object: bool) -> Any:
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
                Throttled(self._retry_after(headers), "The upstream service is throttling requests"),
                maybe_sent=False,
            )
        if status in (401, 403):
            raise UpstreamFailure(
                UpstreamInvalid("The upstream service rejected the gateway's credentials"),
                maybe_sent=False,
            )
        if status == 402:
            # The gateway's own account there is out of credit: nothing was created, another
            # upstream may serve it, and the caller's 402 means its own team's budget.
            raise UpstreamFailure(UpstreamInvalid(_STATUS_DETAILS[402]), maybe_sent=False)
        if 300 <= status < 400 or status < 200:
            raise UpstreamFailure(UpstreamInvalid(), maybe_sent=True)
        title, detail, extra = self._scrubbed_problem(body, status)
        retry = {}
        if status in (503, 504) and _is_seconds(headers.get("retry-after", "")):
            retry["Retry-After"] = str(self._retry_after(headers))
        error = UpstreamStatus(status, title, detail, headers=retry, extra=extra)
        raise UpstreamFailure(error, maybe_sent=status >= 500)

    def _retry_after(self, headers: Mapping[str, str]) -> int:
        value = headers.get("retry-after", "").strip()
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
        text = self.hide(_KEY_PATTERN.sub("[redacted]", text))
        return text[:2000]

    def hide(self, text: str) -> str:
        """`text` with this upstream's key, URLs, host and brand names replaced; the very same
        string when there is none, which costs one lowering and a few substring checks."""
        lowered = text.lower()
        if any(part in lowered for part in self._hidden):
            return self._hidden_pattern.sub(HIDDEN, text)
        return text

    def prediction(self, data: Any, *, ours: str) -> UpstreamPrediction:
        """An upstream prediction object validated (InvalidUpstreamPrediction if it is not one),
        with its upstream id in `error` and `logs` replaced by ours and nothing else of this
        upstream's left there: these reach clients, webhooks and the ledger as they are."""
        reply = parse_prediction(data)
        error, logs = self._own_text(reply.error, reply.id, ours), self._own_text(reply.logs, reply.id, ours)
        if error is reply.error and logs is reply.logs:
            return reply
        return replace(reply, error=error, logs=logs)

    def _own_text(self, text: str | None, upstream_id: str, ours: str) -> str | None:
        if not text:
            return text
        if len(upstream_id) >= _LEAST_HIDDEN_ID and upstream_id in text:
            text = text.replace(upstream_id, ours)
        return self.hide(text)
