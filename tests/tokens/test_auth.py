"""Authentication, expiry, revocation, model globs and isolation between tokens."""

from __future__ import annotations

import hashlib
import time
from datetime import UTC, datetime, timedelta

import httpx
import orjson
import pytest

from app.columns import utcnow
from app.predictions.cursor import Cursor, encode
from tests.conftest import Gateway
from tests.dbtools import create_token, rows
from tests.fakes.relay import FakeRelay
from tests.helpers import assert_problem, cli, create


class TestAuthentication:
    @pytest.mark.parametrize("header", [None, "Bearer", "Bearer gw_not-a-real-token", "Basic abc", "gw_x"])
    def test_missing_or_wrong_token_is_401(self, gateway: Gateway, header: str | None) -> None:
        headers = {"Authorization": header} if header else {}
        with httpx.Client(base_url=gateway.replicate_base + "/v1") as raw:
            response = raw.get("/predictions", headers=headers)
        assert_problem(response, 401)
        assert response.headers["www-authenticate"] == "Bearer"

    @pytest.mark.parametrize("scheme", ["Bearer", "bearer", "Token", "TOKEN"])
    def test_bearer_and_token_schemes_are_accepted(self, gateway: Gateway, token: str, scheme: str) -> None:
        with httpx.Client(base_url=gateway.replicate_base + "/v1") as raw:
            response = raw.get("/account", headers={"Authorization": f"{scheme} {token}"})
        assert response.status_code == 200

    def test_expired_token_is_401(self, gateway: Gateway) -> None:
        secret = create_token(gateway.db_url, "old", expires_at=utcnow() - timedelta(seconds=1))
        with gateway.client(secret) as api:
            assert_problem(api.get("/account"), 401)

    def test_token_is_stored_only_as_a_keyed_hash(self, gateway: Gateway, token: str) -> None:
        (row,) = rows(gateway.db_url, "api_token")
        assert token not in repr(row)
        assert len(row["token_hash"]) == 64
        assert token.startswith("gw_")

    def test_model_globs_limit_what_a_token_runs(self, gateway: Gateway, relay: FakeRelay) -> None:
        secret = create_token(gateway.db_url, "flux-only", model_globs=["black-forest-labs/*"])
        with gateway.client(secret) as api:
            assert create(api).status_code == 201
            assert_problem(create(api, model="stability-ai/sdxl"), 403)
            assert_problem(api.post("/predictions", json={"version": "a" * 64, "input": {}}), 403)
            assert_problem(
                api.post("/predictions", json={"version": f"stability-ai/sdxl:{'a' * 64}", "input": {}}), 403
            )
        assert len(relay.creates()) == 1


class TestIsolation:
    def test_another_tokens_prediction_is_indistinguishable_from_a_missing_one(
        self, gateway: Gateway, api: httpx.Client, relay: FakeRelay
    ) -> None:
        relay.starting_seconds = 30
        theirs = create(api).json()["id"]
        with gateway.client(create_token(gateway.db_url, "team-b")) as other:
            calls_before = len(relay.calls)
            foreign_get = other.get(f"/predictions/{theirs}")
            missing_get = other.get("/predictions/" + "z" * 26)
            assert_problem(foreign_get, 404)
            assert foreign_get.content == missing_get.content
            foreign_cancel = other.post(f"/predictions/{theirs}/cancel")
            missing_cancel = other.post("/predictions/" + "z" * 26 + "/cancel")
            assert foreign_cancel.content == missing_cancel.content == missing_get.content
            assert other.get("/predictions").json()["results"] == []
            assert len(relay.calls) == calls_before

    def test_a_cursor_is_bound_to_the_token_that_listed(self, gateway: Gateway, api: httpx.Client) -> None:
        mine = create(api).json()["id"]
        other_secret = create_token(gateway.db_url, "team-b")
        (key_row,) = rows(gateway.db_url, "instance_key")
        key = hashlib.sha256(key_row["key"].encode()).digest()
        tokens = {r["name"]: r["id"] for r in rows(gateway.db_url, "api_token")}
        (row,) = [r for r in rows(gateway.db_url, "prediction") if r["id"] == mine]
        created_at = row["created_at"]
        if isinstance(created_at, str):  # SQLite hands raw text back to a textual query
            created_at = datetime.fromisoformat(created_at)
        position = Cursor(created_at.replace(tzinfo=UTC) + timedelta(seconds=1), "z", backwards=False)
        own_cursor = encode(position, tokens["team-a"], key)
        assert [p["id"] for p in api.get("/predictions", params={"cursor": own_cursor}).json()["results"]] == [mine]
        with gateway.client(other_secret) as other:
            assert_problem(other.get("/predictions", params={"cursor": own_cursor}), 400)
            assert_problem(other.get("/predictions", params={"cursor": own_cursor[:-2] + "xx"}), 400)


class TestTokenCommands:
    def test_create_list_revoke(self, gateway: Gateway) -> None:
        created = cli(gateway.db_url, "tokens", "create", "ops", "--models", "a/*", "b/c", "--budget", "12.5", "--json")
        assert created.returncode == 0, created.stderr
        issued = orjson.loads(created.stdout)
        assert set(issued) == {"id", "name", "token"}
        listed = cli(gateway.db_url, "tokens", "list", "--json")
        assert issued["token"] not in listed.stdout
        (entry,) = [t for t in orjson.loads(listed.stdout) if t["name"] == "ops"]
        assert entry["models"] == ["a/*", "b/c"]
        assert entry["budget_usd"] == "12.500000"
        with gateway.client(issued["token"]) as api:
            assert api.get("/account").status_code == 200
            assert cli(gateway.db_url, "tokens", "revoke", "ops").returncode == 0
            # Another process revoked it: creates stop at once, reads within the auth cache's second.
            assert_problem(api.post("/models/b/c/predictions",
                                    json={"input": {"prompt": "x"}}), 401)
            deadline = time.monotonic() + gateway.settings.auth_cache_seconds + 1
            while api.get("/account").status_code == 200:
                assert time.monotonic() < deadline, "a revoked token kept working past the auth cache"
                time.sleep(0.05)
            assert_problem(api.get("/account"), 401)

    def test_duplicate_name_fails_cleanly(self, gateway: Gateway) -> None:
        assert cli(gateway.db_url, "tokens", "create", "dup").returncode == 0
        again = cli(gateway.db_url, "tokens", "create", "dup")
        assert again.returncode == 2
        assert "already exists" in again.stderr
        assert "Traceback" not in again.stderr


class TestTokenLimitCommands:
    def test_create_with_limits_then_update_and_clear(self, gateway: Gateway) -> None:
        created = cli(gateway.db_url, "tokens", "create", "lim", "--budget", "5", "--budget-period", "month",
                      "--rpm", "60", "--max-in-flight", "4", "--json")
        assert created.returncode == 0, created.stderr
        updated = cli(gateway.db_url, "tokens", "update", "lim", "--budget", "7.25", "--rpm", "none",
                      "--all-models", "--json")
        assert updated.returncode == 0, updated.stderr
        view = orjson.loads(updated.stdout)
        assert view["budget_usd"] == "7.250000"
        assert view["budget_period"] == "month"
        assert view["rpm_limit"] is None
        assert view["max_in_flight"] == 4
        assert cli(gateway.db_url, "tokens", "update", "nobody", "--rpm", "3").returncode == 2
        bad = cli(gateway.db_url, "tokens", "update", "lim", "--rpm", "0")
        assert bad.returncode == 2
        assert "Traceback" not in bad.stderr
