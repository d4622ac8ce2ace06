"""The admin API: absent without GATEWAY_ADMIN_TOKEN, tokens and usage with it."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.conftest import Gateway
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
