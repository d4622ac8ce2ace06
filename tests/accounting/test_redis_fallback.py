"""When Redis cannot answer, creates still work and the database enforces the limits."""

from __future__ import annotations

import json
import socket
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import Gateway
from tests.dbtools import create_token, rows
from tests.fakes.relay import FakeRelay
from tests.helpers import (
    assert_problem,
    burst,
    create,
    free_port,
    same_minute,
    wait_terminal,
)

PASSWORD = "redis-canary-4f1d"


@pytest.fixture
def gateway(gateway_factory: Any) -> Gateway:
    """A gateway told to keep its limits in a Redis that is not there (a closed port)."""
    gw: Gateway = gateway_factory(redis_url=f"redis://:{PASSWORD}@127.0.0.1:{free_port()}/0")
    return gw




def metrics_text(gateway: Gateway) -> str:
    with httpx.Client(base_url=gateway.url) as anonymous:
        return anonymous.get("/metrics").text


def redis_errors(text: str, operation: str) -> float:
    (line,) = [ln for ln in text.splitlines()
               if ln.startswith(f'gateway_redis_errors_total{{operation="{operation}"}}')]
    return float(line.split()[-1])


def test_an_unreachable_redis_leaves_the_limits_to_the_database(
    gateway: Gateway, relay: FakeRelay, log_lines: list[str]
) -> None:
    limited = create_token(gateway.db_url, "rpm", rpm_limit=3)
    narrow = create_token(gateway.db_url, "narrow", max_in_flight=2)
    same_minute()
    rate = burst(gateway, limited, 8)
    assert Counter(r.status_code for r in rate) == {201: 3, 429: 5}
    throttled = next(r for r in rate if r.status_code == 429)
    assert assert_problem(throttled, 429)["detail"] == "This token may create 3 predictions a minute"
    assert 1 <= int(throttled.headers["retry-after"]) <= 60

    relay.starting_seconds = 30
    running = burst(gateway, narrow, 6)
    assert Counter(r.status_code for r in running) == {201: 2, 429: 4}
    throttled = next(r for r in running if r.status_code == 429)
    assert assert_problem(throttled, 429)["detail"] == "This token may have 2 predictions running at once"
    assert throttled.headers["retry-after"] == "2"
    assert len(relay.creates()) == 5

    with gateway.client(narrow) as api:
        for response in running:
            if response.status_code == 201:
                api.post(f"/predictions/{response.json()['id']}/cancel")
                assert wait_terminal(api, response.json()["id"])["status"] == "canceled"
        assert create(api, "budget/model").status_code == 201

    text = metrics_text(gateway)
    assert redis_errors(text, "admit") == 8 + 6 + 1
    assert redis_errors(text, "release") >= 2  # the two canceled ones at least
    warnings = [json.loads(line) for line in log_lines if "limits.redis_failed" in line]
    assert warnings, "no warning was logged"
    assert {w["level"] for w in warnings} == {"warning"}
    assert {w["fallback"] for w in warnings if w["operation"] == "admit"} == {"database"}
    for secret in (PASSWORD, f":{PASSWORD}@"):
        assert secret not in text
        assert secret not in "\n".join(log_lines)


@pytest.fixture
def hung_redis() -> Iterator[int]:
    """A port that accepts connections and never answers, like a hung Redis."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        yield listener.getsockname()[1]


def test_a_hung_redis_delays_a_create_by_at_most_its_time_out(
    gateway_factory: Any, relay: FakeRelay, hung_redis: int
) -> None:
    gateway: Gateway = gateway_factory(redis_url=f"redis://127.0.0.1:{hung_redis}/0")
    secret = create_token(gateway.db_url, "hung", max_in_flight=1)
    relay.starting_seconds = 30
    with gateway.client(secret) as api:
        started = time.monotonic()
        response = create(api, "budget/model")
        elapsed = time.monotonic() - started
        assert response.status_code == 201
        assert elapsed < 2.5, elapsed
        assert_problem(create(api, "budget/model"), 429)
    (token,) = rows(gateway.db_url, "api_token")
    assert token["in_flight"] == 1


def test_redis_refusing_our_credentials_falls_back_too(
    gateway_factory: Any, relay: FakeRelay, redis_url: str, redis_prefix: str
) -> None:
    # No such user: Redis refuses the connection (its default user takes any password).
    wrong = redis_url.replace("redis://", f"redis://no-such-user:{PASSWORD}@", 1)
    gateway: Gateway = gateway_factory(redis_url=wrong, redis_prefix=redis_prefix)
    secret = create_token(gateway.db_url, "refused", rpm_limit=2)
    same_minute()
    with gateway.client(secret) as api:
        statuses = [create(api, "budget/model").status_code for _ in range(3)]
    assert statuses == [201, 201, 429]
    text = metrics_text(gateway)
    assert redis_errors(text, "admit") == 3
    assert PASSWORD not in text
