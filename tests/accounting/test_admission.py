"""A create's admission, row and reservation: written together, and on PostgreSQL in one statement."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime

import pytest
from sqlalchemy.dialects import postgresql

from app.accounting import service as accounting
from app.predictions.models import PREDICTIONS
from tests.conftest import Gateway
from tests.dbtools import create_token, execute, rows, token_row
from tests.fakes.relay import FakeRelay
from tests.helpers import assert_problem, create


def test_an_admitted_create_writes_its_row_reservation_and_counters(
    gateway: Gateway, relay: FakeRelay, executed: list[str]
) -> None:
    secret = create_token(gateway.db_url, "team", budget_micros=100_000, rpm_limit=10, max_in_flight=5)
    with gateway.client(secret) as api:
        executed.clear()
        response = api.post("/models/budget/model/predictions", json={"input": {"prompt": "p"}},
                            headers={"Idempotency-Key": "one"})
        assert response.status_code == 201, response.text
        during = list(executed)
    prediction_id = response.json()["id"]

    (row,) = rows(gateway.db_url, "prediction")
    assert (row["id"], row["model"], row["status"], row["submission"]) == (
        prediction_id, "budget/model", "starting", "accepted")
    stored_input = json.loads(row["input"]) if isinstance(row["input"], str) else row["input"]
    assert (row["estimate_micros"], row["idempotency_key"], stored_input) == (10_000, "one", {"prompt": "p"})
    assert row["upstream_id"] == relay.creates()[0].prediction_id
    (entry,) = rows(gateway.db_url, "ledger_entry")
    assert (entry["prediction_id"], entry["token_id"], entry["kind"], entry["amount_micros"]) == (
        prediction_id, row["token_id"], "reservation", 10_000)
    assert entry["created_at"] is not None
    token = token_row(gateway.db_url, "team")
    assert (token["reserved_micros"], token["spent_micros"], token["in_flight"], token["rate_count"]) == (
        10_000, 0, 1, 1)

    if gateway.db_url.startswith("postgresql"):
        # Two statements, each one round trip in no transaction of its own making: the admission
        # with the row and its reservation, then the link to the upstream's prediction.
        writes = [s for s in during if s.lstrip().split(None, 1)[0].upper() in ("WITH", "INSERT", "UPDATE")]
        assert len(writes) == 2, writes
        assert writes[0].lstrip().startswith("WITH admitted AS")
        assert writes[1].lstrip().startswith("UPDATE prediction SET upstream_id=")


@pytest.mark.parametrize("limit", ["budget", "rate", "in-flight", "revoked"])
def test_a_refused_create_writes_nothing_and_sends_nothing(gateway: Gateway, relay: FakeRelay, limit: str) -> None:
    limits = {"budget": {"budget_micros": 15_000}, "rate": {"rpm_limit": 1}, "in-flight": {"max_in_flight": 1},
              "revoked": {}}[limit]
    secret = create_token(gateway.db_url, "team", **limits)
    with gateway.client(secret) as api:
        assert create(api, "budget/model").status_code == 201
        before = (token_row(gateway.db_url, "team"), rows(gateway.db_url, "prediction"), rows(gateway.db_url, "ledger_entry"))
        if limit == "revoked":
            # Refused at sign-in or, while the gateway still holds the token in its cache, by the admission.
            execute(gateway.db_url, "UPDATE api_token SET revoked_at = CURRENT_TIMESTAMP WHERE name = 'team'")
        refused = create(api, "budget/model")
    expected = {"budget": 402, "rate": 429, "in-flight": 429, "revoked": 401}[limit]
    assert_problem(refused, expected)
    after_token = token_row(gateway.db_url, "team")
    if limit != "revoked":
        assert after_token == before[0]
    assert rows(gateway.db_url, "prediction") == before[1]
    assert rows(gateway.db_url, "ledger_entry") == before[2]
    assert len(relay.creates()) == 1


def test_the_one_statement_create_sets_only_the_admission_columns_of_the_token() -> None:
    # Core adds a SET for every parameter named like a column of an updated table, in a CTE too:
    # a token column named like one of the create's parameters would be overwritten by it.
    names = tuple(column.name for column in PREDICTIONS.columns)
    keys = [*accounting.admission_parameters(token_id="t", estimate_micros=1, now=datetime.now(UTC)),
            *(f"row_{name}" for name in names), "reserved_at"]
    for limits_taken in (False, True):
        statement = accounting.create_in_one(limits_taken=limits_taken, names=names)
        sql = str(statement.compile(dialect=postgresql.dialect(), column_keys=keys))
        match = re.search(r"UPDATE api_token SET (.*?) WHERE", sql, re.DOTALL)
        assert match is not None, sql
        assigned = set(re.findall(r"(?:^|, )(\w+)=", match[1]))
        assert assigned == {"spent_micros", "budget_window", "reserved_micros", "in_flight", "rate_count",
                            "rate_previous_count", "rate_window"}, assigned
