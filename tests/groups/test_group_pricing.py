"""A group's price multiplier: exact, on the reservation and the charge, fixed at create time."""

from __future__ import annotations

from decimal import Decimal
from fractions import Fraction
from typing import Any

import httpx
import orjson
import pytest

from app.accounting.pricing import cost_of, estimate_of, to_micros
from app.config import PriceRule
from app.groups.service import multiplier_text, parse_multiplier
from tests.conftest import Gateway
from tests.dbtools import rows
from tests.fakes.relay import FakeRelay
from tests.groups.support import ADMIN, add_group, add_token, admin_client
from tests.helpers import assert_problem, cli, create, wait_terminal, wait_until_all_final

D = Decimal


class TestArithmetic:
    @pytest.mark.parametrize(
        ("text", "ppm"),
        [("1", 1_000_000), ("1.5", 1_500_000), (1.5, 1_500_000), (2, 2_000_000), ("0.000001", 1),
         ("1.333333", 1_333_333), ("100", 100_000_000), ("1e1", 10_000_000), (" 0.5 ", 500_000)],
    )
    def test_a_multiplier_is_exact_parts_per_million(self, text: Any, ppm: int) -> None:
        assert parse_multiplier(text) == ppm

    @pytest.mark.parametrize("text", ["0", "-1", "0.0000001", "1.0000001", "100.000001", "101", "abc", "",
                                      "NaN", "Infinity", True, None, [1]])
    def test_a_multiplier_out_of_bounds_or_inexact_is_refused(self, text: Any) -> None:
        with pytest.raises(ValueError, match="must"):
            parse_multiplier(text)

    def test_a_multiplier_is_shown_exactly(self) -> None:
        assert multiplier_text(1_500_000) == "1.500000"
        assert multiplier_text(1) == "0.000001"

    @pytest.mark.parametrize(
        ("usd", "ppm", "micros"),
        [
            pytest.param("0.000009", 1_500_000, 14, id="a-half-rounds-up"),
            pytest.param("0.0000015", 1_500_000, 2, id="rounded-once-not-before-multiplying"),
            pytest.param("0.006", 1_333_333, 8_000, id="7999.998-rounds-to-8000"),
            pytest.param("0.01", 1_000_000, 10_000, id="one-is-unchanged"),
            pytest.param("0", 2_500_000, 0, id="zero-stays-zero"),
        ],
    )
    def test_to_micros_multiplies_then_rounds_half_up_once(self, usd: str, ppm: int, micros: int) -> None:
        assert to_micros(D(usd), ppm) == micros

    def test_many_digits_are_multiplied_exactly(self) -> None:
        usd = D("12345.678901234567890123456789")
        expected = Fraction(usd) * 1_000_000 * Fraction(1_333_337, 1_000_000)
        whole, rest = divmod(expected, 1)
        assert to_micros(usd, 1_333_337) == int(whole) + (1 if rest >= Fraction(1, 2) else 0)

    def test_estimates_and_costs_take_the_multiplier(self) -> None:
        rule = PriceRule(model="a/b", per_prediction=D("0.003"), per_second=D("0.0012"))
        assert estimate_of(rule, D(0), 1_500_000) == 4_500
        assert estimate_of(rule, D("0.002"), 1_500_000) == 7_500
        assert estimate_of(None, D("0.002"), 1_500_000) == 3_000
        cost = cost_of(rule, status="succeeded", output=["x"], metrics={"predict_time": 2.5}, ppm=1_500_000)
        assert cost.micros == 9_000
        assert cost_of(rule, status="succeeded", output=["x"], metrics={"predict_time": 2.5}).micros == 6_000


def _gateway(gateway_factory: Any, **overrides: Any) -> tuple[Gateway, httpx.Client]:
    gateway: Gateway = gateway_factory(admin_token=ADMIN, **overrides)
    return gateway, admin_client(gateway)


def _ledger(gateway: Gateway, kind: str) -> dict[str, int]:
    return {e["prediction_id"]: e["amount_micros"] for e in rows(gateway.db_url, "ledger_entry") if e["kind"] == kind}


