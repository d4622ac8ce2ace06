"""With durable outputs on, outputs stay downloadable from the gateway after the relay's copy is gone."""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.columns import utcnow
from app.outputs.archiver import due_for_archiving
from tests.conftest import Gateway
from tests.dbtools import create_token, rows, sqlite_plan
from tests.fakes.relay import FakeRelay, output_bytes
from tests.helpers import assert_problem, create, wait_terminal


@pytest.fixture
def archiving(gateway_factory: Any, relay: FakeRelay) -> Gateway:
    relay.outputs_on_relay = True
    gw: Gateway = gateway_factory(durable_outputs=["black-forest-labs/*"], output_hosts=["127.0.0.1"],
                                  reconcile_interval=0.1)
    return gw


def wait_archived(api: httpx.Client, prediction_id: str, base: str) -> dict[str, Any]:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        body: dict[str, Any] = api.get(f"/predictions/{prediction_id}").json()
        if body["output"] and all(url.startswith(base) for url in body["output"]):
            return body
        time.sleep(0.1)
    raise AssertionError("outputs were not archived")


def test_an_output_outlives_the_relays_copy(archiving: Gateway, relay: FakeRelay) -> None:
    with archiving.client(create_token(archiving.db_url, "keeper")) as api:
        prediction = create(api, "black-forest-labs/flux-schnell", num_outputs=2).json()
        wait_terminal(api, prediction["id"])
        upstream_id = relay.creates()[0].prediction_id or ""
        archived = wait_archived(api, prediction["id"], archiving.replicate_base + "/v1/outputs/")
    relay.forget(upstream_id)
    with httpx.Client() as anonymous:
        assert anonymous.get(f"{relay.base_url}/delivery/{upstream_id}/out-0.webp").status_code == 404
        for index, url in enumerate(archived["output"]):
            response = anonymous.get(url)  # no token, as the npm client fetches outputs
            assert response.status_code == 200
            assert response.headers["content-type"] == "image/webp"
            assert response.content == output_bytes(upstream_id, f"out-{index}.webp")
        assert_problem(anonymous.get(archived["output"][0].replace("/out-0", "/x").rsplit(".", 2)[0] + ".bad/x"), 404)
    assert "127.0.0.1:" + str(relay.port) not in repr(archived)


def test_models_not_listed_and_other_hosts_are_left_alone(archiving: Gateway, relay: FakeRelay) -> None:
    with archiving.client(create_token(archiving.db_url, "plain")) as api:
        other = wait_terminal(api, create(api, "stability-ai/sdxl").json()["id"])
        relay.outputs_on_relay = False  # replicate.delivery URLs: not an allowed host here
        remote = wait_terminal(api, create(api, "black-forest-labs/flux-dev").json()["id"])
        time.sleep(1)
        assert api.get(f"/predictions/{other['id']}").json()["output"] == other["output"]
        assert api.get(f"/predictions/{remote['id']}").json()["output"] == remote["output"]
    assert rows(archiving.db_url, "output_file") == []


def test_a_too_large_output_is_not_kept(gateway_factory: Any, relay: FakeRelay) -> None:
    relay.outputs_on_relay = True
    gateway: Gateway = gateway_factory(durable_outputs=["*"], output_hosts=["127.0.0.1"],
                                       reconcile_interval=0.1, max_output_bytes=10)
    with gateway.client(create_token(gateway.db_url, "big")) as api:
        done = wait_terminal(api, create(api, "black-forest-labs/flux-schnell").json()["id"])
        time.sleep(1)
        assert api.get(f"/predictions/{done['id']}").json()["output"] == done["output"]
    assert rows(gateway.db_url, "output_file") == []


def test_a_too_large_output_is_tried_once(gateway_factory: Any, relay: FakeRelay) -> None:
    relay.outputs_on_relay = True
    gateway: Gateway = gateway_factory(durable_outputs=["*"], output_hosts=["127.0.0.1"],
                                       reconcile_interval=0.1, max_output_bytes=10)
    with gateway.client(create_token(gateway.db_url, "once")) as api:
        wait_terminal(api, create(api, "black-forest-labs/flux-schnell").json()["id"])
        time.sleep(1.5)
    downloads = [call for call in relay.calls if call.path.startswith("/delivery/")]
    assert len(downloads) == 1


def test_on_sqlite_the_archiver_walks_only_recently_created_predictions(sqlite_template: Path) -> None:
    # Every prediction that ever succeeded was walked on each pass: 2 to 6 s at a million.
    plan = sqlite_plan(sqlite_template, due_for_archiving(utcnow(), timedelta(minutes=30)))
    assert "ix_prediction_status_created_at_id (status=? AND created_at>?)" in plan, plan
