"""No upstream key, host or brand in any response or log line; no secret in the database."""

from __future__ import annotations

import time
from typing import Any

import asyncpg
import httpx
import pytest
import replicate
from pydantic import ValidationError
from sqlalchemy import text as sql_text
from sqlalchemy.exc import DBAPIError

from app.config import Settings, UpstreamConfig
from app.db import _as_core_error, make_engine
from tests.conftest import Gateway
from tests.dbtools import create_token, dump_database
from tests.fakes.receiver import Receiver
from tests.fakes.relay import RELAY_BRAND, FakeRelay
from tests.helpers import create, free_port, wait_terminal

MODEL = "black-forest-labs/flux-schnell"


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


@pytest.fixture
def branded(gateway_factory: Any, relay: FakeRelay) -> Gateway:
    """A gateway told the relay's brand, allowed to deliver webhooks to 127.0.0.1."""
    upstream = UpstreamConfig(name="default", url=relay.upstream_url, token=relay.key, brand_names=[RELAY_BRAND])
    gw: Gateway = gateway_factory(upstreams=[upstream], allow_private_webhooks=True, allow_http_webhooks=True, webhook_interval=0.1)
    return gw


def assert_nothing_of_the_relay(relay: FakeRelay, text: str, *also: str) -> None:
    lowered = text.lower()
    for secret in (relay.key, f"127.0.0.1:{relay.port}", RELAY_BRAND, "api.replicate.com", *also):
        assert secret.lower() not in lowered, (secret, text)


class TestModelReads:
    def test_a_model_has_replicates_fields_only(self, branded: Gateway, relay: FakeRelay) -> None:
        with branded.client(create_token(branded.db_url, "reader")) as api:
            response = api.get(f"/models/{MODEL}")
        model = response.json()
        assert response.status_code == 200
        assert set(model) <= {"url", "owner", "name", "description", "visibility", "github_url", "paper_url",
                              "license_url", "run_count", "cover_image_url", "default_example", "latest_version"}
        assert model["default_example"] is None  # the relay's own prediction, not one of ours
        assert model["description"] == f"{MODEL} served by [upstream]"
        assert_nothing_of_the_relay(relay, response.text)

    def test_versions_have_replicates_fields_only(self, branded: Gateway, relay: FakeRelay) -> None:
        with branded.client(create_token(branded.db_url, "reader")) as api:
            first = api.get(f"/models/{MODEL}/versions")
            second = api.get(first.json()["next"])
            version_id = first.json()["results"][0]["id"]
            single = api.get(f"/models/{MODEL}/versions/{version_id}")
        for page in (first, second):
            assert set(page.json()) == {"next", "previous", "results"}
            for version in page.json()["results"]:
                assert set(version) == {"id", "created_at", "cog_version", "openapi_schema"}
        assert set(single.json()) == {"id", "created_at", "cog_version", "openapi_schema"}
        assert single.json()["openapi_schema"]["components"]["schemas"]["Output"]["items"]["format"] == "uri"
        for response in (first, second, single):
            assert response.status_code == 200
            assert_nothing_of_the_relay(relay, response.text)


def test_errors_and_logs_never_name_the_relay_or_its_ids(branded: Gateway, relay: FakeRelay) -> None:
    relay.names_itself = True
    receiver = Receiver().start()
    try:
        with branded.client(create_token(branded.db_url, "chatty")) as api:
            created = [api.post(f"/models/{MODEL}/predictions", json={
                "input": {"prompt": "p", "fail": fail}, "webhook": receiver.url(),
                "webhook_events_filter": ["logs", "completed"]}).json() for fail in (False, True)]
            finals = [wait_terminal(api, c["id"]) for c in created]
            listed = api.get("/predictions")
            deadline = time.monotonic() + 15
            while sum(hook.json()["status"] in ("succeeded", "failed") for hook in receiver.requests) < 2:
                assert time.monotonic() < deadline, receiver.requests
                time.sleep(0.05)
            hooks = receiver.requests
    finally:
        receiver.stop()
    upstream_ids = [call.prediction_id or "" for call in relay.creates()]
    assert all(u in relay.predictions[u]["logs"] for u in upstream_ids)  # the relay did name them
    ok, failed = finals
    assert failed["status"] == "failed"
    assert failed["error"] == f"[upstream] ([upstream]): prediction {failed['id']} failed"
    assert f"[upstream] worker on [upstream] ran {ok['id']} for [upstream]/v1/predictions/{ok['id']}" in ok["logs"]
    assert "\nstep 1/3\n" in ok["logs"]
    texts = [repr(finals), listed.text, *(hook.body.decode() for hook in hooks)]
    for text in texts:
        assert_nothing_of_the_relay(relay, text, relay.upstream_url, *upstream_ids)
    assert_nothing_of_the_relay(relay, dump_database(branded.db_url), relay.upstream_url)


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


# What a failing statement may be given: a webhook URL with a key in its query, a caller's input.
STATEMENT_VALUE = "https://hooks.example/in?auth=value-canary-5c1e"


async def test_a_database_error_never_carries_its_statements_values(db_url: str) -> None:
    # An unexpected error is logged with its traceback, and the driver's error text is in it.
    engine = make_engine(db_url)
    try:
        async with engine.connect() as connection:
            with pytest.raises(DBAPIError) as failed:
                await connection.execute(sql_text("SELECT * FROM no_such_table WHERE x = :value"),
                                         {"value": STATEMENT_VALUE})
    finally:
        await engine.dispose()
    assert "no_such_table" in str(failed.value)
    assert STATEMENT_VALUE not in str(failed.value)


def test_a_direct_statements_error_never_carries_its_values() -> None:
    # The hot statements run on asyncpg itself; their errors are raised as Core's would be.
    engine = make_engine("postgresql://nobody@127.0.0.1:1/none")
    translated = _as_core_error(engine.sync_engine.dialect, "SELECT $1 FROM no_such_table", [STATEMENT_VALUE],
                                asyncpg.exceptions.UndefinedTableError('relation "no_such_table" does not exist'))
    assert isinstance(translated, DBAPIError)
    assert "no_such_table" in str(translated)
    assert STATEMENT_VALUE not in str(translated)
