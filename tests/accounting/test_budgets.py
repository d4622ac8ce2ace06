"""Budgets, rate and in-flight limits: admitted atomically, refused before anything is sent."""

from __future__ import annotations

from collections import Counter

import httpx
import pytest

from tests.conftest import Gateway
from tests.dbtools import create_token, execute, rows, token_row
from tests.fakes.relay import FakeRelay
from tests.helpers import assert_problem, burst, create, wait_terminal
from tests.invariants import check_ledger


class TestBudget:
    @pytest.mark.parametrize("round_", range(3))
    def test_a_burst_never_exceeds_the_budget(self, gateway: Gateway, relay: FakeRelay, round_: int) -> None:
        secret = create_token(gateway.db_url, f"small-{round_}", budget_micros=50_000)  # five predictions
        responses = burst(gateway, secret, 30)
        statuses = Counter(r.status_code for r in responses)
        assert statuses == {201: 5, 402: 25}
        for refused in (r for r in responses if r.status_code == 402):
            assert_problem(refused, 402)
        assert len(relay.creates()) == 5
        row = token_row(gateway.db_url, f"small-{round_}")
        assert row["spent_micros"] + row["reserved_micros"] <= 50_000
        with gateway.client(secret) as api:
            for response in responses:
                if response.status_code == 201:
                    wait_terminal(api, response.json()["id"])
            assert api.get("/account").json()["spent_usd"] == "0.050000"
            assert_problem(create(api, "budget/model"), 402)
        check_ledger(gateway.db_url)

    def test_an_underestimate_overruns_by_at_most_one_prediction(self, gateway: Gateway) -> None:
        # Estimated at 5,000, costing 10,000: after the first, 10,000 + 5,000 still fits 15,000,
        # and the second's real cost takes the spend past the budget by its own underestimate.
        secret = create_token(gateway.db_url, "tight", budget_micros=15_000)
        with gateway.client(secret) as api:
            accepted = 0
            while True:
                response = create(api, "underestimated/model")
                if response.status_code == 402:
                    break
                wait_terminal(api, response.json()["id"])
                accepted += 1
            assert_problem(create(api, "underestimated/model"), 402)
        row = token_row(gateway.db_url, "tight")
        assert accepted == 2
        assert row["spent_micros"] == 20_000
        assert 0 < row["spent_micros"] - 15_000 <= 10_000 - 5_000

    def test_failures_are_released_unless_the_price_bills_them(self, gateway: Gateway, api: httpx.Client) -> None:
        free = wait_terminal(api, create(api, "budget/model", fail=True).json()["id"])
        billed = wait_terminal(api, create(api, "billfailures/model", fail=True).json()["id"])
        costs = {r["id"]: r["cost_micros"] for r in rows(gateway.db_url, "prediction")}
        assert costs == {free["id"]: 0, billed["id"]: 20_000}
        kinds = {(e["prediction_id"], e["kind"]) for e in rows(gateway.db_url, "ledger_entry")}
        assert (free["id"], "release") in kinds
        assert (billed["id"], "settlement") in kinds

    def test_a_rejected_create_gives_its_reservation_back(
        self, gateway: Gateway, relay: FakeRelay
    ) -> None:
        secret = create_token(gateway.db_url, "one", budget_micros=10_000)
        with gateway.client(secret) as api:
            relay.fail_next("status", status=422)
            assert_problem(create(api, "budget/model"), 422)
            assert token_row(gateway.db_url, "one")["reserved_micros"] == 0
            assert create(api, "budget/model").status_code == 201

    def test_account_shows_budget_spent_reserved_and_remaining(
        self, gateway: Gateway, relay: FakeRelay
    ) -> None:
        secret = create_token(gateway.db_url, "shown", budget_micros=1_000_000, max_in_flight=5)
        relay.starting_seconds = 30
        with gateway.client(secret) as api:
            create(api, "budget/model")
            account = api.get("/account").json()
        assert account["username"] == "shown"
        assert account["budget_usd"] == "1.000000"
        assert account["reserved_usd"] == "0.010000"
        assert account["spent_usd"] == "0.000000"
        assert account["remaining_usd"] == "0.990000"
        assert account["in_flight"] == 1

    def test_a_monthly_budget_starts_each_month_afresh(self, gateway: Gateway) -> None:
        secret = create_token(gateway.db_url, "monthly", budget_micros=10_000, budget_period="month")
        with gateway.client(secret) as api:
            wait_terminal(api, create(api, "budget/model").json()["id"])
            assert_problem(create(api, "budget/model"), 402)
        # Pretend the spending happened last month.
        execute(gateway.db_url, "UPDATE api_token SET budget_window = '2000-01' WHERE name = 'monthly'")
        with gateway.client(secret) as api:
            assert api.get("/account").json()["spent_usd"] == "0.000000"
            assert create(api, "budget/model").status_code == 201


class TestLimits:
    def test_rate_limit_is_429_with_an_integer_retry_after_and_nothing_sent(
        self, gateway: Gateway, relay: FakeRelay
    ) -> None:
        secret = create_token(gateway.db_url, "rpm", rpm_limit=3)
        responses = burst(gateway, secret, 8)
        assert Counter(r.status_code for r in responses) == {201: 3, 429: 5}
        throttled = next(r for r in responses if r.status_code == 429)
        assert_problem(throttled, 429)
        assert 1 <= int(throttled.headers["retry-after"]) <= 60
        assert len(relay.creates()) == 3

    def test_in_flight_limit_frees_a_slot_when_a_prediction_ends(
        self, gateway: Gateway, relay: FakeRelay
    ) -> None:
        secret = create_token(gateway.db_url, "narrow", max_in_flight=2)
        relay.starting_seconds = 1.0
        with gateway.client(secret) as api:
            first = create(api).json()["id"]
            create(api)
            refused = create(api)
            assert_problem(refused, 429)
            assert refused.headers["retry-after"].isdigit()
            wait_terminal(api, first)
            assert create(api).status_code == 201
