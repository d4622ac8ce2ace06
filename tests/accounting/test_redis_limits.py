"""Rate and in-flight limits kept in Redis: taken atomically, shared by processes, given back
when a prediction ends, and pruned when a crash left them behind."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from app.accounting.limits import UNRECORDED_GRACE_SECONDS, SharedLimits, connect, slot_lifetime
from app.columns import utcnow
from app.config import Settings
from app.tokens.models import ApiToken
from tests.conftest import Gateway
from tests.dbtools import create_token, execute, rows, token_row
from tests.fakes.relay import FakeRelay
from tests.helpers import (
    assert_problem,
    burst,
    create,
    release_together,
    same_minute,
    wait_terminal,
    wait_until_all_final,
)
from tests.invariants import check_all
from tests.processes import GatewayProcess


@pytest.fixture
def gateway(gateway_factory: Any, redis_url: str, redis_prefix: str) -> Gateway:
    """A gateway whose rate and in-flight limits are kept in the test Redis."""
    gw: Gateway = gateway_factory(redis_url=redis_url, redis_prefix=redis_prefix)
    return gw


@pytest.fixture
def store(redis_url: str) -> Iterator[redis.Redis]:
    """A plain client of the test Redis, to look at (and tamper with) the limit keys."""
    with redis.Redis.from_url(redis_url, decode_responses=True) as client:
        yield client



def eventually(check: Callable[[], bool], timeout: float = 5) -> None:
    """Wait until `check()` holds; slots are given back just after the final commit."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("the condition never held")
        time.sleep(0.05)


def keys(prefix: str) -> SharedLimits:
    """The gateway's own key names under `prefix`."""
    return SharedLimits(prefix=prefix)


def in_flight(store: redis.Redis, db_url: str, prefix: str, name: str) -> set[str]:
    """The prediction ids holding an in-flight slot of the token `name` in Redis."""
    members = store.zrange(keys(prefix).in_flight_key(token_row(db_url, name)["id"]), 0, -1)
    return set(members)


