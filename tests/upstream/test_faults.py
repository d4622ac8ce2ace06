"""Upstream faults become documented statuses with problem+json bodies; the gateway keeps serving."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

from tests.conftest import Gateway
from tests.dbtools import create_token, rows
from tests.fakes.relay import FakeRelay
from tests.helpers import assert_problem, create, free_port, wait_terminal


def _still_serves(api: httpx.Client) -> None:
    response = create(api)
    assert response.status_code == 201, response.text
    assert wait_terminal(api, response.json()["id"])["status"] == "succeeded"


def _submission_of_latest(gateway: Gateway) -> str:
    latest = max(rows(gateway.db_url, "prediction"), key=lambda r: r["created_at"])
    return str(latest["submission"])


class TestCreateFaults:
    def test_refused_connection_is_502_and_nothing_is_left_pending(self, gateway_factory: Any) -> None:
        gateway: Gateway = gateway_factory(upstream_url=f"http://127.0.0.1:{free_port()}/replicate")
        with gateway.client(create_token(gateway.db_url, "t")) as api:
            body = assert_problem(create(api), 502)
            assert "127.0.0.1" not in body["detail"]
            assert _submission_of_latest(gateway) == "rejected"
            assert api.get("/predictions").json()["results"] == []
            assert api.get("/account").status_code == 200

    def test_hanging_upstream_is_504_within_the_create_timeout(
        self, gateway_factory: Any, relay: FakeRelay
    ) -> None:
        gateway: Gateway = gateway_factory(create_timeout=1.0)
        with gateway.client(create_token(gateway.db_url, "t")) as api:
            relay.fail_next("hang", seconds=10)
            started = time.monotonic()
            assert_problem(create(api), 504)
            assert time.monotonic() - started < 4
            # The create may have reached the upstream: it is in doubt, not rejected.
            assert _submission_of_latest(gateway) == "unknown"
            _still_serves(api)

    @pytest.mark.parametrize("status", [500, 502, 503])
    def test_upstream_5xx_keeps_its_status_with_a_scrubbed_body(
        self, api: httpx.Client, relay: FakeRelay, status: int
    ) -> None:
        relay.fail_next("status", status=status)
        response = create(api)
        body = assert_problem(response, status)
        assert body["detail"] == f"The upstream service failed (status {status})"
        assert relay.key not in response.text
        assert f"127.0.0.1:{relay.port}" not in response.text
        assert "FakeRelay" not in response.text
        assert "set-cookie" not in response.headers
        _still_serves(api)

    def test_upstream_429_is_429_with_an_integer_retry_after(self, api: httpx.Client, relay: FakeRelay) -> None:
        relay.fail_next("throttle", retry_after=7)
        response = create(api)
        assert_problem(response, 429)
        assert response.headers["retry-after"] == "7"
        _still_serves(api)

    def test_upstream_422_passes_the_reason_without_leaking(self, api: httpx.Client, relay: FakeRelay) -> None:
        relay.fail_next("status", status=422)
        response = create(api)
        body = assert_problem(response, 422)
        assert body["invalid_fields"] == [
            {"type": "required", "field": "input.prompt", "description": "prompt is required"}
        ]
        for leak in (relay.key, f"127.0.0.1:{relay.port}", "http://"):
            assert leak not in response.text
        _still_serves(api)

    def test_upstream_rejecting_our_key_is_502(self, api: httpx.Client, relay: FakeRelay) -> None:
        relay.fail_next("status", status=401)
        body = assert_problem(create(api), 502)
        assert "credentials" in body["detail"]

    @pytest.mark.parametrize("kind", ["non_json", "huge", "redirect", "reset"])
    def test_unusable_answers_are_502(self, api: httpx.Client, relay: FakeRelay, kind: str) -> None:
        relay.fail_next(kind)
        response = create(api)
        assert_problem(response, 502)
        assert "FakeRelay" not in response.text
        _still_serves(api)


class TestReadFaults:
    def test_a_poll_during_an_upstream_outage_serves_the_last_known_state(
        self, api: httpx.Client, relay: FakeRelay
    ) -> None:
        relay.starting_seconds = 30
        prediction = create(api).json()
        for kind, params in (("status", {"status": 500}), ("hang", {"seconds": 10}), ("non_json", {})):
            relay.fail_next(kind, method="GET", **params)
            response = api.get(f"/predictions/{prediction['id']}")
            assert response.status_code == 200
            assert response.json()["status"] == "starting"

    def test_cancel_failure_is_reported_and_not_retried(self, api: httpx.Client, relay: FakeRelay) -> None:
        relay.starting_seconds = 30
        prediction = create(api).json()
        relay.fail_next("status", status=500, path_contains="/cancel")
        assert_problem(api.post(f"/predictions/{prediction['id']}/cancel"), 500)
        assert sum(1 for call in relay.calls if call.path.endswith("/cancel")) == 1
