"""A final state's settlement or release: written with the state, once, and on PostgreSQL in one statement."""

from __future__ import annotations

import asyncio
import re
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy.dialects import postgresql
from sqlalchemy.exc import IntegrityError

from app.accounting import service as accounting
from app.predictions.models import PREDICTIONS
from app.predictions.recording import _final_state_in_one
from app.upstream.schemas import parse_prediction
from tests.conftest import Gateway
from tests.dbtools import create_token, rows, standalone_recorder, token_row
from tests.fakes.relay import FakeRelay
from tests.helpers import create, wait_terminal
from tests.invariants import check_all


@pytest.mark.parametrize(("model", "fail", "kind", "amount", "charged"), [
    ("budget/model", False, "settlement", 10_000, 10_000),
    ("budget/model", True, "release", 10_000, 0),
    ("billfailures/model", True, "settlement", 20_000, 20_000),
])
def test_a_final_state_closes_the_ledger_and_moves_the_counters_and_the_daily_usage(
    gateway_factory: Any, relay: FakeRelay, executed: list[str], model: str, fail: bool, kind: str, amount: int,
    charged: int,
) -> None:
    # No reconciler: the client's own GETs record each state.
    gateway: Gateway = gateway_factory(reconcile_interval=3600)
    secret = create_token(gateway.db_url, "team", budget_micros=100_000)
    with gateway.client(secret) as api:
        response = create(api, model, fail=fail)
        assert response.status_code == 201, response.text
        executed.clear()
        final = wait_terminal(api, response.json()["id"])
        during = [s.lstrip() for s in executed if s.lstrip().split(None, 1)[0].upper() in ("WITH", "INSERT", "UPDATE")]
    assert final["status"] == ("failed" if fail else "succeeded")

    (row,) = rows(gateway.db_url, "prediction")
    assert (row["status"], row["cost_micros"]) == (final["status"], charged)
    entries = {entry["kind"]: entry for entry in rows(gateway.db_url, "ledger_entry")}
    assert set(entries) == {"reservation", kind}
    closing = entries[kind]
    assert (closing["prediction_id"], closing["token_id"], closing["amount_micros"]) == (
        row["id"], row["token_id"], amount)
    assert closing["created_at"] is not None
    token = token_row(gateway.db_url, "team")
    assert (token["spent_micros"], token["reserved_micros"], token["in_flight"]) == (charged, 0, 0)
    (usage,) = rows(gateway.db_url, "usage_daily")
    assert (usage["token_id"], usage["model"], usage["predictions"], usage["succeeded"], usage["failed"],
            usage["cost_micros"]) == (row["token_id"], model, 1, 0 if fail else 1, 1 if fail else 0, charged)
    check_all(gateway.db_url, relay)

    if gateway.db_url.startswith("postgresql"):
        # The final state and its three accounting writes are one statement; every other state
        # is a single update of the row.
        assert [s for s in during if not s.startswith("UPDATE prediction SET")] == [
            s for s in during if s.startswith("WITH final AS")], during
        assert len([s for s in during if s.startswith("WITH final AS")]) == 1, during


def test_two_processes_recording_the_same_final_state_close_it_once(
    gateway_factory: Any, relay: FakeRelay
) -> None:
    gateway: Gateway = gateway_factory(reconcile_interval=3600)
    secret = create_token(gateway.db_url, "team")
    with gateway.client(secret) as api:
        response = create(api, "budget/model")
        assert response.status_code == 201, response.text
    prediction_id = response.json()["id"]
    (row,) = rows(gateway.db_url, "prediction")
    reply = parse_prediction({"id": row["upstream_id"], "status": "succeeded", "output": ["done"],
                              "metrics": {"predict_time": 1.0}})

    async def race() -> list[str]:
        async with (standalone_recorder(gateway.db_url, gateway.settings) as (one, _),
                    standalone_recorder(gateway.db_url, gateway.settings) as (other, _)):
            recorded = await asyncio.gather(*(recorder.apply_upstream_state(prediction_id, reply)
                                              for recorder in (one, other, one, other)))
        return [prediction.status for prediction in recorded]

    assert asyncio.run(race()) == ["succeeded"] * 4
    kinds = sorted(entry["kind"] for entry in rows(gateway.db_url, "ledger_entry"))
    assert kinds == ["reservation", "settlement"]
    token = token_row(gateway.db_url, "team")
    assert (token["spent_micros"], token["reserved_micros"], token["in_flight"]) == (10_000, 0, 0)
    (usage,) = rows(gateway.db_url, "usage_daily")
    assert (usage["predictions"], usage["succeeded"], usage["cost_micros"]) == (1, 1, 10_000)
    check_all(gateway.db_url, relay)


def test_the_database_refuses_a_second_closing_entry_for_a_prediction(gateway: Gateway, relay: FakeRelay) -> None:
    # Behind the compare-and-set, the unique (prediction, kind) pair is the last guard against a
    # second charge: the transaction that would write one fails whole, the counters' update too.
    secret = create_token(gateway.db_url, "team")
    with gateway.client(secret) as api:
        created = create(api, "budget/model")
        assert wait_terminal(api, created.json()["id"])["status"] == "succeeded"
    (prediction,) = rows(gateway.db_url, "prediction")
    charged_again = accounting.Outcome(charged=True, amount_micros=10_000)

    async def close_again() -> None:
        async with standalone_recorder(gateway.db_url, gateway.settings) as (_, transactions):
            await transactions.run(lambda connection: accounting.close(
                connection, prediction_id=prediction["id"], token_id=prediction["token_id"],
                estimate_micros=10_000, outcome=charged_again, now=datetime.now(UTC)))

    with pytest.raises(IntegrityError):
        asyncio.run(close_again())
    assert sorted(entry["kind"] for entry in rows(gateway.db_url, "ledger_entry")) == ["reservation", "settlement"]
    token = token_row(gateway.db_url, "team")
    assert (token["spent_micros"], token["reserved_micros"]) == (10_000, 0)


def test_the_one_statement_settlement_sets_only_what_it_means_to() -> None:
    # Core adds a SET for every parameter named like a column of an updated table, in a CTE too:
    # a column of the token or of the prediction named like one of the settlement's parameters
    # would be overwritten by it.
    names = tuple(column.name for column in PREDICTIONS.columns if column.name != "id")
    closing = accounting.closing_parameters(
        estimate_micros=1, outcome=accounting.Outcome(True, 1), now=datetime.now(UTC))
    keys = ["match_id", *(f"set_{name}" for name in names), *closing]
    for linking in (False, True):
        statement = _final_state_in_one("succeeded", linking, names)
        sql = str(statement.compile(dialect=postgresql.dialect(), column_keys=keys))
        assigned = {table: set(re.findall(r"(?:^|, )(\w+)=", columns))
                    for table, columns in re.findall(r"UPDATE (\w+) SET (.*?) WHERE", sql, re.DOTALL)}
        assert assigned == {"prediction": set(names),
                            "api_token": {"spent_micros", "budget_window", "reserved_micros", "in_flight"}}, sql
        inserts = re.findall(r"INSERT INTO (\w+) \((.*?)\)", sql)
        assert inserts == [
            ("ledger_entry", "prediction_id, token_id, kind, amount_micros, note, created_at"),
            ("usage_daily", "day, token_id, model, predictions, succeeded, failed, canceled, cost_micros"),
        ], sql
