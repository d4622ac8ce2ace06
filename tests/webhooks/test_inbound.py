"""Inbound upstream webhooks: a capability URL per prediction, verified when a secret is set, only a hint."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

from app.webhooks import inbound
from app.webhooks.signing import sign
from tests.conftest import Gateway, make_settings
from tests.dbtools import create_token, rows
from tests.fakes.relay import FakeRelay
from tests.helpers import assert_problem, create

KEY = b"i" * 32
UNREACHABLE_PUBLIC = "http://127.0.0.1:1/replicate"  # its own address is known only after start
UPSTREAM_SECRET = "whsec_" + "c2VjcmV0LXVwc3RyZWFtLWtleS0xMjM0NTY3ODkwYWI="


class TestInboundUrl:
    def test_none_without_a_public_url(self) -> None:
        settings = make_settings("sqlite:///x.db", "http://127.0.0.1:1", None)
        assert inbound.inbound_url(settings, KEY, "abc") is None

    def test_shape_and_round_trip(self) -> None:
        settings = make_settings("sqlite:///x.db", "http://127.0.0.1:1", None, public_url="https://gw.test/replicate")
        url = inbound.inbound_url(settings, KEY, "abc123")
        assert url is not None
        prefix = "https://gw.test/replicate/v1/webhooks/inbound/abc123."
        assert url.startswith(prefix)
        token = url.removeprefix(prefix)
        assert len(token) == 40
        assert inbound.prediction_for(KEY, f"abc123.{token}") == "abc123"

    @pytest.mark.parametrize("ref", [
        "abc123", "abc123.", "abc123.0000000000000000000000000000000000000000", "abc124.{token}",
        "ABC123.{token}", "../abc123.{token}", "abc123.{token}x", ".{token}",
    ])
    def test_a_wrong_reference_names_nothing(self, ref: str) -> None:
        ref = ref.replace("{token}", inbound.inbound_token(KEY, "abc123"))
        assert inbound.prediction_for(KEY, ref) is None

    def test_another_key_gives_another_token(self) -> None:
        assert inbound.inbound_token(KEY, "abc") != inbound.inbound_token(b"j" * 32, "abc")


def _processing(gateway_factory: Any, relay: FakeRelay, processing_seconds: float = 60,
                **settings: Any) -> tuple[Gateway, str, str, str]:
    """A gateway with a public URL, a token, a prediction the relay keeps processing, its inbound path.

    The reconciler's passes are a minute apart, so nothing but a client or a hint refreshes it."""
    relay.starting_seconds = 0.1
    relay.processing_seconds = processing_seconds
    gateway: Gateway = gateway_factory(public_url=UNREACHABLE_PUBLIC, reconcile_interval=60, **settings)
    token = create_token(gateway.db_url, "inbound")
    with gateway.client(token) as api:
        created = create(api).json()
        deadline = time.monotonic() + 10
        while api.get(f"/predictions/{created['id']}").json()["status"] != "processing":
            assert time.monotonic() < deadline
            time.sleep(0.05)
    (call,) = relay.creates()
    sent = call.json()
    assert sent["webhook_events_filter"] == ["completed"]
    assert sent["webhook"].startswith(f"{UNREACHABLE_PUBLIC}/v1/webhooks/inbound/{created['id']}.")
    return gateway, token, created["id"], httpx.URL(sent["webhook"]).path


def _forged(prediction_id: str) -> bytes:
    return (b'{"id": "' + prediction_id.encode() + b'", "status": "succeeded", '
            b'"output": ["https://evil.example/x.png"], "completed_at": "2026-01-01T00:00:00Z"}')


def _status(gateway: Gateway, prediction_id: str) -> str:
    (row,) = [p for p in rows(gateway.db_url, "prediction") if p["id"] == prediction_id]
    return str(row["status"])


def _upstream_gets(relay: FakeRelay) -> int:
    return sum(1 for c in relay.calls if c.method == "GET" and "/predictions/" in c.path)


def test_a_forged_inbound_webhook_changes_nothing(gateway_factory: Any, relay: FakeRelay) -> None:
    gateway, token, prediction_id, path = _processing(gateway_factory, relay)
    with gateway.client(token) as api:
        before = _upstream_gets(relay)
        answer = httpx.post(gateway.url + path, content=_forged(prediction_id),
                            headers={"Content-Type": "application/json"})
        assert answer.status_code == 204
        assert answer.content == b""
        deadline = time.monotonic() + 5
        while _upstream_gets(relay) == before:  # the hint made the gateway ask the upstream
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.2)
        assert _status(gateway, prediction_id) == "processing"
        served = api.get(f"/predictions/{prediction_id}").json()
        assert served["status"] == "processing"
        assert served["output"] is None


