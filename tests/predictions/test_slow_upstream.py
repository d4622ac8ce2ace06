"""A slow upstream GET never holds a client past what it waits for: sync waits answer within N s,
polls within POLL_REFRESH_SECONDS, streams keep their keep-alives; and a cancel the upstream cannot
do is answered with the prediction as it stands (replicate-wire §3.2, §7, §9.4; guarantees P7)."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from app.predictions import stream
from app.predictions.models import Prediction
from app.predictions.service import POLL_REFRESH_SECONDS
from tests.conftest import Gateway
from tests.dbtools import create_token
from tests.fakes.relay import FakeRelay
from tests.helpers import assert_problem, create, wait_terminal

SLOW_GET_SECONDS = 8


def _running(api: httpx.Client, relay: FakeRelay) -> tuple[dict[str, Any], str]:
    relay.starting_seconds, relay.processing_seconds = 0.05, 60
    created = create(api)
    assert created.status_code == 201, created.text
    (upstream_id,) = relay.predictions
    return created.json(), upstream_id


def test_a_sync_wait_answers_within_its_seconds_while_the_upstream_get_is_slow(
    api: httpx.Client, relay: FakeRelay
) -> None:
    relay.honour_prefer = False  # the gateway polls itself, and each poll hangs
    relay.processing_seconds = 30
    relay.fail_next("hang", 20, method="GET", seconds=SLOW_GET_SECONDS)
    started = time.monotonic()
    response = api.post("/models/a/b/predictions", json={"input": {}}, headers={"Prefer": "wait=2"})
    elapsed = time.monotonic() - started
    assert response.status_code == 201, response.text
    assert response.json()["status"] == "starting"
    assert elapsed < 2.5  # the Python client gives up at N + 0.5 s


def test_a_poll_answers_the_last_state_when_the_upstream_get_is_slow(
    gateway_factory: Any, relay: FakeRelay
) -> None:
    # The upstream's own time-out (20 s) is far longer than a poll's bound; one failure would
    # open the circuit.
    gateway: Gateway = gateway_factory(request_timeout=20, breaker_threshold=1)
    with gateway.client(create_token(gateway.db_url, "poller")) as api:
        prediction, upstream_id = _running(api, relay)
        relay.fail_next("hang", method="GET", path_contains=upstream_id, seconds=SLOW_GET_SECONDS)
        started = time.monotonic()
        response = api.get(f"/predictions/{prediction['id']}")
        elapsed = time.monotonic() - started
        assert response.json()["status"] == "starting"
        assert POLL_REFRESH_SECONDS - 0.5 < elapsed < POLL_REFRESH_SECONDS + 1
        # The bound is the gateway's own, not a failure of the upstream's: its circuit stays closed.
        breaker = gateway.server.server.config.app.state.gateway.registry.get("default").breaker
        assert (breaker.state, breaker.failures) == ("closed", 0)
        assert create(api).status_code == 201


def test_a_stream_keeps_its_keepalives_while_the_upstream_get_is_slow(
    gateway_factory: Any, relay: FakeRelay
) -> None:
    gateway: Gateway = gateway_factory(stream_keepalive_interval=1.5, stream_poll_interval=0.1)
    with gateway.client(create_token(gateway.db_url, "streamer")) as api:
        prediction, upstream_id = _running(api, relay)
    relay.fail_next("hang", 3, method="GET", path_contains=upstream_id, seconds=SLOW_GET_SECONDS)
    arrivals = []
    with httpx.Client(timeout=30) as anonymous, anonymous.stream("GET", prediction["urls"]["stream"]) as response:
        started = time.monotonic()
        for _ in response.iter_raw():
            arrivals.append(time.monotonic())
            if arrivals[-1] - started > 7:
                break
    gaps = [b - a for a, b in zip([started, *arrivals], arrivals, strict=False)]
    assert len(arrivals) >= 3
    assert max(gaps) < 1.5 + 0.1 + stream.LEAST_REFRESH_SECONDS + 0.5, gaps


class TestCancel:
    @pytest.mark.parametrize("status", [404, 405, 501])
    def test_a_cancel_the_upstream_cannot_do_answers_the_prediction_as_it_stands(
        self, api: httpx.Client, relay: FakeRelay, status: int
    ) -> None:
        prediction, _ = _running(api, relay)
        relay.fail_next("status", method="POST", path_contains="/cancel", status=status)
        response = api.post(f"/predictions/{prediction['id']}/cancel")
        assert response.status_code == 200, response.text
        assert response.json()["id"] == prediction["id"]
        assert response.json()["status"] in ("starting", "processing")
        assert sum(1 for call in relay.calls if call.path.endswith("/cancel")) == 1
        # Canceled for real when the upstream can.
        assert api.post(f"/predictions/{prediction['id']}/cancel").json()["status"] == "canceled"
        assert wait_terminal(api, prediction["id"])["status"] == "canceled"

    def test_other_failures_are_still_reported(self, api: httpx.Client, relay: FakeRelay) -> None:
        prediction, _ = _running(api, relay)
        relay.fail_next("status", method="POST", path_contains="/cancel", status=502)
        assert_problem(api.post(f"/predictions/{prediction['id']}/cancel"), 502)


def test_a_refresh_that_fails_ends_the_stream_with_an_error_event() -> None:
    row = Prediction(id="p", status="processing", created_at=datetime.now(UTC), output=["a"], logs="")

    async def refresh(_row: Prediction, _within: float) -> Prediction:
        raise ConnectionError("the database went away")

    async def collect() -> list[bytes]:
        return [chunk async for chunk in stream.events(row, refresh, poll_interval=0.01)]

    chunks = asyncio.run(collect())
    assert chunks[0].startswith(b"event: output\n")
    assert chunks[-1].startswith(b"event: error\n")
    assert stream.FAILED_DETAIL.encode() in chunks[-1]
