"""Two gateway processes on one database behave as one: budget, rate limit and settlement."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.dbtools import create_token, rows
from tests.fakes.relay import FakeRelay
from tests.helpers import release_together, same_minute, wait_until_all_final
from tests.invariants import check_all
from tests.processes import GatewayProcess


@pytest.fixture
def pair(db_url: str, relay: FakeRelay, tmp_path: Path) -> Iterator[tuple[GatewayProcess, GatewayProcess]]:
    gateways = [
        GatewayProcess(db_url=db_url, upstream_url=relay.upstream_url, upstream_token=relay.key,
                       workdir=tmp_path).start()
        for _ in range(2)
    ]
    yield gateways[0], gateways[1]
    for gateway in gateways:
        gateway.stop()


def spread(pair: tuple[GatewayProcess, GatewayProcess], secret: str, count: int) -> list[httpx.Response]:
    """`count` creates released together, alternating between the two processes."""

    def one(i: int) -> httpx.Response:
        with httpx.Client(base_url=pair[i % 2].url, headers={"Authorization": f"Bearer {secret}"},
                          timeout=30) as api:
            return api.post("/models/budget/model/predictions", json={"input": {"i": i}})

    return release_together(count, one)


def test_budget_rate_and_settlement_hold_across_two_processes(
    pair: tuple[GatewayProcess, GatewayProcess], db_url: str, relay: FakeRelay
) -> None:
    budgeted = create_token(db_url, "budgeted", budget_micros=50_000)
    limited = create_token(db_url, "limited", rpm_limit=4)

    assert Counter(r.status_code for r in spread(pair, budgeted, 24)) == {201: 5, 402: 19}
    same_minute()
    assert Counter(r.status_code for r in spread(pair, limited, 10)) == {201: 4, 429: 6}
    assert len(relay.creates()) == 9

    wait_until_all_final(db_url, 30)
    tokens = {t["name"]: t for t in rows(db_url, "api_token")}
    assert tokens["budgeted"]["spent_micros"] == 50_000
    assert tokens["limited"]["spent_micros"] == 40_000
    settlements = [e for e in rows(db_url, "ledger_entry") if e["kind"] == "settlement"]
    assert len(settlements) == len({e["prediction_id"] for e in settlements}) == 9
    check_all(db_url, relay, settled=True)


def test_the_in_flight_limit_holds_across_two_processes(
    pair: tuple[GatewayProcess, GatewayProcess], db_url: str, relay: FakeRelay
) -> None:
    narrow = create_token(db_url, "narrow", max_in_flight=3)
    relay.starting_seconds = 30  # every admitted prediction stays in flight

    responses = spread(pair, narrow, 12)
    assert Counter(r.status_code for r in responses) == {201: 3, 429: 9}
    assert len(relay.creates()) == 3
    (token,) = (t for t in rows(db_url, "api_token") if t["name"] == "narrow")
    assert token["in_flight"] == 3
    admitted = [r.json()["id"] for r in responses if r.status_code == 201]
    for i, prediction_id in enumerate(admitted):
        with httpx.Client(base_url=pair[i % 2].url, headers={"Authorization": f"Bearer {narrow}"}) as api:
            assert api.post(f"/predictions/{prediction_id}/cancel").json()["status"] == "canceled"
    with httpx.Client(base_url=pair[1].url, headers={"Authorization": f"Bearer {narrow}"}, timeout=30) as api:
        assert api.post("/models/budget/model/predictions", json={"input": {}}).status_code == 201