def test_a_multiplier_applies_to_the_reservation_and_the_charge_exactly(
    gateway_factory: Any, relay: FakeRelay
) -> None:
    gateway, admin = _gateway(gateway_factory, default_estimate=D("0.002"), metered_estimate=D("0.002"))
    with admin:
        add_group(admin, "resellers", price_multiplier="1.5")
        member = add_token(admin, "member", group="resellers")
        outsider = add_token(admin, "outsider")
    relay.starting_seconds = 2.0
    with gateway.client(member) as api:
        held = create(api, "budget/model").json()["id"]
        account = api.get("/account").json()
        assert (account["reserved_usd"], account["in_flight"]) == ("0.015000", 1)
        assert account["group"] == "resellers"
        relay.starting_seconds = 0.2
        # (reserved, charged): the estimate and the cost, each times 1.5 and rounded half up once.
        expected = {
            held: (15_000, 15_000),  # $0.01
            # Metered prices hold their fixed parts plus the default estimate, $0.002.
            create(api, "llm/echo", text="one two three").json()["id"]: (3_000, 14),  # $0.000009 -> 13.5 -> 14
            create(api).json()["id"]: (7_500, 9_000),  # $0.005 held; $0.003 + 2.5 s x $0.0012 charged
            create(api, "unpriced/model").json()["id"]: (3_000, 3_000),  # no price: the estimate, $0.002
        }
        ids = list(expected)
        for prediction_id in ids:
            assert wait_terminal(api, prediction_id)["status"] == "succeeded"
        assert api.get("/account").json()["spent_usd"] == "0.027014"
    with gateway.client(outsider) as api:
        plain = create(api, "budget/model").json()["id"]
        wait_terminal(api, plain)

    reserved, settled = _ledger(gateway, "reservation"), _ledger(gateway, "settlement")
    assert {i: (reserved[i], settled[i]) for i in ids} == expected
    assert (reserved[plain], settled[plain]) == (10_000, 10_000)
    predictions = {p["id"]: p for p in rows(gateway.db_url, "prediction")}
    assert {predictions[i]["price_multiplier_ppm"] for i in ids} == {1_500_000}
    assert predictions[plain]["price_multiplier_ppm"] == 1_000_000
    unpriced = next(i for i, p in predictions.items() if p["model"] == "unpriced/model")
    assert predictions[unpriced]["cost_note"] == "charged at the estimate: no price matched this model"

    with admin_client(gateway) as admin:
        usage = admin.get("/usage", params={"group_by": "group"}).json()
        listed = {p["id"]: p for p in admin.get("/predictions").json()["results"]}
    assert usage["rows"] == [
        {"group": "resellers", "predictions": 4, "cost_usd": "0.027014"},
        {"group": None, "predictions": 1, "cost_usd": "0.010000"},
    ]
    assert usage["total"]["cost_usd"] == "0.037014"
    assert sum(settled.values()) == 37_014
    assert listed[held]["price_multiplier"] == "1.500000"
    assert listed[held]["estimate_usd"] == "0.015000"
    by_group = orjson.loads(cli(gateway.db_url, "usage", "--group-by", "group", "token", "--format", "json").stdout)
    assert [(r["group"], r["token"], r["cost_usd"]) for r in by_group["rows"]] == [
        ("resellers", "member", "0.027014"), (None, "outsider", "0.010000")]
    table = cli(gateway.db_url, "usage", "--group-by", "group").stdout
    assert "resellers" in table
    assert "0.037014" in table


def test_a_budget_holds_the_multiplied_estimate(gateway_factory: Any, relay: FakeRelay) -> None:
    gateway, admin = _gateway(gateway_factory)
    with admin:
        add_group(admin, "double", price_multiplier=2)
        member = add_token(admin, "member", group="double", budget_usd="0.04")
    with gateway.client(member) as api:
        first = create(api, "budget/model").json()["id"]
        second = create(api, "budget/model").json()["id"]
        refused = assert_problem(create(api, "budget/model"), 402)
        assert "needs up to 0.020000" in refused["detail"]
        wait_terminal(api, first)
        wait_terminal(api, second)
        assert api.get("/account").json()["spent_usd"] == "0.040000"
    assert len(relay.creates()) == 2