def rate_count(store: redis.Redis, db_url: str, prefix: str, name: str) -> int:
    """The creates Redis counts for the token `name` in the current minute."""
    key = keys(prefix).rate_key(token_row(db_url, name)["id"], int(time.time() // 60))
    return int(store.get(key) or 0)


def redis_errors(gateway: Gateway, operation: str) -> float:
    """The gateway's count of failed Redis calls of one operation, from /metrics."""
    with httpx.Client(base_url=gateway.url) as anonymous:
        text = anonymous.get("/metrics").text
    (line,) = [ln for ln in text.splitlines()
               if ln.startswith(f'gateway_redis_errors_total{{operation="{operation}"}}')]
    return float(line.split()[-1])



class TestRateLimit:
    def test_a_burst_is_counted_in_redis_and_refused_past_the_limit(
        self, gateway: Gateway, relay: FakeRelay, store: redis.Redis, redis_prefix: str
    ) -> None:
        secret = create_token(gateway.db_url, "rpm", rpm_limit=3)
        same_minute()
        responses = burst(gateway, secret, 8)
        assert Counter(r.status_code for r in responses) == {201: 3, 429: 5}
        throttled = next(r for r in responses if r.status_code == 429)
        assert assert_problem(throttled, 429)["detail"] == "This token may create 3 predictions a minute"
        assert 1 <= int(throttled.headers["retry-after"]) <= 60
        assert len(relay.creates()) == 3
        assert rate_count(store, gateway.db_url, redis_prefix, "rpm") == 3
        # The database's counters still move: they are reported, and they are the fallback.
        assert token_row(gateway.db_url, "rpm")["rate_count"] == 3
        assert redis_errors(gateway, "admit") == 0

    def test_redis_alone_decides_the_rate_limit(
        self, gateway: Gateway, relay: FakeRelay, store: redis.Redis, redis_prefix: str
    ) -> None:
        secret = create_token(gateway.db_url, "shared", rpm_limit=2)
        same_minute()
        minute = int(time.time() // 60)
        key = keys(redis_prefix).rate_key(token_row(gateway.db_url, "shared")["id"], minute)
        with gateway.client(secret) as api:
            # Creates other processes counted this minute refuse this one; the database saw none.
            store.set(key, 2, ex=120)
            assert_problem(create(api, "budget/model"), 429)
            assert token_row(gateway.db_url, "shared")["rate_count"] == 0
            assert relay.creates() == []
            # The database's counter at the limit does not refuse while Redis has room.
            store.set(key, 1, ex=120)
            execute(gateway.db_url, f"UPDATE api_token SET rate_count = 2, rate_window = {minute} "  # noqa: S608
                                    "WHERE name = 'shared'")
            assert create(api, "budget/model").status_code == 201
        assert int(store.get(key) or 0) == 2
        assert token_row(gateway.db_url, "shared")["rate_count"] == 3

    def test_a_budget_refusal_gives_the_redis_slots_back(
        self, gateway: Gateway, relay: FakeRelay, store: redis.Redis, redis_prefix: str
    ) -> None:
        secret = create_token(gateway.db_url, "budget", budget_micros=10_000, rpm_limit=10, max_in_flight=5)
        relay.starting_seconds = 30
        same_minute()
        with gateway.client(secret) as api:
            first = create(api, "budget/model")
            assert first.status_code == 201
            for _ in range(3):
                assert_problem(create(api, "budget/model"), 402)
        assert rate_count(store, gateway.db_url, redis_prefix, "budget") == 1
        assert in_flight(store, gateway.db_url, redis_prefix, "budget") == {first.json()["id"]}


class TestInFlight:
    def test_a_burst_never_exceeds_max_in_flight(
        self, gateway: Gateway, relay: FakeRelay, store: redis.Redis, redis_prefix: str
    ) -> None:
        secret = create_token(gateway.db_url, "narrow", max_in_flight=3)
        relay.starting_seconds = 30
        responses = burst(gateway, secret, 12)
        assert Counter(r.status_code for r in responses) == {201: 3, 429: 9}
        throttled = next(r for r in responses if r.status_code == 429)
        assert assert_problem(throttled, 429)["detail"] == "This token may have 3 predictions running at once"
        assert throttled.headers["retry-after"] == "2"
        assert len(relay.creates()) == 3
        admitted = {r.json()["id"] for r in responses if r.status_code == 201}
        assert in_flight(store, gateway.db_url, redis_prefix, "narrow") == admitted
        assert token_row(gateway.db_url, "narrow")["in_flight"] == 3
        with gateway.client(secret) as api:
            for prediction_id in admitted:
                assert api.post(f"/predictions/{prediction_id}/cancel").json()["status"] == "canceled"
            assert in_flight(store, gateway.db_url, redis_prefix, "narrow") == set()
            assert create(api, "budget/model").status_code == 201

    @pytest.mark.parametrize("ending", ["succeeded", "failed", "canceled", "refused upstream"])
    def test_the_slot_comes_back_when_the_prediction_ends(
        self, gateway: Gateway, relay: FakeRelay, store: redis.Redis, redis_prefix: str, ending: str
    ) -> None:
        secret = create_token(gateway.db_url, "one", max_in_flight=1)

        def held() -> set[str]:
            return in_flight(store, gateway.db_url, redis_prefix, "one")

        with gateway.client(secret) as api:
            if ending == "refused upstream":
                relay.fail_next("status", status=422)
                assert_problem(create(api, "budget/model"), 422)
            else:
                if ending == "canceled":
                    relay.starting_seconds = 30
                inputs = {"fail": True} if ending == "failed" else {}
                prediction_id = create(api, "budget/model", **inputs).json()["id"]
                assert held() == {prediction_id}
                assert_problem(create(api, "budget/model"), 429)
                if ending == "canceled":
                    api.post(f"/predictions/{prediction_id}/cancel")
                assert wait_terminal(api, prediction_id)["status"] == ending
            eventually(lambda: held() == set())
            assert token_row(gateway.db_url, "one")["in_flight"] == 0
            assert create(api, "budget/model").status_code == 201

    def test_a_create_in_doubt_holds_its_slot_until_the_reconciler_ends_it(
        self, gateway_factory: Any, redis_url: str, redis_prefix: str, relay: FakeRelay, store: redis.Redis
    ) -> None:
        gateway: Gateway = gateway_factory(redis_url=redis_url, redis_prefix=redis_prefix, reconcile_interval=0.1,
                                           connect_timeout=0.5, create_timeout=0.5)
        secret = create_token(gateway.db_url, "doubt", max_in_flight=1)
        with gateway.client(secret) as api:
            relay.fail_next("hang", seconds=2)
            assert_problem(create(api, "budget/model"), 504)
            (row,) = rows(gateway.db_url, "prediction")
            assert in_flight(store, gateway.db_url, redis_prefix, "doubt") == {row["id"]}
            assert_problem(create(api, "budget/model"), 429)
            wait_until_all_final(gateway.db_url, 15)
            eventually(lambda: in_flight(store, gateway.db_url, redis_prefix, "doubt") == set())
            assert create(api, "budget/model").status_code == 201

    def test_a_slot_a_crash_left_behind_is_pruned(
        self, gateway: Gateway, store: redis.Redis, redis_prefix: str
    ) -> None:
        secret = create_token(gateway.db_url, "crashed", max_in_flight=1)
        key = keys(redis_prefix).in_flight_key(token_row(gateway.db_url, "crashed")["id"])
        with gateway.client(secret) as api:
            store.zadd(key, {"left-by-a-crash": time.time() - 10})
            assert_problem(create(api, "budget/model"), 429)  # a recent entry still counts
            store.zadd(key, {"left-by-a-crash": time.time() - slot_lifetime(gateway.settings) - 1})
            admitted = create(api, "budget/model")
            assert admitted.status_code == 201
        assert in_flight(store, gateway.db_url, redis_prefix, "crashed") == {admitted.json()["id"]}

    def test_at_the_limit_entries_the_database_calls_finished_or_never_recorded_are_dropped(
        self, gateway: Gateway, relay: FakeRelay, store: redis.Redis, redis_prefix: str
    ) -> None:
        relay.starting_seconds = 60
        secret = create_token(gateway.db_url, "leaky", max_in_flight=1)
        key = keys(redis_prefix).in_flight_key(token_row(gateway.db_url, "leaky")["id"])
        with gateway.client(secret) as api:
            # Unknown to the database but young: a create between its admission and its row.
            store.zadd(key, {"being-recorded": time.time() - 10})
            assert_problem(create(api, "budget/model"), 429)
            # Older than an admission takes to reach the database: it never got a row.
            store.zadd(key, {"being-recorded": time.time() - UNRECORDED_GRACE_SECONDS - 5})
            running = create(api, "budget/model").json()["id"]
            assert in_flight(store, gateway.db_url, redis_prefix, "leaky") == {running}
            # However old its entry, a prediction the database holds as running keeps its slot.
            store.zadd(key, {running: time.time() - UNRECORDED_GRACE_SECONDS * 10})
            assert_problem(create(api, "budget/model"), 429)
            # Final, but its slot never given back (a crash between the settlement and the release).
            assert api.post(f"/predictions/{running}/cancel").json()["status"] == "canceled"
            eventually(lambda: in_flight(store, gateway.db_url, redis_prefix, "leaky") == set())
            store.zadd(key, {running: time.time()})
            admitted = create(api, "budget/model")
            assert admitted.status_code == 201
        assert in_flight(store, gateway.db_url, redis_prefix, "leaky") == {admitted.json()["id"]}


async def test_undo_and_release_give_back_once(redis_url: str, redis_prefix: str) -> None:
    settings = Settings(_env_file=None, redis_url=redis_url, redis_prefix=redis_prefix)  # type: ignore[call-arg]
    client = connect(settings)
    assert client is not None
    limits = SharedLimits.from_settings(settings, client)
    token = ApiToken(id="tok_undo", rpm_limit=5, max_in_flight=5)
    now = utcnow()
    try:
        first = await limits.take(token=token, prediction_id="p1", now=now)
        second = await limits.take(token=token, prediction_id="p2", now=now)
        assert first is not None
        assert second is not None
        await limits.undo(first)
        await limits.undo(first)
        rate_key = limits.rate_key("tok_undo", int(now.timestamp() // 60))
        assert int(await client.get(rate_key) or 0) == 1
        assert await client.zrange(limits.in_flight_key("tok_undo"), 0, -1) == [b"p2"]
        await limits.release("tok_undo", "p2")
        await limits.release("tok_undo", "p2")
        # A finished create still counts in its minute; only its in-flight slot comes back.
        assert int(await client.get(rate_key) or 0) == 1
        assert await client.zcard(limits.in_flight_key("tok_undo")) == 0
    finally:
        await client.aclose()


@pytest.fixture
def pair(
    db_url: str, relay: FakeRelay, tmp_path: Path, redis_url: str, redis_prefix: str
) -> Iterator[tuple[GatewayProcess, GatewayProcess]]:
    gateways = [
        GatewayProcess(db_url=db_url, upstream_url=relay.upstream_url, upstream_token=relay.key,
                       workdir=tmp_path, redis_url=redis_url, redis_prefix=redis_prefix).start()
        for _ in range(2)
    ]
    yield gateways[0], gateways[1]
    for gateway in gateways:
        gateway.stop()


def test_rate_and_in_flight_limits_hold_across_two_processes(
    pair: tuple[GatewayProcess, GatewayProcess], db_url: str, relay: FakeRelay, store: redis.Redis,
    redis_prefix: str,
) -> None:
    limited = create_token(db_url, "limited", rpm_limit=4)
    narrow = create_token(db_url, "narrow", max_in_flight=3)

    def spread(secret: str, count: int) -> Counter[int]:
        def one(i: int) -> httpx.Response:
            with httpx.Client(base_url=pair[i % 2].url, headers={"Authorization": f"Bearer {secret}"},
                              timeout=30) as api:
                return api.post("/models/budget/model/predictions", json={"input": {"i": i}})

        return Counter(r.status_code for r in release_together(count, one))

    same_minute(15)
    assert spread(limited, 10) == {201: 4, 429: 6}
    assert rate_count(store, db_url, redis_prefix, "limited") == 4
    relay.starting_seconds = 5
    assert spread(narrow, 12) == {201: 3, 429: 9}
    assert len(in_flight(store, db_url, redis_prefix, "narrow")) == 3
    assert len(relay.creates()) == 7

    wait_until_all_final(db_url, 40)
    for name in ("limited", "narrow"):
        eventually(lambda name=name: in_flight(store, db_url, redis_prefix, name) == set())
        assert token_row(db_url, name)["in_flight"] == 0
    check_all(db_url, relay, settled=True)
