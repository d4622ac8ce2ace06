"""The pooled upstream client: URLs, headers, cookies and the scrubbed error mapping."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from http.cookiejar import CookieJar
from typing import Any

import httpx
import orjson
import pytest

from app.errors import (
    Throttled,
    UpstreamInvalid,
    UpstreamStatus,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from app.upstream.client import (
    DEFAULT_RETRY_AFTER,
    MAX_RETRY_AFTER,
    UpstreamClient,
    UpstreamFailure,
)

BASE = "https://relay.example/replicate"
TOKEN = "sk-canary-123456789"
SECRETS = ("relay.example", TOKEN, "https://", "http://")
PREDICTION = {"id": "ufawqhfynnddngldkgtslldrkq", "status": "starting", "model": "a/b"}

Handler = Callable[[httpx.Request], httpx.Response]


def make_client(handler: Handler, *, token: str | None = TOKEN, max_body_bytes: int = 1000) -> UpstreamClient:
    return UpstreamClient(
        name="default", base_url=BASE, token=token, connect_timeout=1, request_timeout=1,
        create_timeout=1, max_body_bytes=max_body_bytes, transport=httpx.MockTransport(handler),
    )


@asynccontextmanager
async def upstream(handler: Handler, **kwargs: Any) -> AsyncIterator[UpstreamClient]:
    client = make_client(handler, **kwargs)
    try:
        yield client
    finally:
        await client.aclose()


class Recorder:
    """A MockTransport handler that records requests and answers from a script."""

    def __init__(self, *responses: httpx.Response) -> None:
        self.requests: list[httpx.Request] = []
        self._responses = list(responses) or [httpx.Response(200, json=PREDICTION)]

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        template = self._responses[min(len(self.requests), len(self._responses)) - 1]
        # A fresh response per request: parametrized templates are shared between tests.
        return httpx.Response(template.status_code, headers=template.headers, content=template.content)


async def failure_of(handler: Handler, call: str = "get", **kwargs: Any) -> UpstreamFailure:
    async with upstream(handler, **kwargs) as client:
        with pytest.raises(UpstreamFailure) as caught:
            await CALLS[call](client)
    return caught.value


CALLS: dict[str, Callable[[UpstreamClient], Any]] = {
    "get": lambda c: c.get_prediction("abc123"),
    "cancel": lambda c: c.cancel_prediction("abc123"),
    "create": lambda c: c.create_prediction("v1/predictions", {"input": {}}, prefer=None,
                                            cancel_after=None, wait_seconds=None),
    "json": lambda c: c.get_json("v1/models/a/b"),
}


def assert_clean(text: str) -> None:
    for secret in SECRETS:
        assert secret.lower() not in text.lower(), f"{secret!r} leaked in {text!r}"


class TestRequests:
    @pytest.mark.parametrize(
        ("call", "method", "url"),
        [
            pytest.param("get", "GET", f"{BASE}/v1/predictions/abc123", id="get"),
            pytest.param("cancel", "POST", f"{BASE}/v1/predictions/abc123/cancel", id="cancel"),
            pytest.param("create", "POST", f"{BASE}/v1/predictions", id="create"),
            pytest.param("json", "GET", f"{BASE}/v1/models/a/b", id="get-json"),
        ],
    )
    async def test_url_under_base_path(self, call: str, method: str, url: str) -> None:
        recorder = Recorder()
        async with upstream(recorder) as client:
            await CALLS[call](client)
        [request] = recorder.requests
        assert request.method == method
        assert str(request.url) == url

    @pytest.mark.parametrize(
        ("upstream_id", "raw_path"),
        [
            pytest.param("abc123", b"/replicate/v1/predictions/abc123", id="plain"),
            pytest.param("a/b", b"/replicate/v1/predictions/a%2Fb", id="slash-escaped"),
            pytest.param("a?b#c", b"/replicate/v1/predictions/a%3Fb%23c", id="query-and-fragment-escaped"),
            pytest.param("a b", b"/replicate/v1/predictions/a%20b", id="space-escaped"),
            pytest.param("a..b", b"/replicate/v1/predictions/a..b", id="inner-dots-kept"),
            # "." and ".." must stay one encoded segment; URL joining would resolve them.
            pytest.param("..", b"/replicate/v1/predictions/%2E%2E", id="dot-dot-stays-inside"),
            pytest.param(".", b"/replicate/v1/predictions/%2E", id="dot-stays-inside"),
        ],
    )
    async def test_upstream_id_is_one_path_segment(self, upstream_id: str, raw_path: bytes) -> None:
        recorder = Recorder()
        async with upstream(recorder) as client:
            await client.get_prediction(upstream_id)
        assert recorder.requests[0].url.raw_path == raw_path

    @pytest.mark.parametrize("call", ["get", "cancel", "create", "json"])
    async def test_authorization_is_exactly_the_bearer_token(self, call: str) -> None:
        recorder = Recorder()
        async with upstream(recorder) as client:
            await CALLS[call](client)
        assert recorder.requests[0].headers.get_list("authorization") == [f"Bearer {TOKEN}"]

    async def test_no_authorization_without_token(self) -> None:
        recorder = Recorder()
        async with upstream(recorder, token=None) as client:
            await client.get_prediction("abc123")
        assert "authorization" not in recorder.requests[0].headers

    @pytest.mark.parametrize(
        ("prefer", "cancel_after", "extra"),
        [
            pytest.param(None, None, {}, id="neither"),
            pytest.param("wait=5", None, {"prefer": "wait=5"}, id="prefer-only"),
            pytest.param(None, "30s", {"cancel-after": "30s"}, id="cancel-after-only"),
            pytest.param("wait", "1h30m45s", {"prefer": "wait", "cancel-after": "1h30m45s"}, id="both"),
            pytest.param("", "", {}, id="empty-strings-dropped"),
        ],
    )
    async def test_create_headers_are_an_allow_list(
        self, prefer: str | None, cancel_after: str | None, extra: dict[str, str]
    ) -> None:
        recorder = Recorder(httpx.Response(201, json=PREDICTION))
        body = {"input": {"prompt": "a cat"}, "webhook": None}
        async with upstream(recorder) as client:
            reply = await client.create_prediction(
                "v1/models/a/b/predictions", body, prefer=prefer, cancel_after=cancel_after, wait_seconds=None,
            )
        assert reply == PREDICTION
        [request] = recorder.requests
        assert request.headers["content-type"] == "application/json"
        assert orjson.loads(request.content) == body
        expected = {
            "host": "relay.example",
            "accept": "application/json",
            "accept-encoding": "gzip, deflate",
            "connection": "keep-alive",
            "user-agent": "replicate-gateway",
            "authorization": f"Bearer {TOKEN}",
            "content-type": "application/json",
            "content-length": str(len(request.content)),
            **extra,
        }
        assert dict(request.headers) == expected
        assert "cookie" not in request.headers

    @pytest.mark.parametrize(("wait", "read"), [(None, 1), (0, 1), (5, 6), (60, 61)])
    async def test_create_read_timeout_includes_the_wait(self, wait: int | None, read: float) -> None:
        recorder = Recorder()
        async with upstream(recorder) as client:
            await client.create_prediction("v1/predictions", {}, prefer=None, cancel_after=None, wait_seconds=wait)
        timeout = recorder.requests[0].extensions["timeout"]
        assert timeout["read"] == read
        assert timeout["connect"] == 1


class TestCookies:
    @pytest.mark.parametrize(
        "set_cookie",
        [
            "session=abc123; Path=/",
            "session=abc123; Domain=relay.example; Path=/; Secure",
            "session=abc123",
        ],
    )
    async def test_upstream_cookie_is_never_replayed(self, set_cookie: str) -> None:
        recorder = Recorder(
            httpx.Response(200, json=PREDICTION, headers={"Set-Cookie": set_cookie}),
            httpx.Response(200, json=PREDICTION),
        )
        async with upstream(recorder) as client:
            await client.get_prediction("abc123")
            await client.get_prediction("abc123")
            await client.cancel_prediction("abc123")
        assert len(recorder.requests) == 3
        for request in recorder.requests:
            assert "cookie" not in request.headers

    async def test_control_a_default_jar_would_replay_it(self) -> None:
        # Makes sure the test above can fail: the same script with an ordinary cookie jar.
        recorder = Recorder(
            httpx.Response(200, json=PREDICTION, headers={"Set-Cookie": "session=abc123; Path=/"}),
            httpx.Response(200, json=PREDICTION),
        )
        async with httpx.AsyncClient(transport=httpx.MockTransport(recorder), cookies=CookieJar()) as plain:
            await plain.get(f"{BASE}/v1/predictions/abc123")
            await plain.get(f"{BASE}/v1/predictions/abc123")
        assert recorder.requests[1].headers.get("cookie") == "session=abc123"


class TestSuccess:
    @pytest.mark.parametrize("status", [200, 201, 202])
    async def test_any_2xx_object_is_returned(self, status: int) -> None:
        async with upstream(Recorder(httpx.Response(status, json=PREDICTION))) as client:
            assert await client.get_prediction("abc123") == PREDICTION

    @pytest.mark.parametrize("payload", [[1, 2], {"a": 1}, "text", 3, None])
    async def test_get_json_accepts_any_json(self, payload: Any) -> None:
        async with upstream(Recorder(httpx.Response(200, content=orjson.dumps(payload)))) as client:
            assert await client.get_json("v1/models/a/b") == payload

    async def test_body_of_exactly_the_limit_is_accepted(self) -> None:
        content = orjson.dumps({"id": "x", "pad": ""})
        content = orjson.dumps({"id": "x", "pad": "p" * (1000 - len(content))})
        assert len(content) == 1000
        async with upstream(Recorder(httpx.Response(200, content=content))) as client:
            assert (await client.get_prediction("x"))["id"] == "x"


def _problem(code: int, **body: Any) -> httpx.Response:
    return httpx.Response(code, content=orjson.dumps(body), headers={"Content-Type": "application/problem+json"})


LEAKY_TEXT = (
    f"token {TOKEN} rejected by relay.example; see https://relay.example/replicate/docs?key={TOKEN} "
    f"or http://RELAY.EXAMPLE:8443/x (host RELAY.example)"
)


class TestErrorMapping:
    @pytest.mark.parametrize(
        ("response", "error_type", "status", "maybe_sent"),
        [
            pytest.param(httpx.Response(302, headers={"Location": "https://evil.example/"}),
                         UpstreamInvalid, 502, True, id="302-not-followed"),
            pytest.param(httpx.Response(307, headers={"Location": f"{BASE}/v1/other"}),
                         UpstreamInvalid, 502, True, id="307-not-followed"),
            pytest.param(httpx.Response(304), UpstreamInvalid, 502, True, id="304"),
            pytest.param(httpx.Response(401, text=LEAKY_TEXT), UpstreamInvalid, 502, False, id="401"),
            pytest.param(httpx.Response(403, text=LEAKY_TEXT), UpstreamInvalid, 502, False, id="403"),
            pytest.param(_problem(401, detail=LEAKY_TEXT), UpstreamInvalid, 502, False, id="401-problem"),
            pytest.param(httpx.Response(429), Throttled, 429, False, id="429"),
            pytest.param(httpx.Response(404, text="not found"), UpstreamStatus, 404, False, id="404"),
            pytest.param(httpx.Response(400, text=LEAKY_TEXT), UpstreamStatus, 400, False, id="400-text"),
            pytest.param(_problem(422, detail="bad"), UpstreamStatus, 422, False, id="422"),
            pytest.param(httpx.Response(500, text=LEAKY_TEXT), UpstreamStatus, 500, True, id="500"),
            pytest.param(_problem(500, detail=LEAKY_TEXT), UpstreamStatus, 500, True, id="500-problem"),
            pytest.param(httpx.Response(502), UpstreamStatus, 502, True, id="502"),
            pytest.param(httpx.Response(503), UpstreamStatus, 503, True, id="503"),
            pytest.param(httpx.Response(504), UpstreamStatus, 504, True, id="504"),
            pytest.param(httpx.Response(200, text="<html>" + LEAKY_TEXT), UpstreamInvalid, 502, True,
                         id="200-not-json"),
            pytest.param(httpx.Response(200, content=b""), UpstreamInvalid, 502, True, id="200-empty"),
            pytest.param(httpx.Response(200, json=[PREDICTION]), UpstreamInvalid, 502, True, id="200-array"),
            pytest.param(httpx.Response(200, json="text"), UpstreamInvalid, 502, True, id="200-string"),
            pytest.param(httpx.Response(200, content=b"null"), UpstreamInvalid, 502, True, id="200-null"),
            pytest.param(httpx.Response(200, content=b"{" + b" " * 2000 + b"}"), UpstreamInvalid, 502, True,
                         id="200-over-max-body"),
        ],
    )
    @pytest.mark.parametrize("call", ["get", "create"])
    async def test_maps_to_scrubbed_gateway_error(
        self, call: str, response: httpx.Response, error_type: type, status: int, maybe_sent: bool
    ) -> None:
        recorder = Recorder(response)
        failure = await failure_of(recorder, call)
        # A GET is sent again twice after a bad gateway, an unavailable service or a gateway
        # time-out; a create never is.
        assert len(recorder.requests) == (3 if call == "get" and response.status_code in (502, 503, 504) else 1)
        assert type(failure.error) is error_type
        assert failure.error.status == status
        assert failure.maybe_sent is maybe_sent
        assert_clean(orjson.dumps(failure.error.to_body()).decode())
        assert_clean(repr(failure.error.headers))

    @pytest.mark.parametrize("status", [401, 403])
    async def test_credentials_rejected_detail_is_ours(self, status: int) -> None:
        failure = await failure_of(Recorder(httpx.Response(status, text="Your API token abc is wrong")))
        assert failure.error.detail == "The upstream service rejected the gateway's credentials"
        assert "abc" not in failure.error.detail

    @pytest.mark.parametrize("status", [500, 502, 503, 504])
    async def test_server_errors_have_a_generic_detail(self, status: int) -> None:
        failure = await failure_of(Recorder(_problem(status, title="Relay exploded", detail="stack trace here")))
        assert failure.error.title == "Upstream error"
        assert failure.error.detail == f"The upstream service failed (status {status})"
        assert failure.error.extra == {}

    async def test_422_problem_is_scrubbed_and_keeps_invalid_fields(self) -> None:
        response = _problem(
            422,
            title="Invalid input on relay.example",
            detail=LEAKY_TEXT,
            status=422,
            invalid_fields=[
                {"type": "required", "field": "prompt", "description": f"prompt is required ({TOKEN})",
                 "secret": TOKEN},
                {"type": "enum", "field": "size", "description": "see https://relay.example/enum"},
                {"type": "max", "field": "steps", "description": "on RELAY.example at most 4"},
                "not an object",
            ],
        )
        failure = await failure_of(Recorder(response), "create")
        error = failure.error
        assert isinstance(error, UpstreamStatus)
        assert error.status == 422
        assert failure.maybe_sent is False
        assert_clean(error.title)
        assert_clean(error.detail)
        assert "prompt" in error.detail
        assert error.extra == {
            "invalid_fields": [
                {"type": "required", "field": "prompt", "description": "prompt is required ([redacted])"},
                {"type": "enum", "field": "size", "description": "see [url]"},
                {"type": "max", "field": "steps", "description": "on [upstream] at most 4"},
            ]
        }
        body = error.to_body()
        assert body["status"] == 422
        assert body["invalid_fields"] == error.extra["invalid_fields"]
        assert_clean(orjson.dumps(body).decode())
        assert TOKEN not in repr(body)

    async def test_invalid_fields_are_capped(self) -> None:
        fields = [{"type": "t", "field": f"f{i}", "description": "d"} for i in range(80)]
        failure = await failure_of(Recorder(_problem(422, invalid_fields=fields)), max_body_bytes=100_000)
        assert len(failure.error.extra["invalid_fields"]) == 50

    # A 422 whose invalid_fields hold no object still gets a meaningful detail.
    async def test_invalid_fields_without_objects_fall_back_to_the_generic_detail(self) -> None:
        failure = await failure_of(Recorder(_problem(422, invalid_fields=["not an object"])))
        assert failure.error.detail != "Bad Gateway"
        assert failure.error.extra.get("invalid_fields") != []

    @pytest.mark.parametrize(
        ("response", "upstream_words"),
        [
            pytest.param(httpx.Response(404, text="nope, no such thing"), ["nope"], id="404-text"),
            pytest.param(_problem(404, title="Missing here", detail="Model acme/x not on this relay"),
                         ["Missing", "relay"], id="404-problem"),
            pytest.param(httpx.Response(400, json=["a"]), [], id="400-json-array"),
            pytest.param(_problem(400, title="Relay says no", detail="Account 1234 is suspended"),
                         ["Relay", "Account", "1234"], id="400-problem"),
            pytest.param(_problem(409, title="Exists", detail="already exists on shard 7"),
                         ["Exists", "shard"], id="409-problem"),
            pytest.param(_problem(422, title=5, detail=None), [], id="422-non-text-fields"),
            pytest.param(_problem(422, detail="prompt rejected by relay moderation v2"),
                         ["moderation"], id="422-problem-without-fields"),
            pytest.param(_problem(418, title="Teapot", detail="short and stout"), ["Teapot", "stout"],
                         id="418-unknown-status"),
        ],
    )
    async def test_client_error_title_and_detail_are_the_gateways_own(
        self, response: httpx.Response, upstream_words: list[str]
    ) -> None:
        failure = await failure_of(Recorder(response))
        error = failure.error
        assert isinstance(error, UpstreamStatus)
        assert error.status == response.status_code
        assert failure.maybe_sent is False
        assert error.title.strip()
        assert error.detail.strip()
        assert error.extra == {}
        for word in upstream_words:
            assert word not in error.title
            assert word not in error.detail

    async def test_an_upstream_out_of_credit_is_the_gateways_problem_not_the_callers_budget(self) -> None:
        failure = await failure_of(Recorder(_problem(402, title="Billing", detail="acme-relay-account has $0.00")))
        # 402 is the caller's own budget; nothing was created upstream, so another may serve it.
        assert failure.error.status == 502
        assert failure.maybe_sent is False
        assert "credit" in failure.error.detail
        for word in ("Billing", "acme", "$"):
            assert word not in failure.error.title + failure.error.detail

    async def test_redirect_is_not_followed(self) -> None:
        recorder = Recorder(
            httpx.Response(302, headers={"Location": f"{BASE}/v1/predictions/other"}),
            httpx.Response(200, json=PREDICTION),
        )
        failure = await failure_of(recorder)
        assert len(recorder.requests) == 1
        assert failure.error.status == 502


class TestThrottling:
    @pytest.mark.parametrize(
        ("retry_after", "expected"),
        [
            pytest.param("7", "7", id="seconds"),
            pytest.param(None, str(DEFAULT_RETRY_AFTER), id="absent"),
            pytest.param("0", "1", id="zero-raised-to-one"),
            pytest.param("100000", str(MAX_RETRY_AFTER), id="capped"),
            pytest.param("Wed, 21 Oct 2015 07:28:00 GMT", str(DEFAULT_RETRY_AFTER), id="http-date"),
            pytest.param("-3", str(DEFAULT_RETRY_AFTER), id="negative"),
            pytest.param("1.5", str(DEFAULT_RETRY_AFTER), id="fraction"),
        ],
    )
    async def test_429_becomes_throttled_with_retry_after(self, retry_after: str | None, expected: str) -> None:
        headers = {"Retry-After": retry_after} if retry_after is not None else {}
        failure = await failure_of(Recorder(httpx.Response(429, headers=headers, text=LEAKY_TEXT)), "create")
        assert isinstance(failure.error, Throttled)
        assert failure.error.status == 429
        assert failure.maybe_sent is False
        assert failure.error.headers == {"Retry-After": expected}
        assert failure.error.headers["Retry-After"].isdigit()
        assert_clean(failure.error.detail)

    @pytest.mark.parametrize(
        ("status", "retry_after", "headers"),
        [
            pytest.param(503, "9", {"Retry-After": "9"}, id="503-passes-retry-after"),
            pytest.param(504, "9", {"Retry-After": "9"}, id="504-passes-retry-after"),
            pytest.param(503, "100000", {"Retry-After": str(MAX_RETRY_AFTER)}, id="503-capped"),
            pytest.param(503, "soon", {}, id="503-non-numeric-dropped"),
            pytest.param(500, "9", {}, id="500-never"),
            pytest.param(502, "9", {}, id="502-never"),
        ],
    )
    async def test_unavailable_retry_after(self, status: int, retry_after: str, headers: dict[str, str]) -> None:
        failure = await failure_of(Recorder(httpx.Response(status, headers={"Retry-After": retry_after})))
        assert failure.error.headers == headers

    # "²" is a digit to str.isdigit(); httpx decodes a 0xB2 header byte as latin-1 "²".
    @pytest.mark.parametrize("status", [429, 503])
    async def test_non_ascii_digit_retry_after_is_handled(self, status: int) -> None:
        response = httpx.Response(status, headers=[(b"Retry-After", b"\xb2")])
        failure = await failure_of(Recorder(response))
        assert failure.error.status == status


class _BrokenStream(httpx.AsyncByteStream):
    def __init__(self, error: Exception) -> None:
        self._error = error

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield b'{"id": "x", '
        raise self._error


class TestTransportFailures:
    @pytest.mark.parametrize(
        ("exc_type", "error_type", "status", "maybe_sent"),
        [
            pytest.param(httpx.ConnectError, UpstreamUnavailable, 502, False, id="connect-error"),
            pytest.param(httpx.ConnectTimeout, UpstreamUnavailable, 502, False, id="connect-timeout"),
            pytest.param(httpx.PoolTimeout, UpstreamUnavailable, 502, False, id="pool-timeout"),
            pytest.param(httpx.UnsupportedProtocol, UpstreamUnavailable, 502, False, id="unsupported-protocol"),
            pytest.param(httpx.ReadTimeout, UpstreamTimeout, 504, True, id="read-timeout"),
            pytest.param(httpx.WriteTimeout, UpstreamTimeout, 504, True, id="write-timeout"),
            pytest.param(httpx.RemoteProtocolError, UpstreamUnavailable, 502, True, id="remote-protocol-error"),
            pytest.param(httpx.ReadError, UpstreamUnavailable, 502, True, id="read-error"),
            pytest.param(httpx.WriteError, UpstreamUnavailable, 502, True, id="write-error"),
            pytest.param(httpx.ProxyError, UpstreamUnavailable, 502, True, id="proxy-error"),
        ],
    )
    @pytest.mark.parametrize("call", ["get", "create", "cancel"])
    async def test_raised_by_transport(
        self, call: str, exc_type: type[httpx.TransportError], error_type: type, status: int,
        maybe_sent: bool, caplog: pytest.LogCaptureFixture,
    ) -> None:
        def handler(request: httpx.Request) -> httpx.Response:
            raise exc_type(f"failed {request.url} with {TOKEN}", request=request)

        with caplog.at_level(logging.DEBUG):
            failure = await failure_of(handler, call)
        assert type(failure.error) is error_type
        assert failure.error.status == status
        assert failure.maybe_sent is maybe_sent
        assert_clean(failure.error.detail)
        assert failure.__cause__ is None
        assert failure.__suppress_context__ is True
        assert TOKEN not in caplog.text
        for record in caplog.records:
            assert_clean(repr(vars(record)))

    @pytest.mark.parametrize(
        ("exc", "error_type", "status"),
        [
            pytest.param(httpx.ReadTimeout("slow"), UpstreamTimeout, 504, id="read-timeout-mid-body"),
            pytest.param(httpx.RemoteProtocolError("closed"), UpstreamUnavailable, 502, id="closed-mid-body"),
            pytest.param(httpx.ReadError("reset"), UpstreamUnavailable, 502, id="reset-mid-body"),
        ],
    )
    async def test_failure_while_reading_the_body(self, exc: Exception, error_type: type, status: int) -> None:
        def handler(request: httpx.Request) -> httpx.Response:
            return httpx.Response(200, stream=_BrokenStream(exc))

        failure = await failure_of(handler)
        assert type(failure.error) is error_type
        assert failure.error.status == status
        assert failure.maybe_sent is True

    async def test_oversized_body_in_chunks(self) -> None:
        class Chunks(httpx.AsyncByteStream):
            async def __aiter__(self) -> AsyncIterator[bytes]:
                for _ in range(20):
                    yield b" " * 100

        failure = await failure_of(lambda request: httpx.Response(200, stream=Chunks()))
        assert isinstance(failure.error, UpstreamInvalid)
        assert failure.error.detail == "The upstream service returned a response that is too large"
        assert failure.maybe_sent is True


class TestScrub:
    @pytest.mark.parametrize(
        ("value", "expected"),
        [
            pytest.param("plain words", "plain words", id="untouched"),
            pytest.param("", "", id="empty"),
            pytest.param(None, "", id="none"),
            pytest.param(42, "", id="number"),
            pytest.param({"detail": TOKEN}, "", id="dict"),
            pytest.param(["x"], "", id="list"),
            pytest.param("see https://relay.example/replicate/v1", "see [url]", id="https-url"),
            pytest.param("see http://other.example/a?b=c", "see [url]", id="http-url-other-host"),
            pytest.param("ws://x.example/s and WSS://y.example/t", "[url] and [url]", id="websocket-urls"),
            pytest.param("HTTPS://RELAY.EXAMPLE/x", "[url]", id="upper-case-url"),
            pytest.param("'https://a.example/x' next", "'[url]' next", id="url-stops-at-quote"),
            pytest.param(f"key {TOKEN}.", "key [redacted].", id="configured-token"),
            pytest.param("r8_abcdefghijkl", "[redacted]", id="replicate-key"),
            pytest.param("gw_abcdefghijkl", "[redacted]", id="gateway-key"),
            pytest.param("whsec_abcdefghij", "[redacted]", id="webhook-secret"),
            pytest.param("sk-abcdef", "[redacted]", id="sk-key-six-chars"),
            pytest.param("sk-abc", "sk-abc", id="too-short-to-look-like-a-key"),
            pytest.param("task-abcdefghij", "task-abcdefghij", id="no-word-boundary"),
            pytest.param("host relay.example down", "host [upstream] down", id="host"),
            pytest.param("host RELAY.Example down", "host [upstream] down", id="host-any-case"),
            pytest.param("relay.example:8443", "[upstream]:8443", id="host-with-port"),
            pytest.param(f"prefix{TOKEN}suffix", "prefix[upstream]suffix", id="token-embedded"),
        ],
    )
    def test_table(self, value: Any, expected: str) -> None:
        assert make_client(Recorder()).scrub(value) == expected

    def test_long_text_is_cut(self) -> None:
        assert len(make_client(Recorder()).scrub("a" * 10_000)) == 2000

    # Secrets are scrubbed before the text is shortened, so none is cut in two and half kept.
    def test_secret_cut_at_the_limit_does_not_leak(self) -> None:
        relay_token = "0123456789abcdefghijABCDEFGHIJ01"  # an opaque relay token, not key-shaped
        client = UpstreamClient(
            name="default", base_url=BASE, token=relay_token, connect_timeout=1, request_timeout=1,
            create_timeout=1, max_body_bytes=1000, transport=httpx.MockTransport(Recorder()),
        )
        text = client.scrub("x" * 1984 + relay_token)
        assert relay_token[:16] not in text


class TestPredictionText:
    """What of the upstream an upstream prediction's `error` and `logs` may say, and how little is left."""

    OURS = "ourownidentifier0000000000"

    @staticmethod
    def client() -> UpstreamClient:
        return UpstreamClient(
            name="comet", base_url=BASE, token=TOKEN, connect_timeout=1, request_timeout=1, create_timeout=1,
            max_body_bytes=1000, transport=httpx.MockTransport(Recorder()), brand_names=["CometAPI"],
        )

    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            pytest.param("step 1/3\n", "step 1/3\n", id="untouched"),
            pytest.param(f"see {BASE}/v1/predictions/x", "see [upstream]/v1/predictions/x", id="base-url"),
            pytest.param("see https://relay.example/other", "see [upstream]/other", id="origin"),
            pytest.param("on RELAY.example", "on [upstream]", id="host-any-case"),
            pytest.param(f"key {TOKEN}", "key [upstream]", id="token"),
            pytest.param("cometapi says no", "[upstream] says no", id="brand-any-case"),
            pytest.param("CometAPI's queue", "[upstream]'s queue", id="brand-before-punctuation"),
            pytest.param("CometAPIs and xCometAPI", "CometAPIs and xCometAPI", id="brand-inside-a-word"),
            pytest.param("comet tails", "comet tails", id="configured-name-is-not-a-brand"),
            pytest.param(f"{PREDICTION['id']} failed", f"{OURS} failed", id="upstream-id"),
        ],
    )
    def test_error_and_logs(self, text: str, expected: str) -> None:
        reply = self.client().prediction({**PREDICTION, "error": text, "logs": text}, ours=self.OURS)
        assert (reply.error, reply.logs) == (expected, expected)

    def test_a_short_upstream_id_is_left_alone(self) -> None:
        reply = self.client().prediction({**PREDICTION, "id": "a1", "logs": "a1 b2"}, ours=self.OURS)
        assert reply.logs == "a1 b2"

    def test_an_answer_with_nothing_to_hide_is_kept_as_parsed(self) -> None:
        reply = self.client().prediction({**PREDICTION, "logs": "step 1/3\n", "output": ["x"]}, ours=self.OURS)
        assert (reply.id, reply.logs, reply.error, reply.output) == (PREDICTION["id"], "step 1/3\n", None, ["x"])
