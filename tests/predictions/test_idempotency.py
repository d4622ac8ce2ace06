"""An Idempotency-Key never creates a second upstream prediction."""

from __future__ import annotations

import hashlib
import threading
from collections import Counter

import httpx
import orjson

from tests.conftest import Gateway
from tests.dbtools import rows
from tests.fakes.relay import FakeRelay
from tests.helpers import assert_problem

BODY = {"input": {"prompt": "once"}}
PATH = "/models/black-forest-labs/flux-schnell/predictions"


def test_same_key_and_body_return_the_same_prediction(api: httpx.Client, relay: FakeRelay) -> None:
    first = api.post(PATH, json=BODY, headers={"Idempotency-Key": "k-1"})
    again = api.post(PATH, json=BODY, headers={"Idempotency-Key": "k-1"})
    assert first.status_code == again.status_code == 201
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    assert len(relay.creates()) == 1


def test_same_key_with_another_body_is_422(api: httpx.Client, relay: FakeRelay) -> None:
    api.post(PATH, json=BODY, headers={"Idempotency-Key": "k-2"})
    other = api.post(PATH, json={"input": {"prompt": "twice"}}, headers={"Idempotency-Key": "k-2"})
    assert_problem(other, 422)
    elsewhere = api.post("/models/a/b/predictions", json=BODY, headers={"Idempotency-Key": "k-2"})
    assert_problem(elsewhere, 422)
    assert len(relay.creates()) == 1


def test_keys_belong_to_one_token(gateway: Gateway, api: httpx.Client, relay: FakeRelay) -> None:
    from tests.dbtools import create_token

    mine = api.post(PATH, json=BODY, headers={"Idempotency-Key": "shared"}).json()["id"]
    with gateway.client(create_token(gateway.db_url, "team-b")) as other:
        theirs = other.post(PATH, json=BODY, headers={"Idempotency-Key": "shared"}).json()["id"]
    assert mine != theirs
    assert len(relay.creates()) == 2


def test_concurrent_duplicates_create_once(gateway: Gateway, token: str, relay: FakeRelay) -> None:
    relay.fail_next("hang", seconds=1)
    start = threading.Barrier(10)
    responses: list[httpx.Response] = []

    def one() -> None:
        with gateway.client(token) as api:
            start.wait()
            responses.append(api.post(PATH, json=BODY, headers={"Idempotency-Key": "burst"}))

    threads = [threading.Thread(target=one) for _ in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    statuses = Counter(r.status_code for r in responses)
    assert set(statuses) <= {201, 409}
    assert statuses[201] >= 1
    assert len({r.json()["id"] for r in responses if r.status_code == 201}) == 1
    for conflict in (r for r in responses if r.status_code == 409):
        assert_problem(conflict, 409)
    assert len(relay.creates()) == 1


def test_a_key_whose_create_was_refused_upstream_may_be_retried(api: httpx.Client, relay: FakeRelay) -> None:
    relay.fail_next("throttle", retry_after=1)
    assert_problem(api.post(PATH, json=BODY, headers={"Idempotency-Key": "retry-me"}), 429)
    retried = api.post(PATH, json=BODY, headers={"Idempotency-Key": "retry-me"})
    assert retried.status_code == 201
    assert "idempotent-replayed" not in retried.headers
    assert len(relay.creates()) == 1


def test_malformed_keys_are_422(api: httpx.Client, relay: FakeRelay) -> None:
    for key in ("x" * 256, "has space", "tab\tkey"):
        assert_problem(api.post(PATH, json=BODY, headers={"Idempotency-Key": key}), 422)
    assert relay.creates() == []


def test_same_key_with_another_webhook_is_422(api: httpx.Client, relay: FakeRelay) -> None:
    hooked = {**BODY, "webhook": "https://hooks.example/one", "webhook_events_filter": ["completed"]}
    first = api.post(PATH, json=hooked, headers={"Idempotency-Key": "k-hook"})
    assert first.status_code == 201, first.text
    same = api.post(PATH, json=hooked, headers={"Idempotency-Key": "k-hook"})
    assert same.json()["id"] == first.json()["id"]
    assert same.headers["idempotent-replayed"] == "true"
    # Another receiver, other events, a second receiver, or none: each is another request.
    for changed in ({**hooked, "webhook": "https://hooks.example/two"},
                    {**hooked, "webhook_events_filter": ["start", "completed"]},
                    {**hooked, "webhook_completed": "https://hooks.example/also"},
                    BODY):
        assert_problem(api.post(PATH, json=changed, headers={"Idempotency-Key": "k-hook"}), 422)
    assert len(relay.creates()) == 1


def test_a_key_without_a_webhook_replays_as_it_did_before_webhooks_were_compared(
        gateway: Gateway, api: httpx.Client, relay: FakeRelay) -> None:
    first = api.post(PATH, json=BODY, headers={"Idempotency-Key": "k-plain"})

    (row,) = [r for r in rows(gateway.db_url, "prediction") if r["id"] == first.json()["id"]]
    # The hash a create without webhook fields was given before they were part of it.
    before = hashlib.sha256(orjson.dumps({"path": "v1/models/black-forest-labs/flux-schnell/predictions",
                                          "body": BODY}, option=orjson.OPT_SORT_KEYS)).hexdigest()
    assert row["request_hash"] == before
    assert api.post(PATH, json=BODY, headers={"Idempotency-Key": "k-plain"}).json()["id"] == first.json()["id"]
