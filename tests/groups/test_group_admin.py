"""Groups through the admin API: create, read, change and delete, with tokens joining and leaving."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.conftest import Gateway
from tests.dbtools import create_token, rows
from tests.groups.support import add_group, add_token
from tests.helpers import assert_problem


def test_create_read_list_change_and_delete(admin_gateway: Gateway, admin: httpx.Client) -> None:
    created = add_group(admin, "team-eu", upstreams=["default"], models=["black-forest-labs/*"],
                        price_multiplier="1.25")
    assert created["name"] == "team-eu"
    assert created["upstreams"] == ["default"]
    assert created["models"] == ["black-forest-labs/*"]
    assert created["price_multiplier"] == "1.250000"
    assert created["tokens"] == 0
    plain = add_group(admin, "plain", price_multiplier=1.5)
    assert (plain["upstreams"], plain["models"], plain["price_multiplier"]) == (None, None, "1.500000")
    assert add_group(admin, "default-price")["price_multiplier"] == "1.000000"

    assert admin.get("/groups/team-eu").json() == created
    assert admin.get(f"/groups/{created['id']}").json() == created
    assert [g["name"] for g in admin.get("/groups").json()["results"]] == ["default-price", "plain", "team-eu"]
    assert_problem(admin.get("/groups/nobody"), 404)

    changed = admin.patch("/groups/team-eu", json={"price_multiplier": "2", "models": None})
    assert changed.status_code == 200, changed.text
    assert (changed.json()["price_multiplier"], changed.json()["models"]) == ("2.000000", None)
    assert changed.json()["upstreams"] == ["default"], "a key not given is left as it is"
    reset = admin.patch("/groups/team-eu", json={"price_multiplier": None, "upstreams": None}).json()
    assert (reset["price_multiplier"], reset["upstreams"]) == ("1.000000", None)
    renamed = admin.patch(f"/groups/{created['id']}", json={"name": "team-europe"})
    assert renamed.json()["name"] == "team-europe"
    assert_problem(admin.get("/groups/team-eu"), 404)
    assert_problem(admin.patch("/groups/team-europe", json={"name": "plain"}), 400)
    assert_problem(admin.patch("/groups/team-europe", json={"name": None}), 422)
    assert_problem(admin.patch("/groups/nobody", json={"models": None}), 404)

    assert admin.delete("/groups/team-europe").status_code == 204
    assert_problem(admin.get(f"/groups/{created['id']}"), 404)
    assert_problem(admin.delete("/groups/team-europe"), 404)
    assert sorted(g["name"] for g in rows(admin_gateway.db_url, "token_group")) == ["default-price", "plain"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        pytest.param({"upstreams": ["default", "nowhere"]}, "upstreams.1", id="unknown-upstream"),
        pytest.param({"upstreams": []}, "upstreams", id="no-upstreams"),
        pytest.param({"models": []}, "models", id="no-models"),
        pytest.param({"models": [""]}, "models.0", id="empty-glob"),
        pytest.param({"price_multiplier": "0"}, "price_multiplier", id="zero"),
        pytest.param({"price_multiplier": -1}, "price_multiplier", id="negative"),
        pytest.param({"price_multiplier": "100.000001"}, "price_multiplier", id="above-100"),
        pytest.param({"price_multiplier": "1.0000001"}, "price_multiplier", id="finer-than-ppm"),
        pytest.param({"price_multiplier": "lots"}, "price_multiplier", id="not-a-number"),
        pytest.param({"price_multiplier": True}, "price_multiplier", id="boolean"),
        pytest.param({"colour": "red"}, "colour", id="unknown-key"),
    ],
)
def test_invalid_groups_are_422_naming_the_field(admin: httpx.Client, body: dict[str, Any], field: str) -> None:
    refused = assert_problem(admin.post("/groups", json={"name": "g", **body}), 422)
    assert field in [f["field"] for f in refused["invalid_fields"]], refused
    add_group(admin, "existing")
    assert_problem(admin.patch("/groups/existing", json=body), 422)
    assert admin.get("/groups/existing").json()["price_multiplier"] == "1.000000"
    assert [g["name"] for g in admin.get("/groups").json()["results"]] == ["existing"]


def test_bad_names_and_duplicates_are_refused(admin: httpx.Client) -> None:
    assert_problem(admin.post("/groups", json={"name": "bad name!"}), 422)
    assert_problem(admin.post("/groups", json={}), 422)
    add_group(admin, "taken")
    assert "already exists" in assert_problem(admin.post("/groups", json={"name": "taken"}), 400)["detail"]


def test_tokens_join_and_leave_groups_and_a_group_in_use_is_not_deleted(
    admin_gateway: Gateway, admin: httpx.Client
) -> None:
    group = add_group(admin, "ops")
    add_group(admin, "other")
    secret = add_token(admin, "member", group="ops")
    assert admin.get("/tokens/member").json()["group"] == "ops"
    assert admin.get("/groups/ops").json()["tokens"] == 1
    assert_problem(admin.post("/tokens", json={"name": "lost", "group": "nowhere"}), 422)
    assert_problem(admin.get("/tokens/lost"), 404)

    with admin_gateway.client(secret) as api:
        assert api.get("/account").json()["group"] == "ops"
    with admin_gateway.client(create_token(admin_gateway.db_url, "loner")) as api:
        account = api.get("/account").json()
    assert account["group"] is None
    assert "ops" not in repr(account)

    refused = assert_problem(admin.delete("/groups/ops"), 409)
    assert "move them" in refused["detail"]
    assert admin.patch("/tokens/member", json={"group": "other"}).json()["group"] == "other"
    assert admin.patch("/tokens/member", json={"group": group["id"]}).json()["group"] == "ops"
    assert admin.patch("/tokens/member", json={"rpm_limit": 5}).json()["group"] == "ops", "left as it is"
    assert_problem(admin.patch("/tokens/member", json={"group": "nowhere"}), 422)
    assert admin.patch("/tokens/member", json={"group": None}).json()["group"] is None
    with admin_gateway.client(secret) as api:
        assert api.get("/account").json()["group"] is None

    assert [t["group"] for t in admin.get("/tokens").json()["results"]] == [None, None]
    assert admin.delete("/groups/ops").status_code == 204
    assert admin.get("/groups/other").json()["tokens"] == 0
