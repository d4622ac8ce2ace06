"""Several upstreams: routing, failover only when nothing can have been created, breakers."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from app.config import UpstreamConfig
from app.jobs import reconciler
from app.predictions import service as prediction_service
from tests.conftest import Gateway
from tests.dbtools import create_token, rows
from tests.fakes.relay import FakeRelay
from tests.helpers import assert_problem, create, free_port, wait_terminal

ADMIN = "admin-failover-secret"


@pytest.fixture
def second(other_relays: list[FakeRelay]) -> Iterator[FakeRelay]:
    relay = FakeRelay(key="sk-second-relay-canary")
    relay.start()
    other_relays.append(relay)
    yield relay
    relay.stop()


def upstreams(relay: FakeRelay, second: FakeRelay, **primary: Any) -> list[UpstreamConfig]:
    return [
        UpstreamConfig(name="primary", url=primary.pop("url", relay.upstream_url), token=relay.key,
                       priority=10, **primary),
        UpstreamConfig(name="secondary", url=second.upstream_url, token=second.key, priority=1),
    ]


def start(gateway_factory: Any, relay: FakeRelay, second: FakeRelay, **primary: Any) -> tuple[Gateway, httpx.Client]:
    gateway: Gateway = gateway_factory(upstreams=upstreams(relay, second, **primary), admin_token=ADMIN,
                                       breaker_threshold=2, breaker_cooldown=60)
    return gateway, gateway.client(create_token(gateway.db_url, "routed"))


def test_the_highest_priority_upstream_takes_creates_and_owns_gets(
    gateway_factory: Any, relay: FakeRelay, second: FakeRelay
) -> None:
    gateway, api = start(gateway_factory, relay, second)
    with api:
        ids = [create(api).json()["id"] for _ in range(3)]
        for prediction_id in ids:
            wait_terminal(api, prediction_id)
    assert len(relay.creates()) == 3
    assert second.calls == []
    assert {r["upstream"] for r in rows(gateway.db_url, "prediction")} == {"primary"}


def test_a_refused_connection_fails_over_and_the_secondary_owns_the_prediction(
    gateway_factory: Any, relay: FakeRelay, second: FakeRelay
) -> None:
    gateway, api = start(gateway_factory, relay, second, url=f"http://127.0.0.1:{free_port()}/replicate")
    with api:
        prediction = create(api).json()
        assert wait_terminal(api, prediction["id"])["status"] == "succeeded"
        assert api.post(f"/predictions/{prediction['id']}/cancel").status_code == 200
    (row,) = rows(gateway.db_url, "prediction")
    assert row["upstream"] == "secondary"
    assert len(second.creates()) == 1
    assert all(call.had_key for call in second.calls)


def test_a_throttled_primary_fails_over(gateway_factory: Any, relay: FakeRelay, second: FakeRelay) -> None:
    _, api = start(gateway_factory, relay, second)
    with api:
        relay.fail_next("throttle", retry_after=30)
        assert create(api).status_code == 201
    assert relay.creates() == []
    assert len(second.creates()) == 1


@pytest.mark.parametrize(("status", "declared"), [(422, False), (500, False)])
def test_no_failover_when_the_create_may_exist_or_the_caller_erred(
    gateway_factory: Any, relay: FakeRelay, second: FakeRelay, status: int, declared: bool
) -> None:
    _, api = start(gateway_factory, relay, second, rejects_with_5xx=declared)
    with api:
        relay.fail_next("status", status=status, method="POST")
        assert_problem(create(api), status)
    assert second.calls == []


@pytest.mark.parametrize("status", [500, 501, 503])
def test_a_5xx_fails_over_when_the_upstream_is_declared_to_answer_it_before_accepting(
    gateway_factory: Any, relay: FakeRelay, second: FakeRelay, status: int
) -> None:
    _, api = start(gateway_factory, relay, second, rejects_with_5xx=True)
    with api:
        relay.fail_next("status", status=status, method="POST")
        assert create(api).status_code == 201
    assert len(second.creates()) == 1


# A proxy in front of the upstream answers these, also once the upstream has accepted the create.
@pytest.mark.parametrize("status", [502, 504, 520, 524])
def test_a_proxys_5xx_never_fails_over_even_when_5xx_are_declared_refusals(
    gateway_factory: Any, relay: FakeRelay, second: FakeRelay, status: int
) -> None:
    _, api = start(gateway_factory, relay, second, rejects_with_5xx=True)
    with api:
        relay.fail_next("status", status=status, method="POST")
        assert_problem(create(api), status)
    assert second.calls == []


def test_an_upstream_out_of_credit_fails_over(gateway_factory: Any, relay: FakeRelay, second: FakeRelay) -> None:
    _, api = start(gateway_factory, relay, second)
    with api:
        relay.fail_next("status", status=402, method="POST")
        assert create(api).status_code == 201
    assert len(second.creates()) == 1


def test_an_upstream_out_of_credit_alone_is_a_502_not_the_callers_402(gateway: Gateway, api: Any,
                                                                     relay: FakeRelay) -> None:
    relay.fail_next("status", status=402, method="POST")
    problem = assert_problem(create(api), 502)
    assert "credit" in problem["detail"]


def test_a_timeout_never_fails_over(gateway_factory: Any, relay: FakeRelay, second: FakeRelay) -> None:
    gateway: Gateway = gateway_factory(upstreams=upstreams(relay, second), create_timeout=0.5)
    with gateway.client(create_token(gateway.db_url, "slow")) as api:
        relay.fail_next("hang", seconds=2, method="POST")
        assert_problem(create(api), 504)
    assert second.calls == []


def test_a_connection_reset_after_the_create_arrived_never_fails_over(
    gateway_factory: Any, relay: FakeRelay, second: FakeRelay
) -> None:
    gateway: Gateway = gateway_factory(upstreams=upstreams(relay, second))
    with gateway.client(create_token(gateway.db_url, "reset")) as api:
        relay.fail_next("reset", method="POST")
        assert_problem(create(api), 502)
    assert second.calls == [], "the primary may have created it: sending it again could run it twice"
    (row,) = rows(gateway.db_url, "prediction")
    assert row["submission"] == "unknown"  # in doubt, for the reconciler; never marked refused


def test_the_breaker_opens_and_the_health_view_shows_it(
    gateway_factory: Any, relay: FakeRelay, second: FakeRelay
) -> None:
    gateway, api = start(gateway_factory, relay, second, rejects_with_5xx=True)
    with api:
        relay.fail_next("status", status=503, count=2, method="POST")
        create(api)
        create(api)
        calls_before = len(relay.calls)
        assert create(api).status_code == 201
        assert len(relay.calls) == calls_before, "an open circuit sends nothing to the primary"
    with httpx.Client(base_url=gateway.url + "/admin/v1", headers={"Authorization": f"Bearer {ADMIN}"}) as admin:
        health = {u["name"]: u for u in admin.get("/upstreams").json()["results"]}
    assert health["primary"]["circuit"] == "open"
    assert health["secondary"]["circuit"] == "closed"
    assert relay.key not in repr(health)
    assert len(second.creates()) == 3


def test_every_breaker_open_is_503_with_retry_after(gateway_factory: Any, relay: FakeRelay) -> None:
    gateway: Gateway = gateway_factory(
        upstreams=[UpstreamConfig(name="only", url=relay.upstream_url, token=relay.key, rejects_with_5xx=True)],
        breaker_threshold=1, breaker_cooldown=60)
    with gateway.client(create_token(gateway.db_url, "alone")) as api:
        relay.fail_next("status", status=500, method="POST")
        assert_problem(create(api), 500)
        refused = create(api)
    assert_problem(refused, 503)
    assert refused.headers["retry-after"] == "60"


def test_model_globs_and_the_model_map_route_creates(
    gateway_factory: Any, relay: FakeRelay, second: FakeRelay
) -> None:
    gateway: Gateway = gateway_factory(upstreams=[
        UpstreamConfig(name="flux", url=relay.upstream_url, token=relay.key, models=["black-forest-labs/*"],
                       model_map={"black-forest-labs/flux-schnell": "bfl/schnell-fast"}),
        UpstreamConfig(name="rest", url=second.upstream_url, token=second.key, models=["meta/*"]),
    ])
    with gateway.client(create_token(gateway.db_url, "globs")) as api:
        assert create(api, "black-forest-labs/flux-schnell").status_code == 201
        assert create(api, "meta/llama").status_code == 201
        assert_problem(create(api, "stability-ai/sdxl"), 404)
        model = api.get("/models/black-forest-labs/flux-schnell").json()
        assert (model["owner"], model["name"]) == ("black-forest-labs", "flux-schnell")
        assert api.get("/models/black-forest-labs/flux-schnell/versions").status_code == 200
        assert api.get(f"/models/black-forest-labs/flux-schnell/versions/{'b' * 64}").status_code == 200
    assert relay.creates()[0].path == "/replicate/v1/models/bfl/schnell-fast/predictions"
    assert second.creates()[0].path == "/replicate/v1/models/meta/llama/predictions"
    reads = [call.path for call in relay.calls if call.method == "GET"]
    assert reads == ["/replicate/v1/models/bfl/schnell-fast", "/replicate/v1/models/bfl/schnell-fast/versions",
                     f"/replicate/v1/models/bfl/schnell-fast/versions/{'b' * 64}"]


def test_a_throttled_probe_leaves_the_next_create_to_probe_again(
    gateway_factory: Any, relay: FakeRelay, second: FakeRelay
) -> None:
    gateway: Gateway = gateway_factory(upstreams=upstreams(relay, second, rejects_with_5xx=True),
                                       breaker_threshold=1, breaker_cooldown=0.3)
    with gateway.client(create_token(gateway.db_url, "probed")) as api:
        relay.fail_next("status", status=503, method="POST")
        assert create(api).status_code == 201  # the primary's 503 opens its circuit
        time.sleep(0.4)  # half-open: the next create is the primary's probe
        relay.fail_next("throttle", retry_after=1, method="POST")
        assert create(api).status_code == 201  # throttled, so the secondary took it
        calls_before = len(relay.calls)
        assert create(api).json()["id"]
    assert len(relay.calls) == calls_before + 1, "a throttled probe must not keep the circuit from probing"
    assert len(relay.creates()) == 1
    assert len(second.creates()) == 2


def test_a_running_prediction_is_read_cancelled_and_streamed_at_its_owner_only(
    gateway_factory: Any, relay: FakeRelay, second: FakeRelay
) -> None:
    gateway, api = start(gateway_factory, relay, second)
    second.processing_seconds = 30
    with api:
        relay.fail_next("throttle", retry_after=1, method="POST")
        prediction = create(api, "llm/echo", text="owned elsewhere").json()
        primary_calls = len(relay.calls)
        events: list[str] = []

        def stream() -> None:  # open while the prediction runs: it refreshes from the upstream
            with httpx.stream("GET", prediction["urls"]["stream"], timeout=10) as response:
                events.extend(response.iter_lines())

        streaming = threading.Thread(target=stream)
        streaming.start()
        assert api.get(f"/predictions/{prediction['id']}").json()["status"] in ("starting", "processing")
        time.sleep(1.2)
        canceled = api.post(f"/predictions/{prediction['id']}/cancel")
        assert canceled.status_code == 200
        assert canceled.json()["status"] == "canceled"
        streaming.join(timeout=10)
    assert "event: done" in events
    assert len(relay.calls) == primary_calls == 1, "only the throttled create reached the primary"
    upstream_id = second.creates()[0].prediction_id
    assert any(c.method == "POST" and c.path.endswith(f"/predictions/{upstream_id}/cancel") for c in second.calls)
    gets = [c for c in second.calls if c.method == "GET" and c.path.endswith(f"/predictions/{upstream_id}")]
    assert len(gets) >= 2, "the poll and the stream's refreshes asked the owner"
    assert second.predictions[upstream_id]["status"] == "canceled"
    (row,) = rows(gateway.db_url, "prediction")
    assert (row["upstream"], row["status"]) == ("secondary", "canceled")


def test_a_create_is_not_in_doubt_before_its_own_upstream_could_have_answered(
    gateway_factory: Any, relay: FakeRelay, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The global create time-out would put the create in doubt after 0.8 s; this upstream's own
    # allows 3 s, and it answers after 1.5 s, while the reconciler runs every 0.1 s.
    for module in (prediction_service, reconciler):
        monkeypatch.setattr(module, "IN_DOUBT_MARGIN_SECONDS", 0.2)
    gateway: Gateway = gateway_factory(
        upstreams=[UpstreamConfig(name="patient", url=relay.upstream_url, token=relay.key, create_timeout=3)],
        connect_timeout=0.3, create_timeout=0.3, reconcile_interval=0.1,
    )
    with gateway.client(create_token(gateway.db_url, "patient")) as api:
        relay.fail_next("hang", seconds=1.5, method="POST")
        created = create(api)
        assert created.status_code == 201, created.text
        assert wait_terminal(api, created.json()["id"])["status"] == "succeeded"
    (row,) = rows(gateway.db_url, "prediction")
    assert (row["submission"], row["upstream_id"]) == ("accepted", relay.creates()[0].prediction_id)