def test_changing_the_multiplier_mid_prediction_does_not_change_its_charge(
    gateway_factory: Any, relay: FakeRelay
) -> None:
    gateway, admin = _gateway(gateway_factory)
    with admin:
        add_group(admin, "resellers", price_multiplier="1.5")
        member = add_token(admin, "member", group="resellers")
        relay.starting_seconds = 1.5
        with gateway.client(member) as api:
            running = create(api, "budget/model").json()["id"]
            changed = admin.patch("/groups/resellers", json={"price_multiplier": "3"})
            assert changed.json()["price_multiplier"] == "3.000000"
            assert api.get(f"/predictions/{running}").json()["status"] in ("starting", "processing")
            assert wait_terminal(api, running)["status"] == "succeeded"
            relay.starting_seconds = 0.2
            later = create(api, "budget/model").json()["id"]
            wait_terminal(api, later)
    settled = _ledger(gateway, "settlement")
    assert (_ledger(gateway, "reservation")[running], settled[running]) == (15_000, 15_000)
    assert (_ledger(gateway, "reservation")[later], settled[later]) == (30_000, 30_000)


def test_a_create_in_doubt_is_charged_the_multiplied_estimate(gateway_factory: Any, relay: FakeRelay) -> None:
    gateway, admin = _gateway(gateway_factory, reconcile_interval=0.1, connect_timeout=0.5, create_timeout=0.5)
    with admin:
        add_group(admin, "resellers", price_multiplier="1.5")
        member = add_token(admin, "member", group="resellers")
    with gateway.client(member) as api:
        relay.fail_next("hang", seconds=2)
        assert_problem(create(api, "budget/model"), 504)
    wait_until_all_final(gateway.db_url, 15)
    (row,) = rows(gateway.db_url, "prediction")
    assert (row["status"], row["cost_micros"]) == ("failed", 15_000)
    assert row["cost_note"].startswith("charged at the estimate")
    assert _ledger(gateway, "settlement") == {row["id"]: 15_000}


def test_the_usage_report_counts_running_predictions_and_groups_as_the_ledger_does(
    admin_gateway: Gateway, relay: FakeRelay
) -> None:
    with admin_client(admin_gateway) as admin:
        add_group(admin, "resold", price_multiplier="1.5")
        member = add_token(admin, "member", group="resold")
        alone = add_token(admin, "alone")
        with admin_gateway.client(member) as api:
            wait_terminal(api, create(api).json()["id"])
            wait_terminal(api, create(api, "black-forest-labs/flux-dev", fail=True).json()["id"])
        with admin_gateway.client(alone) as api:
            wait_terminal(api, create(api, "llm/echo", text="one two").json()["id"])
            relay.fail_next("status", status=422, method="POST")
            assert create(api).status_code == 422  # refused upstream: not in any report
            relay.starting_seconds = 30
            running = create(api).json()["id"]
        report = admin.get("/usage", params={"group_by": ["group", "token", "model", "day"]}).json()
        as_csv = admin.get("/usage", params={"group_by": ["group", "token", "model", "day"], "format": "csv"}).text
        predictions = rows(admin_gateway.db_url, "prediction")
        with admin_gateway.client(alone) as api:
            assert api.post(f"/predictions/{running}/cancel").status_code == 200

    # What summing every prediction gives, refused creates left out.
    names = {t["id"]: t["name"] for t in rows(admin_gateway.db_url, "api_token")}
    expected: dict[tuple[str | None, ...], list[int]] = {}
    for p in predictions:
        if p["submission"] == "rejected":
            continue
        group = "resold" if names[p["token_id"]] == "member" else None
        totals = expected.setdefault((group, names[p["token_id"]], p["model"], str(p["created_at"])[:10]), [0, 0])
        totals[0] += 1
        totals[1] += p["cost_micros"] or 0
    got = {(r["group"], r["token"], r["model"], r["day"]): [r["predictions"], round(float(r["cost_usd"]) * 1e6)]
           for r in report["rows"]}
    assert got == expected
    assert [key[0] for key in got] == ["resold", "resold", None, None], "no group last"
    assert report["total"]["predictions"] == 4
    lines = as_csv.splitlines()
    assert lines[0] == "token,model,day,group,predictions,cost_usd"
    assert len(lines) == 1 + len(expected)
