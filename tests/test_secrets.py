"""No upstream key, host or brand in any response or log line; no secret in the database."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import replicate
from pydantic import ValidationError

from app.config import Settings
from tests.conftest import Gateway
from tests.dbtools import dump_database
from tests.fakes.relay import RELAY_BRAND, FakeRelay
from tests.helpers import create, free_port, wait_terminal


def test_no_secret_or_upstream_identity_leaks_anywhere(
    gateway: Gateway, api: httpx.Client, token: str, relay: FakeRelay, log_lines: list[str]
) -> None:
    responses: list[httpx.Response] = []
    relay.versions_supported = False

    ok = create(api)
    responses += [ok, api.get(f"/predictions/{ok.json()['id']}")]
    wait_terminal(api, ok.json()["id"])
    for kind, params in (("status", {"status": 422}), ("status", {"status": 500}), ("status", {"status": 401}),
                         ("throttle", {}), ("non_json", {}), ("redirect", {}), ("reset", {})):
        relay.fail_next(kind, **params)
        responses.append(create(api, kind=kind))
        responses.append(create(api))  # a healthy answer between faults keeps the circuit closed
    relay.starting_seconds = 30
    pending = create(api)
    relay.fail_next("status", status=500)
    responses += [pending, api.get(f"/predictions/{pending.json()['id']}")]
    relay.fail_next("status", status=503)
    responses.append(api.post(f"/predictions/{pending.json()['id']}/cancel"))
    responses += [api.get("/predictions"), api.get("/account"), api.get("/models/a/b"),
                  api.get("/models/a/b/versions/v1"), api.get(f"/predictions/{ok.json()['id']}")]
    client = replicate.Client(api_token=token, base_url=gateway.replicate_base)
    client.predictions.get(ok.json()["id"])

    upstream_ids = [call.prediction_id for call in relay.creates() if call.prediction_id]
    never_out = [relay.key, f"127.0.0.1:{relay.port}", RELAY_BRAND, "api.replicate.com",
                 "stream.replicate.com", "replicate.com/p/", "relay_session", *upstream_ids]
    for response in responses:
        text = response.text + repr(dict(response.headers))
        for secret in never_out:
            assert secret not in text, (secret, response.request.url, text)

    assert log_lines, "the gateway logged nothing"
    logged = "\n".join(log_lines)
    for secret in (relay.key, f"127.0.0.1:{relay.port}", RELAY_BRAND, token):
        assert secret not in logged, secret

    database = dump_database(gateway.db_url)
    for secret in (relay.key, f"127.0.0.1:{relay.port}", token):
        assert secret not in database, secret


REDIS_PASSWORD = "redis-canary-7e3a"


class TestRedisUrl:
    @pytest.fixture
    def gateway(self, gateway_factory: Any) -> Gateway:
        """A gateway whose Redis URL holds a password; nothing listens there, so it fails."""
        gw: Gateway = gateway_factory(
            redis_url=f"redis://gateway:{REDIS_PASSWORD}@127.0.0.1:{free_port()}/0"
        )
        return gw

    def test_its_password_is_never_shown_logged_or_stored(
        self, gateway: Gateway, api: httpx.Client, relay: FakeRelay, log_lines: list[str]
    ) -> None:
        ok = create(api)
        responses = [ok, api.get(f"/predictions/{ok.json()['id']}")]
        wait_terminal(api, ok.json()["id"])
        relay.fail_next("status", status=500)
        responses += [create(api), api.get("/account"), api.get("/predictions")]
        with httpx.Client(base_url=gateway.url) as anonymous:
            responses += [anonymous.get("/metrics"), anonymous.get("/readyz"), anonymous.get("/healthz")]
        for response in responses:
            assert REDIS_PASSWORD not in response.text + repr(dict(response.headers)), response.request.url
        assert any("limits.redis_failed" in line for line in log_lines), "Redis failed silently"
        assert REDIS_PASSWORD not in "\n".join(log_lines)
        assert REDIS_PASSWORD not in repr(gateway.settings) + gateway.settings.model_dump_json()
        assert REDIS_PASSWORD not in dump_database(gateway.db_url)


def test_a_bad_redis_url_is_refused_without_echoing_it() -> None:
    with pytest.raises(ValidationError, match="redis_url") as refused:
        Settings(_env_file=None, redis_url=f"http://:{REDIS_PASSWORD}@127.0.0.1:6379")  # type: ignore[call-arg]
    assert REDIS_PASSWORD not in str(refused.value)
