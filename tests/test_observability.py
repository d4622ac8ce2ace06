"""Request ids, /healthz, /readyz and /metrics; none of them shows a secret."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.config import UpstreamConfig
from tests.conftest import Gateway
from tests.fakes.relay import FakeRelay
from tests.helpers import create, free_port, wait_terminal
from tests.processes import GatewayProcess


def test_request_ids_are_echoed_or_minted_and_logged(
    gateway: Gateway, api: httpx.Client, log_lines: list[str]
) -> None:
    given = api.get("/account", headers={"X-Request-Id": "trace-123"})
    assert given.headers["x-request-id"] == "trace-123"
    minted = api.get("/predictions/" + "z" * 26)
    assert len(minted.headers["x-request-id"]) == 32
    assert api.get("/account", headers={"X-Request-Id": "bad id with spaces"}).headers["x-request-id"] != "bad id with spaces"
    create(api)
    logged = [json.loads(line) for line in log_lines]
    assert any(entry.get("request_id") for entry in logged if entry["event"] == "prediction.created")


def test_health_and_readiness(gateway: Gateway, gateway_factory: Any) -> None:
    with httpx.Client(base_url=gateway.url) as anonymous:
        assert anonymous.get("/healthz").json() == {"status": "ok"}
        ready = anonymous.get("/readyz")
        assert ready.status_code == 200
        assert ready.json() == {"status": "ok", "database": "ok", "upstream": "ok"}
    unreachable: Gateway = gateway_factory(upstream_url=f"http://127.0.0.1:{free_port()}/replicate")
    with httpx.Client(base_url=unreachable.url) as anonymous:
        response = anonymous.get("/readyz")
    assert response.status_code == 503
    assert response.json() == {"status": "unavailable", "database": "ok", "upstream": "unavailable"}
    assert "127.0.0.1" not in response.text


def test_readiness_asks_every_upstream_at_once(gateway_factory: Any, relay: FakeRelay) -> None:
    with socket.create_server(("127.0.0.1", 0)) as silent:  # connects, then never answers
        gateway: Gateway = gateway_factory(connect_timeout=3, upstreams=[
            UpstreamConfig(name="silent", url=f"http://127.0.0.1:{silent.getsockname()[1]}/replicate", token="k"),
            UpstreamConfig(name="relay", url=relay.upstream_url, token=relay.key),
        ])
        with httpx.Client(base_url=gateway.url) as anonymous:
            started = time.monotonic()
            ready = anonymous.get("/readyz")
            took = time.monotonic() - started
    assert ready.json() == {"status": "ok", "database": "ok", "upstream": "ok"}
    assert took < 1.5, "the silent upstream's time-out was waited out before asking the other"


def test_metrics_count_requests_upstream_calls_predictions_and_spend(
    gateway: Gateway, api: httpx.Client, relay: FakeRelay
) -> None:
    wait_terminal(api, create(api).json()["id"])
    relay.fail_next("status", status=500)
    create(api)
    with httpx.Client(base_url=gateway.url) as anonymous:
        text = anonymous.get("/metrics").text
    assert 'gateway_requests_total{method="POST",route="/models/{owner}/{name}/predictions",status="201"}' in text
    assert 'gateway_upstream_seconds_count{operation="create",upstream="default"}' in text
    assert 'gateway_upstream_errors_total{kind="500",operation="create",upstream="default"} 1.0' in text
    assert 'gateway_predictions{status="succeeded"} 1.0' in text
    assert "gateway_spend_usd 0.006" in text
    assert "gateway_webhook_outbox_pending 0.0" in text
    assert "gateway_reconciler_lag_seconds" in text
    for secret in (relay.key, f"127.0.0.1:{relay.port}"):
        assert secret not in text
    # Ids and capability tokens never become labels.
    prediction_id = create(api).json()["id"]
    api.get(f"/predictions/{prediction_id}")
    with httpx.Client(base_url=gateway.url) as anonymous:
        text = anonymous.get("/metrics").text
    assert prediction_id not in text
    assert 'route="/predictions/{prediction_id}"' in text


def test_metrics_count_invalid_answers_and_leave_refused_creates_out(
    gateway: Gateway, api: httpx.Client, relay: FakeRelay
) -> None:
    relay.processing_seconds = 30
    relay.fail_next("status", status=422, method="POST")
    assert create(api).status_code == 422  # refused by the upstream: never a prediction
    running = create(api).json()["id"]
    relay.fail_next("status", status=200, method="GET")  # JSON, but not a prediction
    assert api.get(f"/predictions/{running}").status_code == 200  # the last known state
    with httpx.Client(base_url=gateway.url) as anonymous:
        text = anonymous.get("/metrics").text
    assert 'gateway_upstream_errors_total{kind="invalid",operation="get",upstream="default"} 1.0' in text
    assert 'gateway_predictions{status="failed"} 0.0' in text
    assert 'gateway_predictions{status="starting"} 1.0' in text or \
        'gateway_predictions{status="processing"} 1.0' in text
    assert api.post(f"/predictions/{running}/cancel").status_code == 200


@pytest.mark.parametrize(("level", "access_lines"), [("INFO", True), ("WARNING", False)])
def test_a_served_gateway_logs_requests_only_at_info_and_names_no_server(
    db_url: str, relay: FakeRelay, tmp_path: Path, level: str, access_lines: bool
) -> None:
    gateway = GatewayProcess(db_url=db_url, upstream_url=relay.upstream_url, upstream_token=relay.key,
                             workdir=tmp_path, log_level=level).start()
    try:
        answer = httpx.get(gateway.url + "/predictions/abc", headers={"X-Request-Id": "access-check"})
    finally:
        gateway.stop()
    assert answer.status_code == 401
    assert "server" not in answer.headers
    logged = [json.loads(line) for line in (tmp_path / f"gateway-{gateway.port}.log").read_text().splitlines()
              if line.startswith("{")]
    access = [entry for entry in logged if entry["logger"] == "uvicorn.access"
              and "/replicate/v1/predictions/abc" in entry["event"]]
    assert bool(access) is access_lines
    if access_lines:
        assert access[0]["request_id"] == "access-check"
        assert access[0]["event"].endswith(" 401")
