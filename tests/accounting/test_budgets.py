"""Budgets, rate and in-flight limits: admitted atomically, refused before anything is sent."""

from __future__ import annotations

import logging
from collections import Counter
from decimal import Decimal
from typing import Any

import httpx
import pytest

from app.config import PriceRule, Settings
from tests.conftest import TEST_PRICES, Gateway
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


# Metered by predict_time alone, with no `estimate`: $0.004 a second of predict_time.
METERED = PriceRule(model="metered/*", per_second=Decimal("0.004"))


class TestVariablePrices:
    @pytest.mark.parametrize(("predict_time", "actual"), [(2.5, 10_000), (1.0, 4_000)])
    def test_a_burst_of_metered_creates_reserves_the_metered_estimate_each(
        self, gateway_factory: Any, relay: FakeRelay, predict_time: float, actual: int
    ) -> None:
        # With the fixed parts alone (none here) reserved, every create of the burst would fit.
        default = Settings.model_fields["metered_estimate"].default
        gateway = gateway_factory(prices=[METERED, *TEST_PRICES], metered_estimate=default)
        estimate, budget = 10_000, 50_000  # the metered estimate, $0.01; five of them
        relay.starting_seconds, relay.predict_time = 1.0, predict_time  # all in flight together
        secret = create_token(gateway.db_url, "metered", budget_micros=budget)
        responses = burst(gateway, secret, 30, model="metered/model")
        assert Counter(r.status_code for r in responses) == {201: 5, 402: 25}
        assert len(relay.creates()) == 5
        row = token_row(gateway.db_url, "metered")
        assert (row["reserved_micros"], row["spent_micros"]) == (5 * estimate, 0)
        with gateway.client(secret) as api:
            for response in responses:
                if response.status_code == 201:
                    wait_terminal(api, response.json()["id"])
        row = token_row(gateway.db_url, "metered")
        # I3: the cap holds up to one prediction's actual-minus-estimate.
        assert (row["reserved_micros"], row["spent_micros"]) == (0, 5 * actual)
        assert row["spent_micros"] <= budget + max(0, actual - estimate)
        check_ledger(gateway.db_url)

    def test_per_output_reserves_the_requested_number_of_outputs(
        self, gateway: Gateway, relay: FakeRelay
    ) -> None:
        secret = create_token(gateway.db_url, "images", budget_micros=50_000)
        relay.starting_seconds = 1.0
        with gateway.client(secret) as api:
            four = create(api, "someone/multi", num_outputs=4)  # $0.01 an output
            assert four.status_code == 201, four.text
            assert token_row(gateway.db_url, "images")["reserved_micros"] == 40_000
            # Four more outputs do not fit beside the first four; one does.
            assert_problem(create(api, "someone/multi", num_outputs=4), 402)
            one = create(api, "someone/multi")
            assert one.status_code == 201, one.text
            for response in (four, one):
                wait_terminal(api, response.json()["id"])
        reserved = {e["prediction_id"]: e["amount_micros"] for e in rows(gateway.db_url, "ledger_entry")
                    if e["kind"] == "reservation"}
        assert reserved == {four.json()["id"]: 40_000, one.json()["id"]: 10_000}
        assert token_row(gateway.db_url, "images")["spent_micros"] == 50_000
        check_ledger(gateway.db_url)

    def test_start_up_warns_of_each_metered_price_without_an_estimate(
        self, gateway_factory: Any, caplog: pytest.LogCaptureFixture
    ) -> None:
        gateway_factory()
        warned = [r for r in caplog.records if r.getMessage() == "prices.metered_estimate_reserved"]
        assert sorted(r.model for r in warned) == ["black-forest-labs/*", "llm/*"]  # type: ignore[attr-defined]
        assert {r.levelno for r in warned} == {logging.WARNING}
