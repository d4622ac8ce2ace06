"""The admin API: absent without GATEWAY_ADMIN_TOKEN, tokens and usage with it."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.conftest import Gateway
from tests.dbtools import create_token
from tests.fakes.relay import FakeRelay
from tests.helpers import assert_problem, create, wait_terminal

ADMIN_SECRET = "admin-canary-5b1e0f3c9d"


@pytest.fixture
def admin_gateway(gateway_factory: Any) -> Gateway:
    gw: Gateway = gateway_factory(admin_token=ADMIN_SECRET)
    return gw


def _admin(gateway: Gateway, secret: str | None = ADMIN_SECRET) -> httpx.Client:
    headers = {"Authorization": f"Bearer {secret}"} if secret else {}
    return httpx.Client(base_url=gateway.url + "/admin/v1", headers=headers, timeout=30)


def test_without_an_admin_token_setting_the_admin_api_does_not_exist(gateway: Gateway) -> None:
    with _admin(gateway, "anything") as admin:
        assert_problem(admin.get("/tokens"), 404)


def test_wrong_or_missing_admin_token_is_refused(admin_gateway: Gateway, token: str) -> None:
    with _admin(admin_gateway, None) as admin:
        assert_problem(admin.get("/tokens"), 401)
    with _admin(admin_gateway, "wrong") as admin:
        assert_problem(admin.get("/tokens"), 403)
    with _admin(admin_gateway, token) as admin:
        assert_problem(admin.get("/tokens"), 403)


@pytest.mark.parametrize(("method", "path"), [
    ("POST", "/tokens"), ("PATCH", "/tokens/ops"), ("POST", "/groups"), ("PATCH", "/groups/ops"),
])
def test_the_admin_token_is_checked_before_the_body_is_read(
    gateway: Gateway, admin_gateway: Gateway, token: str, method: str, path: str
) -> None:
    unreadable = {"content": b"{not json", "headers": {"Content-Type": "application/json"}}
    with _admin(gateway, "anything") as admin:
        assert_problem(admin.request(method, path, **unreadable), 404)
    with _admin(admin_gateway, None) as admin:
        assert_problem(admin.request(method, path, **unreadable), 401)
    with _admin(admin_gateway, token) as admin:
        assert_problem(admin.request(method, path, **unreadable), 403)


def test_create_use_list_revoke_and_report(admin_gateway: Gateway) -> None:
    with _admin(admin_gateway) as admin:
        created = admin.post("/tokens", json={"name": "ci", "models": ["black-forest-labs/*"],
                                              "budget_usd": "2.50", "expires_at": "2099-01-01T00:00:00Z"})
        assert created.status_code == 201, created.text
        secret = created.json()["token"]
        assert created.json()["budget_usd"] == "2.500000"
        assert_problem(admin.post("/tokens", json={"name": "ci"}), 400)
        assert_problem(admin.post("/tokens", json={"name": "bad name!"}), 422)
        assert_problem(admin.post("/tokens", json={"name": "x", "budget_usd": "-1"}), 422)

        with admin_gateway.client(secret) as api:
            wait_terminal(api, create(api).json()["id"])
            listed = admin.get("/tokens").json()["results"]
            assert [t["name"] for t in listed] == ["ci"]
            assert secret not in admin.get("/tokens").text
            assert "token_hash" not in listed[0]

            usage = admin.get("/usage", params={"group_by": ["token", "model"]}).json()
            assert usage["rows"] == [{"token": "ci", "model": "black-forest-labs/flux-schnell",
                                      "predictions": 1, "cost_usd": "0.006000"}]
            csv_text = admin.get("/usage", params={"format": "csv"}).text
            assert csv_text.splitlines() == ["predictions,cost_usd", "1,0.006000"]
            assert_problem(admin.get("/usage", params={"group_by": "colour"}), 400)
            assert_problem(admin.get("/usage", params={"since": "not-a-date"}), 422)

            assert admin.post("/tokens/ci/revoke").json()["revoked_at"]
            assert_problem(api.get("/account"), 401)
        assert_problem(admin.post("/tokens/nobody/revoke"), 404)


def test_update_search_delete_and_list_predictions(admin_gateway: Gateway, relay: FakeRelay) -> None:
    with _admin(admin_gateway) as admin:
        secret = admin.post("/tokens", json={"name": "ops_1"}).json()["token"]
        admin.post("/tokens", json={"name": "ops-2"})
        admin.post("/tokens", json={"name": "unused"})
        changed = admin.patch("/tokens/ops_1", json={"budget_usd": "0.02", "rpm_limit": 10,
                                                     "budget_period": "month", "max_in_flight": 3})
        assert changed.status_code == 200, changed.text
        assert changed.json()["budget_usd"] == "0.020000"
        assert changed.json()["budget_period"] == "month"
        assert changed.json()["rpm_limit"] == 10
        cleared = admin.patch("/tokens/ops_1", json={"rpm_limit": None}).json()
        assert cleared["rpm_limit"] is None
        assert cleared["max_in_flight"] == 3
        assert_problem(admin.patch("/tokens/ops_1", json={"rpm_limit": 0}), 422)

        # "_" and "%" are literal in a search, never wildcards.
        assert [t["name"] for t in admin.get("/tokens", params={"search": "ops_"}).json()["results"]] == ["ops_1"]
        assert admin.get("/tokens", params={"search": "%"}).json()["results"] == []

        with admin_gateway.client(secret) as api:
            done = wait_terminal(api, create(api, "budget/model").json()["id"])
            failed = wait_terminal(api, create(api, "budget/model", fail=True).json()["id"])
            # The failure was released, so the budget still holds one more prediction.
            last = wait_terminal(api, create(api, "budget/model").json()["id"])
            assert_problem(create(api, "budget/model"), 402)
        assert admin.get("/tokens/ops_1").json()["spent_usd"] == "0.020000"

        listed = admin.get("/predictions", params={"token": "ops_1"}).json()
        assert [p["id"] for p in listed["results"]] == [last["id"], failed["id"], done["id"]]
        assert [p["cost_usd"] for p in listed["results"]] == ["0.010000", "0.000000", "0.010000"]
        assert listed["results"][2]["token"] == "ops_1"
        only_failed = admin.get("/predictions", params={"status": "failed"}).json()["results"]
        assert [p["id"] for p in only_failed] == [failed["id"]]
        assert admin.get("/predictions", params={"model": "other/model"}).json()["results"] == []
        assert_problem(admin.get("/predictions", params={"status": "weird"}), 400)
        assert_problem(admin.get("/predictions", params={"token": "nobody"}), 404)

        assert_problem(admin.delete("/tokens/ops_1"), 409)
        assert admin.delete("/tokens/unused").status_code == 204
        assert_problem(admin.get("/tokens/unused"), 404)


def test_admin_prediction_pages(admin_gateway: Gateway) -> None:
    secret = create_token(admin_gateway.db_url, "many")
    with admin_gateway.client(secret) as api:
        for i in range(102):
            create(api, i=i)
    with _admin(admin_gateway) as admin:
        first = admin.get("/predictions").json()
        assert len(first["results"]) == 100
        second = httpx.get(first["next"], headers=admin.headers).json()
        assert len(second["results"]) == 2
        assert second["next"] is None
        assert not {p["id"] for p in first["results"]} & {p["id"] for p in second["results"]}


BEYOND_AN_INTEGER_COLUMN = 2**31  # PostgreSQL's INTEGER holds less; SQLite's more, short of 10**40


@pytest.mark.parametrize("number", [BEYOND_AN_INTEGER_COLUMN, 10**40])
def test_numbers_no_column_can_hold_are_422(admin_gateway: Gateway, number: int) -> None:
    create_token(admin_gateway.db_url, "held")
    with _admin(admin_gateway) as admin:
        assert_problem(admin.get("/webhooks/deliveries", params={"before": number}), 422)
        for limit in ("rpm_limit", "max_in_flight"):
            assert_problem(admin.post("/tokens", json={"name": f"new-{limit}", limit: number}), 422)
            assert_problem(admin.patch("/tokens/held", json={limit: number}), 422)


@pytest.mark.parametrize("budget", [1e308, "1e20", "9223372036855"])
def test_a_budget_past_what_the_ledger_counts_in_micros_is_422(admin_gateway: Gateway, budget: Any) -> None:
    create_token(admin_gateway.db_url, "held")
    with _admin(admin_gateway) as admin:
        assert_problem(admin.post("/tokens", json={"name": "rich", "budget_usd": budget}), 422)
        assert_problem(admin.patch("/tokens/held", json={"budget_usd": budget}), 422)
        created = admin.post("/tokens", json={"name": "richest", "budget_usd": "1000000000000"})
        assert created.status_code == 201, created.text


def test_a_nul_in_a_name_or_a_search_is_answered_never_a_500(admin_gateway: Gateway) -> None:
    # PostgreSQL cannot compare text with a NUL in it; such a name names nothing.
    create_token(admin_gateway.db_url, "held")
    with _admin(admin_gateway) as admin:
        for response in (admin.get("/tokens/held%00"), admin.post("/tokens/held%00/revoke"),
                         admin.get("/groups/team%00"), admin.get("/tokens", params={"search": "he\x00ld"}),
                         admin.get("/predictions", params={"token": "he\x00ld"})):
            assert response.status_code in (200, 400, 404), (response.request.url, response.text)
            if response.status_code != 200:
                assert_problem(response, response.status_code)
        assert admin.get("/tokens/held").json()["revoked_at"] is None