def test_a_wrong_token_or_unknown_id_is_404_and_changes_nothing(gateway_factory: Any, relay: FakeRelay) -> None:
    gateway, _, prediction_id, path = _processing(gateway_factory, relay)
    before = _upstream_gets(relay)
    prefix, _, token = path.rpartition(".")
    wrong = [
        prefix + "." + ("0" if token[0] != "0" else "1") + token[1:],
        prefix,
        path.replace(prediction_id, "a" * 26),
        path + "0",
    ]
    bodies = []
    for candidate in wrong:
        response = httpx.post(gateway.url + candidate, content=_forged(prediction_id))
        bodies.append(assert_problem(response, 404))
    assert all(body == bodies[0] for body in bodies)  # indistinguishable from a missing prediction
    time.sleep(0.3)
    assert _upstream_gets(relay) == before
    assert _status(gateway, prediction_id) == "processing"


def test_both_prefixes_serve_the_inbound_route(gateway_factory: Any, relay: FakeRelay) -> None:
    gateway, _, _, path = _processing(gateway_factory, relay)
    bare = path.removeprefix("/replicate")
    assert bare.startswith("/v1/webhooks/inbound/")
    assert httpx.post(gateway.url + bare, content=b"{}").status_code == 204
    assert httpx.post(gateway.url + path, content=b"{}").status_code == 204


def _signed(prediction_id: str, *, secret: str = UPSTREAM_SECRET, offset: int = 0,
            message_id: str = "msg_upstream_1") -> tuple[bytes, dict[str, str]]:
    body = _forged(prediction_id)
    timestamp = int(time.time()) + offset
    headers = {"webhook-id": message_id, "webhook-timestamp": str(timestamp),
               "webhook-signature": sign(secret, message_id, timestamp, body),
               "Content-Type": "application/json"}
    return body, headers


def test_with_an_upstream_secret_only_signed_webhooks_are_heard(gateway_factory: Any, relay: FakeRelay) -> None:
    gateway, _, prediction_id, path = _processing(gateway_factory, relay, upstream_webhook_secret=UPSTREAM_SECRET)
    url = gateway.url + path
    before = _upstream_gets(relay)
    assert_problem(httpx.post(url, content=_forged(prediction_id)), 400)
    body, headers = _signed(prediction_id, secret="whsec_" + "b3RoZXItc2VjcmV0LWtleS0xMjM0NTY3ODkwYWJjZA==")
    assert_problem(httpx.post(url, content=body, headers=headers), 401)
    body, headers = _signed(prediction_id, offset=-600)  # stale
    assert_problem(httpx.post(url, content=body, headers=headers), 401)
    body, headers = _signed(prediction_id, offset=600)  # from the future
    assert_problem(httpx.post(url, content=body, headers=headers), 401)
    body, headers = _signed(prediction_id)
    assert_problem(httpx.post(url, content=body + b" ", headers=headers), 401)  # not the signed bytes
    time.sleep(0.3)
    assert _upstream_gets(relay) == before  # refused hints cost the upstream nothing

    answer = httpx.post(url, content=body, headers=headers)
    assert answer.status_code == 204
    deadline = time.monotonic() + 5
    while _upstream_gets(relay) == before:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.2)
    # Even a correctly signed body is only a hint: the relay says processing.
    assert _status(gateway, prediction_id) == "processing"


def test_a_signed_webhook_heard_again_is_a_no_op(gateway_factory: Any, relay: FakeRelay) -> None:
    gateway, _, prediction_id, path = _processing(gateway_factory, relay, upstream_webhook_secret=UPSTREAM_SECRET)
    url = gateway.url + path

    def gets_after(body: bytes, headers: dict[str, str]) -> int:
        before = _upstream_gets(relay)
        assert httpx.post(url, content=body, headers=headers).status_code == 204
        time.sleep(0.5)
        return _upstream_gets(relay) - before

    first = _signed(prediction_id, message_id="msg_once")
    assert gets_after(*first) == 1
    assert gets_after(*first) == 0, "the same webhook-id again asks the upstream nothing"
    assert gets_after(*_signed(prediction_id, message_id="msg_next")) == 1


def test_a_hint_brings_the_upstream_state_in_without_any_poll(gateway_factory: Any, relay: FakeRelay) -> None:
    gateway, _, prediction_id, path = _processing(gateway_factory, relay, processing_seconds=1.0)
    (upstream_id,) = [c.prediction_id for c in relay.creates()]
    deadline = time.monotonic() + 10
    while relay.predictions[str(upstream_id)]["status"] != "succeeded":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.3)
    assert _status(gateway, prediction_id) == "processing"  # nobody has asked the upstream since
    assert httpx.post(gateway.url + path, content=b"{}").status_code == 204
    deadline = time.monotonic() + 5
    while _status(gateway, prediction_id) != "succeeded":
        assert time.monotonic() < deadline, "the hint did not refresh the prediction"
        time.sleep(0.05)
