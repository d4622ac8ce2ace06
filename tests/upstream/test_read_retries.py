"""Idempotent upstream GETs are sent again at most twice after a failure a moment may mend; creates
and cancels never are (guarantees P6)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest

from app.upstream.client import UpstreamClient, UpstreamFailure
from tests.conftest import Gateway
from tests.dbtools import create_token
from tests.fakes.relay import FakeRelay
from tests.helpers import assert_problem, create, free_port

MODEL = "black-forest-labs/flux-schnell"


def _gets_of(relay: FakeRelay, upstream_id: str) -> int:
    return sum(1 for call in relay.calls if call.method == "GET" and call.path.endswith(upstream_id))


def _running(api: httpx.Client, relay: FakeRelay) -> tuple[str, str]:
    """A prediction the relay already calls `processing` while the gateway last heard `starting`:
    a GET that reached the relay answers `processing`, one served from the ledger `starting`."""
    relay.starting_seconds, relay.processing_seconds = 0.05, 60.0
    response = create(api)
    assert response.status_code == 201, response.text
    assert response.json()["status"] == "starting"
    (upstream_id,) = relay.predictions
    time.sleep(0.1)
    return response.json()["id"], upstream_id


class TestPredictionReads:
    @pytest.mark.parametrize(("kind", "params"), [("reset", {}), ("status", {"status": 502}),
                                                  ("status", {"status": 503}), ("status", {"status": 504})])
    def test_a_passing_failure_is_sent_again_and_the_caller_gets_the_fresh_state(
        self, gateway: Gateway, relay: FakeRelay, kind: str, params: dict[str, Any]
    ) -> None:
        with gateway.client(create_token(gateway.db_url, "t")) as api:
            prediction_id, upstream_id = _running(api, relay)
            relay.fail_next(kind, method="GET", path_contains=upstream_id, **params)
            response = api.get(f"/predictions/{prediction_id}")
            assert response.status_code == 200
            assert response.json()["status"] == "processing"
            assert _gets_of(relay, upstream_id) == 2

    def test_at_most_two_retries_then_the_last_known_state(self, gateway: Gateway, relay: FakeRelay) -> None:
        with gateway.client(create_token(gateway.db_url, "t")) as api:
            prediction_id, upstream_id = _running(api, relay)
            relay.fail_next("status", 10, method="GET", path_contains=upstream_id, status=503)
            started = time.monotonic()
            response = api.get(f"/predictions/{prediction_id}")
            elapsed = time.monotonic() - started
            assert response.status_code == 200
            assert response.json()["status"] == "starting"
            assert _gets_of(relay, upstream_id) == 3  # the first, and at most two more
            # Two jittered pauses of about 0.1 and 0.2 s, not seconds.
            assert elapsed < 1.5

    @pytest.mark.parametrize(("kind", "params"), [
        ("status", {"status": 500}),
        ("status", {"status": 404}),
        ("status", {"status": 503, "headers": {"Retry-After": "30"}}),
        ("non_json", {}),
        ("throttle", {"retry_after": 1}),
    ])
    def test_failures_a_moment_will_not_mend_are_not_sent_again(
        self, gateway: Gateway, relay: FakeRelay, kind: str, params: dict[str, Any]
    ) -> None:
        with gateway.client(create_token(gateway.db_url, "t")) as api:
            prediction_id, upstream_id = _running(api, relay)
            relay.fail_next(kind, method="GET", path_contains=upstream_id, **params)
            assert api.get(f"/predictions/{prediction_id}").json()["status"] == "starting"
            assert _gets_of(relay, upstream_id) == 1

    def test_a_read_that_timed_out_is_not_sent_again(self, gateway_factory: Any, relay: FakeRelay) -> None:
        gateway: Gateway = gateway_factory(request_timeout=0.5)
        with gateway.client(create_token(gateway.db_url, "t")) as api:
            prediction_id, upstream_id = _running(api, relay)
            relay.fail_next("hang", method="GET", path_contains=upstream_id, seconds=2)
            started = time.monotonic()
            assert api.get(f"/predictions/{prediction_id}").json()["status"] == "starting"
            assert time.monotonic() - started < 1.5
            assert _gets_of(relay, upstream_id) == 1


class TestModelReads:
    def test_a_model_read_survives_one_bad_gateway(self, api: httpx.Client, relay: FakeRelay) -> None:
        relay.fail_next("status", method="GET", path_contains="/models/", status=502)
        response = api.get(f"/models/{MODEL}")
        assert response.status_code == 200
        assert response.json()["name"] == "flux-schnell"
        assert sum(1 for call in relay.calls if "/models/" in call.path) == 2

    def test_a_model_read_failing_three_times_answers_the_last_failure(
        self, api: httpx.Client, relay: FakeRelay
    ) -> None:
        relay.fail_next("status", 3, method="GET", path_contains="/models/", status=503)
        assert_problem(api.get(f"/models/{MODEL}"), 503)
        assert sum(1 for call in relay.calls if "/models/" in call.path) == 3


class TestWritesAreNeverSentAgain:
    @pytest.mark.parametrize(("kind", "params"), [("reset", {}), ("status", {"status": 503})])
    def test_create(self, api: httpx.Client, relay: FakeRelay, kind: str, params: dict[str, Any]) -> None:
        relay.fail_next(kind, method="POST", **params)
        assert create(api).status_code in (502, 503)
        assert sum(1 for call in relay.calls if call.method == "POST" and call.path.endswith("/predictions")) == 1

    def test_cancel(self, gateway: Gateway, relay: FakeRelay) -> None:
        with gateway.client(create_token(gateway.db_url, "t")) as api:
            prediction_id, _ = _running(api, relay)
            relay.fail_next("status", method="POST", path_contains="/cancel", status=503)
            assert_problem(api.post(f"/predictions/{prediction_id}/cancel"), 503)
            assert sum(1 for call in relay.calls if call.path.endswith("/cancel")) == 1


def test_retries_stay_within_the_time_one_read_is_allowed() -> None:
    """Against a port nothing listens on, every attempt fails at once; with a read allowed 0.4 s
    in all, the second pause (about 0.2 s) would end past what is left, so it is not taken."""

    async def read() -> tuple[float, int]:
        attempts = 0

        def observe(_upstream: str, _operation: str, _seconds: float | None, error: str | None) -> None:
            nonlocal attempts
            attempts += error is not None

        client = UpstreamClient(name="u", base_url=f"http://127.0.0.1:{free_port()}/replicate", token=None,
                                connect_timeout=0.2, request_timeout=0.2, create_timeout=1.0,
                                max_body_bytes=1 << 20, observer=observe)
        started = time.monotonic()
        try:
            with pytest.raises(UpstreamFailure) as failure:
                await client.get_json("v1/models/a/b")
            assert failure.value.error.status == 502
        finally:
            await client.aclose()
        return time.monotonic() - started, attempts

    elapsed, attempts = asyncio.run(read())
    assert elapsed <= 0.4 + 0.1
    assert 1 <= attempts <= 2
