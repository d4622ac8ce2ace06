"""Self-checks for the fake relay: lifecycle, auth, faults, retention and Prefer: wait."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests.fakes.relay import RELAY_BRAND, FakeRelay

KEY = "sk-relay-canary-7f3a9c1e5b"
NS_STAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z$")


@pytest.fixture(scope="module")
def relay() -> Iterator[FakeRelay]:
    with FakeRelay(KEY) as fake:
        yield fake


@pytest.fixture
def client(relay: FakeRelay) -> Iterator[httpx.Client]:
    relay.reset()
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=relay.upstream_url + "/v1", headers=headers, timeout=10) as c:
        yield c


def create(client: httpx.Client, inp: dict[str, Any], model: str = "acme/flux") -> dict[str, Any]:
    r = client.post(f"/models/{model}/predictions", json={"input": inp})
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def poll(client: httpx.Client, pid: str, timeout: float = 5) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen.append(client.get(f"/predictions/{pid}").json())
        if seen[-1]["status"] in ("succeeded", "failed", "canceled"):
            return seen
        time.sleep(0.05)
    raise AssertionError(f"prediction {pid} never finished: {seen[-1]}")


def test_lifecycle_reaches_succeeded(client: httpx.Client, relay: FakeRelay) -> None:
    created = create(client, {"prompt": "a cat", "num_outputs": 2})
    assert re.fullmatch(r"[a-z0-9]{26}", created["id"])
    assert created["status"] == "starting"
    assert created["version"] == "hidden"
    assert created["message"] == f"{RELAY_BRAND} - Replicate"
    assert relay.creates()[0].prediction_id == created["id"]
    states = poll(client, created["id"])
    assert "processing" in {s["status"] for s in states}
    done = states[-1]
    assert done["status"] == "succeeded"
    assert NS_STAMP.match(done["started_at"])
    assert NS_STAMP.match(done["completed_at"])
    assert len(done["output"]) == 2
    assert all(re.fullmatch(r"https://replicate\.delivery/xezq/\w+/out-\d\.webp", u)
               for u in done["output"])
    assert done["metrics"] == {"predict_time": 2.5, "image_count": 2}


def test_llm_tokens_and_failure(client: httpx.Client, relay: FakeRelay) -> None:
    relay.starting_seconds = relay.processing_seconds = 0
    llm = poll(client, create(client, {"text": "hello big world"}, "llm/echo")["id"])[-1]
    assert llm["output"] == ["hello", "big", "world"]
    assert llm["metrics"] == {"predict_time": 2.5, "input_token_count": 3,
                              "output_token_count": 3}
    failed = poll(client, create(client, {"fail": True})["id"])[-1]
    assert (failed["status"], failed["error"]) == ("failed", "something went wrong")


def test_unauthorised_is_401_and_recorded(client: httpx.Client, relay: FakeRelay) -> None:
    r = client.get("/predictions/x", headers={"Authorization": "Bearer wrong"})
    assert (r.status_code, r.json()) == (401, {"detail": "Invalid token"})
    assert relay.calls[-1].had_key is False


def test_status_fault_then_normal(client: httpx.Client, relay: FakeRelay) -> None:
    relay.fail_next("status", status=500, headers={"Retry-After": "3"})
    r = client.post("/models/acme/flux/predictions", json={"input": {}})
    assert r.status_code == 500
    assert r.headers["retry-after"] == "3"
    assert KEY in r.json()["detail"]
    assert r.headers["set-cookie"] == "relay_session=secret-cookie; Path=/"
    assert create(client, {})["status"] == "starting"
    assert len(relay.calls) == 2
    assert len(relay.creates()) == 1


def test_hang_is_delayed(client: httpx.Client, relay: FakeRelay) -> None:
    relay.fail_next("hang", seconds=0.5)
    t0 = time.monotonic()
    assert client.get("/predictions/nope").status_code == 404
    assert time.monotonic() - t0 >= 0.5


def test_late_answers_what_was_true_when_asked(client: httpx.Client, relay: FakeRelay) -> None:
    pid = create(client, {})["id"]
    relay.fail_next("late", seconds=0.5)
    t0 = time.monotonic()
    with ThreadPoolExecutor(1) as background:
        asked = background.submit(client.get, f"/predictions/{pid}")
        time.sleep(0.2)
        relay.finish(pid)
        late = asked.result(timeout=5)
    assert time.monotonic() - t0 >= 0.5
    assert late.json()["status"] == "starting"
    assert client.get(f"/predictions/{pid}").json()["status"] == "succeeded"


def test_huge_is_large(client: httpx.Client, relay: FakeRelay) -> None:
    relay.fail_next("huge", size=3 * 1024 * 1024)
    r = client.get("/predictions/whatever")
    assert len(r.content) == 3 * 1024 * 1024
    assert r.json()["junk"].startswith("xxx")


def test_reset_is_a_transport_error(client: httpx.Client, relay: FakeRelay) -> None:
    relay.fail_next("reset")
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        client.post("/models/acme/flux/predictions", json={"input": {}})
    assert create(client, {})["status"] == "starting"


def test_other_faults(client: httpx.Client, relay: FakeRelay) -> None:
    relay.fail_next("throttle", path_contains="/cancel")
    relay.fail_next("non_json", method="GET")
    relay.fail_next("redirect")
    r = client.get("/models/acme/flux")
    assert r.headers["content-type"] == "text/html"
    assert RELAY_BRAND in r.text
    assert client.get("/models/acme/flux").status_code == 302
    r = client.post("/predictions/x/cancel")
    assert (r.status_code, r.headers["retry-after"]) == (429, "7")


def test_set_cookie_on_normal_response(client: httpx.Client) -> None:
    r = client.get("/models/acme/flux/versions")
    assert r.headers["set-cookie"] == "relay_session=secret-cookie; Path=/"
    assert r.json()["results"][0]["cog_version"] == "0.9.4"


def test_forget_gives_404(client: httpx.Client, relay: FakeRelay) -> None:
    pid = create(client, {})["id"]
    assert client.get(f"/predictions/{pid}").status_code == 200
    relay.forget(pid)
    assert client.get(f"/predictions/{pid}").json() == {"detail": "Not found"}


def test_prefer_wait_holds_until_terminal(client: httpx.Client, relay: FakeRelay) -> None:
    t0 = time.monotonic()
    r = client.post("/models/acme/flux/predictions", json={"input": {}},
                    headers={"Prefer": "wait"})
    assert r.json()["status"] == "succeeded"
    assert time.monotonic() - t0 >= 0.85
    r = client.post("/models/acme/flux/predictions", json={"input": {}},
                    headers={"Prefer": "wait=0.1"})
    assert r.json()["status"] == "starting"


def test_cancel_and_versions_flag(client: httpx.Client, relay: FakeRelay) -> None:
    pid = create(client, {})["id"]
    canceled = client.post(f"/predictions/{pid}/cancel").json()
    assert canceled["status"] == "canceled"
    assert NS_STAMP.match(canceled["completed_at"])
    assert client.post(f"/predictions/{pid}/cancel").json() == canceled
    relay.versions_supported = False
    assert client.get("/models/acme/flux").status_code == 404


def test_finish_ends_a_run_now_and_leaves_a_final_one_alone(client: httpx.Client, relay: FakeRelay) -> None:
    relay.processing_seconds = 60
    pid = create(client, {})["id"]
    relay.finish(pid)
    done = client.get(f"/predictions/{pid}").json()
    assert (done["status"], done["metrics"]["predict_time"]) == ("succeeded", relay.predict_time)
    canceled = create(client, {})["id"]
    client.post(f"/predictions/{canceled}/cancel")
    relay.finish(canceled)
    assert client.get(f"/predictions/{canceled}").json()["status"] == "canceled"


def test_a_slow_cancel_takes_effect_before_it_is_answered(client: httpx.Client, relay: FakeRelay) -> None:
    relay.processing_seconds, relay.cancel_seconds = 60, 0.5
    pid = create(client, {})["id"]
    with httpx.Client(base_url=relay.upstream_url + "/v1", headers=client.headers, timeout=10) as other:
        started = time.monotonic()
        with ThreadPoolExecutor(1) as pool:
            answer = pool.submit(client.post, f"/predictions/{pid}/cancel")
            while not any(call.path.endswith("/cancel") for call in relay.calls):
                time.sleep(0.01)
            assert other.get(f"/predictions/{pid}").json()["status"] == "canceled"
            assert not answer.done()
            assert answer.result().json()["status"] == "canceled"
    assert time.monotonic() - started >= 0.5
