"""Streaming and sync mode through both official clients."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import replicate

from tests.conftest import Gateway
from tests.dbtools import rows
from tests.fakes.relay import FakeRelay
from tests.helpers import assert_problem, create, node, wait_terminal


def sse_events(text: str) -> list[tuple[str, str]]:
    """(event, data) pairs of an event stream, with multi-line data joined."""
    parsed = []
    for block in text.split("\n\n"):
        lines = [line for line in block.split("\n") if line and not line.startswith(":")]
        if not lines:
            continue
        event = next(line[7:] for line in lines if line.startswith("event: "))
        assert any(line.startswith("id: ") for line in lines), block
        data = "\n".join(line[6:] for line in lines if line.startswith("data: "))
        parsed.append((event, data))
    return parsed


@pytest.fixture
def client(gateway: Gateway, token: str) -> replicate.Client:
    return replicate.Client(api_token=token, base_url=gateway.replicate_base)


class TestStreaming:
    def test_python_stream_yields_the_full_output(self, client: replicate.Client, relay: FakeRelay) -> None:
        events = list(client.stream("llm/echo", input={"text": "the quick brown fox"}))
        assert [str(e) for e in events if e.event.value == "output"] == ["the", "quick", "brown", "fox"]
        assert events[-1].event.value == "done"
        assert relay.creates()[0].json()["stream"] is True

    def test_npm_stream_yields_the_full_output_without_credentials(
        self, npm_client: Path, gateway: Gateway, token: str
    ) -> None:
        result = node("stream.mjs", gateway, token, "llm/echo", "jumps over the dog")
        assert result["outputs"] == ["jumps", "over", "the", "dog"]
        assert result["events"][-1] == "done"

    def test_npm_run_waits_for_the_output(self, npm_client: Path, gateway: Gateway, token: str) -> None:
        output = node("run.mjs", gateway, token, "black-forest-labs/flux-schnell")
        assert len(output) == 1
        assert output[0].startswith("https://replicate.delivery/")

    def test_a_finished_prediction_replays(self, client: replicate.Client, api: httpx.Client) -> None:
        prediction = client.predictions.create(model="llm/echo", input={"text": "again and again"})
        prediction.wait()
        replayed = [str(e) for e in prediction.stream() if e.event.value == "output"]
        assert replayed == ["again", "and", "again"]
        with httpx.Client() as anonymous:
            text = anonymous.get(prediction.urls["stream"], headers={"Accept": "text/event-stream"}).text
        assert sse_events(text)[-1] == ("done", "{}")

    def test_a_failed_prediction_ends_with_error_then_done(self, api: httpx.Client) -> None:
        prediction = create(api, "llm/echo", text="x", fail=True).json()
        with httpx.Client(timeout=30) as anonymous:
            response = anonymous.get(prediction["urls"]["stream"])
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-store"
        events = sse_events(response.text)
        assert events[-2] == ("error", '{"detail":"something went wrong"}')
        assert events[-1] == ("done", '{"reason":"error"}')

    def test_a_wrong_capability_is_404(self, api: httpx.Client) -> None:
        stream_url = create(api).json()["urls"]["stream"]
        with httpx.Client() as anonymous:
            assert_problem(anonymous.get(stream_url[:-3] + "abc"), 404)
            assert_problem(anonymous.get(stream_url.rsplit("/", 1)[0] + "/nothing"), 404)

    def test_keepalives_while_nothing_happens(self, gateway_factory: Any, relay: FakeRelay) -> None:
        from tests.dbtools import create_token

        gateway: Gateway = gateway_factory(stream_keepalive_interval=0.3, stream_poll_interval=0.1)
        relay.starting_seconds = 1.5
        with gateway.client(create_token(gateway.db_url, "quiet")) as api:
            stream_url = create(api, "llm/echo", text="late").json()["urls"]["stream"]
        with httpx.Client(timeout=30) as anonymous:
            text = anonymous.get(stream_url).text
        assert text.count(": keepalive") >= 2
        assert sse_events(text)[-1] == ("done", "{}")

    def test_a_client_that_disconnects_neither_cancels_nor_unbills(
        self, gateway: Gateway, api: httpx.Client, relay: FakeRelay
    ) -> None:
        relay.processing_seconds = 1.0
        prediction = create(api, "black-forest-labs/flux-schnell").json()
        with httpx.Client(timeout=30) as anonymous, anonymous.stream("GET", prediction["urls"]["stream"]) as response:
            next(response.iter_lines())
        final = wait_terminal(api, prediction["id"])
        assert final["status"] == "succeeded"
        assert not any(call.path.endswith("/cancel") for call in relay.calls)
        (row,) = rows(gateway.db_url, "prediction")
        assert row["cost_micros"] == 6000


class TestSyncMode:
    def test_the_gateway_waits_itself_when_the_upstream_ignores_prefer(
        self, api: httpx.Client, relay: FakeRelay
    ) -> None:
        relay.honour_prefer = False
        started = time.monotonic()
        response = api.post("/models/black-forest-labs/flux-schnell/predictions",
                            json={"input": {"prompt": "x"}}, headers={"Prefer": "wait=10"})
        body = response.json()
        assert body["status"] == "succeeded"
        assert len(body["output"]) == 1
        assert time.monotonic() - started < 5
        assert relay.creates()[0].headers["prefer"] == "wait=9"
        assert "location" not in response.headers  # finished: nothing to poll

    def test_an_unfinished_prediction_is_returned_as_starting_within_the_wait(
        self, api: httpx.Client, relay: FakeRelay
    ) -> None:
        relay.honour_prefer = False
        relay.processing_seconds = 30
        started = time.monotonic()
        response = api.post("/models/a/b/predictions", json={"input": {}}, headers={"Prefer": "wait=2"})
        assert time.monotonic() - started < 2.2
        assert response.json()["status"] == "starting"

    def test_a_create_the_upstream_accepts_late_is_answered_as_starting_within_the_wait(
        self, gateway: Gateway, api: httpx.Client, client: replicate.Client, relay: FakeRelay
    ) -> None:
        # The relay holds the create itself for 3 s: the client must not wait for it.
        relay.fail_next("hang", seconds=3, method="POST")
        started = time.monotonic()
        response = api.post("/models/a/b/predictions", json={"input": {}}, headers={"Prefer": "wait=1"})
        assert time.monotonic() - started < 1.2
        assert response.status_code == 201, response.text
        body = response.json()
        assert body["status"] == "starting"
        assert relay.creates() == [], "answered before the upstream was"
        assert wait_terminal(api, body["id"])["status"] == "succeeded"
        (row,) = rows(gateway.db_url, "prediction")
        assert (row["submission"], row["upstream_id"]) == ("accepted", relay.creates()[0].prediction_id)
        relay.fail_next("hang", seconds=3, method="POST")
        assert len(client.run("black-forest-labs/flux-schnell", input={"prompt": "late"}, wait=1)) == 1
        assert len(relay.creates()) == 2

    @pytest.mark.parametrize("honour", [True, False])
    def test_run_returns_the_output_whether_or_not_it_finishes_within_the_wait(
        self, client: replicate.Client, relay: FakeRelay, honour: bool
    ) -> None:
        relay.honour_prefer = honour
        quick = client.run("black-forest-labs/flux-schnell", input={"prompt": "quick"}, wait=5)
        assert len(quick) == 1
        relay.processing_seconds = 2.5
        slow = client.run("black-forest-labs/flux-schnell", input={"prompt": "slow"}, wait=1)
        assert len(slow) == 1
