"""After priced predictions, `usage` reports exactly the expected decimal cost."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import orjson

from tests.conftest import Gateway
from tests.dbtools import create_token, rows
from tests.fakes.relay import FakeRelay
from tests.helpers import cli, create, wait_terminal, wait_until_all_final


def _run_all(api: httpx.Client, jobs: list[tuple[str, dict[str, object]]]) -> None:
    ids = [create(api, model, **inputs).json()["id"] for model, inputs in jobs]
    for prediction_id in ids:
        wait_terminal(api, prediction_id)


def test_usage_json_reports_the_exact_decimal_cost(gateway: Gateway, api: httpx.Client) -> None:
    _run_all(api, [("black-forest-labs/flux-schnell", {})] * 7)  # 7 x (0.003 + 2.5 s x 0.0012)
    _run_all(api, [("llm/echo", {"text": "one two three"})] * 2)  # 2 x (3 x 0.000001 + 3 x 0.000002)
    _run_all(api, [("acme/multi", {"num_outputs": 3})])  # 3 outputs x 0.01
    _run_all(api, [("black-forest-labs/flux-dev", {"fail": True})])  # failed: nothing
    _run_all(api, [("unpriced/model", {})])  # no price entry: nothing, and flagged
    with gateway.client(create_token(gateway.db_url, "team-b")) as other:
        _run_all(other, [("black-forest-labs/flux-schnell", {})])

    result = cli(gateway.db_url, "usage", "--format", "json")
    assert result.returncode == 0, result.stderr
    report = orjson.loads(result.stdout)
    assert report["total"] == {"predictions": 13, "cost_usd": "0.078018"}

    by_model = orjson.loads(cli(gateway.db_url, "usage", "--group-by", "model", "--format", "json").stdout)
    assert {r["model"]: (r["predictions"], r["cost_usd"]) for r in by_model["rows"]} == {
        "acme/multi": (1, "0.030000"),
        "black-forest-labs/flux-dev": (1, "0.000000"),
        "black-forest-labs/flux-schnell": (8, "0.048000"),
        "llm/echo": (2, "0.000018"),
        "unpriced/model": (1, "0.000000"),
    }
    by_token_day = orjson.loads(
        cli(gateway.db_url, "usage", "--group-by", "token", "day", "--format", "json").stdout
    )
    today = datetime.now(UTC).date().isoformat()
    assert by_token_day["rows"] == [
        {"token": "team-a", "day": today, "predictions": 12, "cost_usd": "0.072018"},
        {"token": "team-b", "day": today, "predictions": 1, "cost_usd": "0.006000"},
    ]
    assert sum(r["cost_micros"] for r in rows(gateway.db_url, "prediction")) == 78018
    notes = {r["model"]: r["cost_note"] for r in rows(gateway.db_url, "prediction")}
    assert notes["unpriced/model"] == "charged at the estimate: no price matched this model"

    tomorrow = (datetime.now(UTC) + timedelta(days=1)).date().isoformat()
    later = orjson.loads(cli(gateway.db_url, "usage", "--since", tomorrow, "--format", "json").stdout)
    assert later["total"] == {"predictions": 0, "cost_usd": "0.000000"}
    until_today = orjson.loads(cli(gateway.db_url, "usage", "--until", today, "--format", "json").stdout)
    assert until_today["total"]["cost_usd"] == "0.078018"

    table = cli(gateway.db_url, "usage", "--group-by", "token").stdout
    assert "team-a" in table
    assert "0.078018" in table
    parsed = list(csv.DictReader(io.StringIO(cli(gateway.db_url, "usage", "--group-by", "token", "--format", "csv").stdout)))
    assert [(r["token"], r["cost_usd"]) for r in parsed] == [("team-a", "0.072018"), ("team-b", "0.006000")]


def test_bad_usage_arguments_fail_cleanly(gateway: Gateway) -> None:
    for args in (["--since", "yesterday"], ["--group-by", "color"], ["--format", "xml"]):
        result = cli(gateway.db_url, "usage", *args)
        assert result.returncode == 2
        assert "Traceback" not in result.stderr


def test_settled_ledger_entries_add_up_to_the_usage_total(gateway_factory: Any, relay: FakeRelay) -> None:
    gateway: Gateway = gateway_factory(reconcile_interval=0.1, connect_timeout=0.5, create_timeout=0.5)
    secret = create_token(gateway.db_url, "mixed")
    with gateway.client(secret) as api:
        _run_all(api, [("black-forest-labs/flux-schnell", {})] * 3)
        _run_all(api, [("underestimated/model", {}), ("billfailures/model", {"fail": True}),
                       ("budget/model", {"fail": True}), ("llm/echo", {"text": "a b c d"})])
        relay.fail_next("status", status=422)
        create(api, "budget/model")  # refused upstream: released, not counted
        relay.fail_next("hang", seconds=2)
        create(api, "budget/model")  # in doubt: charged at the estimate by the reconciler
    wait_until_all_final(gateway.db_url, 20)
    settled = sum(e["amount_micros"] for e in rows(gateway.db_url, "ledger_entry") if e["kind"] == "settlement")
    report = orjson.loads(cli(gateway.db_url, "usage", "--format", "json").stdout)
    assert settled == 3 * 6000 + 10_000 + 20_000 + 0 + 12 + 10_000
    assert report["total"]["cost_usd"] == f"0.{settled:06d}"
