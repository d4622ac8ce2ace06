"""The read path: a poll writes only what changed, and final predictions stay private when cached."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import httpx
import pytest

from app.jobs import reconciler
from app.predictions import rewrite
from tests.conftest import Gateway
from tests.dbtools import create_token, rows, standalone_recorder
from tests.fakes.relay import FakeRelay
from tests.helpers import assert_problem, create, release_together, wait_terminal


def _ledger_row(gateway: Gateway, prediction_id: str) -> dict[str, object]:
    (row,) = [r for r in rows(gateway.db_url, "prediction") if r["id"] == prediction_id]
    return row


def test_an_unchanged_answer_is_not_written_again(gateway_factory: Any, relay: FakeRelay) -> None:
    # The reconciler stays out of the way, so only the GETs could write.
    gateway = gateway_factory(reconcile_interval=3600)
    with gateway.client(create_token(gateway.db_url, "poller")) as api:
        relay.starting_seconds = 0
        relay.processing_seconds = 60  # "processing", logs "step 1/3" for 20 s
        created = create(api)
        assert created.status_code == 201, created.text
        prediction_id = created.json()["id"]

        first = api.get(f"/predictions/{prediction_id}").json()
        assert first["status"] == "processing"
        written = _ledger_row(gateway, prediction_id)
        assert written["status"] == "processing"
        for _ in range(3):
            again = api.get(f"/predictions/{prediction_id}").json()
            assert again == first
        assert _ledger_row(gateway, prediction_id)["updated_at"] == written["updated_at"]
        polls = [c for c in relay.calls if c.method == "GET" and "/predictions/" in c.path]
        assert len(polls) >= 4  # every GET still asked the upstream


def test_a_changed_answer_is_written(gateway: Gateway, api: httpx.Client, relay: FakeRelay) -> None:
    relay.starting_seconds = 0
    relay.processing_seconds = 0.6  # logs grow step by step, then it succeeds
    created = create(api)
    prediction_id = created.json()["id"]
    seen_logs = set()
    for _ in range(100):
        body = api.get(f"/predictions/{prediction_id}").json()
        seen_logs.add(body["logs"])
        assert _ledger_row(gateway, prediction_id)["logs"] == body["logs"]
        if body["status"] == "succeeded":
            break
    assert body["status"] == "succeeded"
    assert len(seen_logs) >= 2


def test_a_cached_final_prediction_is_still_only_its_owners(gateway: Gateway, api: httpx.Client) -> None:
    prediction_id = create(api).json()["id"]
    final = wait_terminal(api, prediction_id)
    assert final["status"] == "succeeded"
    for _ in range(3):  # served from the cache now: the same answer, the same privacy
        assert api.get(f"/predictions/{prediction_id}").json() == final
    with gateway.client(create_token(gateway.db_url, "someone-else")) as other:
        theirs = assert_problem(other.get(f"/predictions/{prediction_id}"), 404)
        unknown = assert_problem(other.get("/predictions/" + "z" * 26), 404)
    assert theirs == unknown


def _running(gateway: Gateway, api: httpx.Client, relay: FakeRelay) -> str:
    relay.starting_seconds = 0
    relay.processing_seconds = 600
    created = create(api)
    assert created.status_code == 201, created.text
    prediction_id: str = created.json()["id"]
    assert api.get(f"/predictions/{prediction_id}").json()["status"] == "processing"
    return prediction_id


def test_a_running_prediction_is_asked_of_the_upstream_every_time_and_read_from_the_ledger_once(
        gateway_factory: Any, relay: FakeRelay) -> None:
    gateway = gateway_factory(reconcile_interval=3600, running_cache_seconds=60)
    service = gateway.server.server.config.app.state.gateway.predictions
    reads: list[str] = []
    read = service._hot_reads.get

    async def counted(entity: Any, ident: Any) -> Any:
        reads.append(ident)
        return await read(entity, ident)

    service._hot_reads.get = counted
    with gateway.client(create_token(gateway.db_url, "poller")) as api:
        prediction_id = _running(gateway, api, relay)
        polls_before = len([c for c in relay.calls if c.method == "GET"])
        for _ in range(4):
            assert api.get(f"/predictions/{prediction_id}").json()["status"] == "processing"
        with gateway.client(create_token(gateway.db_url, "someone-else")) as other:
            assert_problem(other.get(f"/predictions/{prediction_id}"), 404)  # still only its owner's
    assert len([c for c in relay.calls if c.method == "GET"]) == polls_before + 4
    assert reads.count(prediction_id) == 1


async def _force_finish_elsewhere(gateway: Gateway, prediction_id: str) -> bool:
    """What another gateway process on the same database does when it gives up on a prediction."""
    async with standalone_recorder(gateway.db_url, gateway.settings) as (recorder, _):
        return await recorder.force_finish(prediction_id, status="aborted", reason="gave up elsewhere")


def test_what_another_process_wrote_shows_once_the_row_is_read_again(
        gateway_factory: Any, relay: FakeRelay) -> None:
    gateway = gateway_factory(reconcile_interval=3600, running_cache_seconds=0.2)
    with gateway.client(create_token(gateway.db_url, "poller")) as api:
        prediction_id = _running(gateway, api, relay)
        # Another gateway process force-finishes it; the relay still says "processing".
        assert asyncio.run(_force_finish_elsewhere(gateway, prediction_id))
        time.sleep(0.3)
        assert api.get(f"/predictions/{prediction_id}").json()["status"] == "canceled"


def test_what_this_process_records_replaces_its_cached_row_at_once(
    gateway_factory: Any, relay: FakeRelay, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Three 404s in a row end it, without the minute they must otherwise span.
    monkeypatch.setattr(reconciler, "FORGOTTEN_AFTER", timedelta(0))
    gateway = gateway_factory(reconcile_interval=0.1, poll_backoff_max=0.1, running_cache_seconds=60)
    with gateway.client(create_token(gateway.db_url, "poller")) as api:
        prediction_id = _running(gateway, api, relay)
        # The relay forgets it: GETs keep the last known state until the reconciler, in this
        # process, gives up on the prediction.
        relay.forget(str(_ledger_row(gateway, prediction_id)["upstream_id"]))
        deadline = time.monotonic() + 20
        while (body := api.get(f"/predictions/{prediction_id}").json())["status"] == "processing":
            assert time.monotonic() < deadline, "the forced finish never showed"
            time.sleep(0.1)
    assert body["status"] == "failed"


def test_an_unchanged_running_prediction_is_rendered_once_per_host(
        gateway_factory: Any, relay: FakeRelay, monkeypatch: pytest.MonkeyPatch) -> None:
    gateway = gateway_factory(reconcile_interval=3600, running_cache_seconds=60)
    renders: list[str] = []
    render = rewrite.to_client

    def counted(row: Any, public_base: str, key: bytes, **kwargs: Any) -> dict[str, Any]:
        renders.append(public_base)
        return render(row, public_base, key, **kwargs)

    monkeypatch.setattr(rewrite, "to_client", counted)
    with gateway.client(create_token(gateway.db_url, "poller")) as api:
        prediction_id = _running(gateway, api, relay)  # its first poll rendered the row
        renders.clear()
        answers = [api.get(f"/predictions/{prediction_id}").json() for _ in range(4)]
        assert renders == []
        assert all(answer == answers[0] and answer["status"] == "processing" for answer in answers)
        other = api.get(f"/predictions/{prediction_id}", headers={"Host": "other.example"}).json()
        assert other["urls"]["get"] == f"http://other.example/replicate/v1/predictions/{prediction_id}"
        assert len(renders) == 1
        # Written by this process (a cancel): the next poll renders the new state.
        assert api.post(f"/predictions/{prediction_id}/cancel").status_code == 200
        renders.clear()
        assert api.get(f"/predictions/{prediction_id}").json()["status"] == "canceled"
        assert len(renders) == 1


def _upstream_reads(relay: FakeRelay, upstream_id: str) -> int:
    return sum(1 for call in relay.calls if call.method == "GET" and call.path.endswith(f"/predictions/{upstream_id}"))


def _polls_while_the_upstream_is_slow(gateway: Gateway, token: str, relay: FakeRelay, prediction_id: str,
                                      joining: int) -> list[httpx.Response]:
    """One poll that the upstream answers only after a second, and `joining` more sent while
    it waits; returns every answer, the first one's first."""
    upstream_id = str(_ledger_row(gateway, prediction_id)["upstream_id"])
    before = _upstream_reads(relay, upstream_id)
    relay.fail_next("hang", seconds=1.0, method="GET", path_contains=upstream_id)
    with ThreadPoolExecutor(1) as pool, gateway.client(token) as api:
        waiting = pool.submit(api.get, f"/predictions/{prediction_id}")
        deadline = time.monotonic() + 5
        while _upstream_reads(relay, upstream_id) == before:
            assert time.monotonic() < deadline, "the first poll never reached the upstream"
            time.sleep(0.01)

        def poll(_: int) -> httpx.Response:
            with gateway.client(token) as own:
                return own.get(f"/predictions/{prediction_id}")

        joined = release_together(joining, poll)
        return [waiting.result(), *joined]


def test_polls_of_one_prediction_at_once_share_one_upstream_read(gateway_factory: Any, relay: FakeRelay) -> None:
    gateway = gateway_factory(reconcile_interval=3600)
    token = create_token(gateway.db_url, "poller")
    with gateway.client(token) as api:
        prediction_id = _running(gateway, api, relay)
    upstream_id = str(_ledger_row(gateway, prediction_id)["upstream_id"])
    before = _upstream_reads(relay, upstream_id)
    answers = _polls_while_the_upstream_is_slow(gateway, token, relay, prediction_id, joining=8)
    assert [answer.status_code for answer in answers] == [200] * 9
    assert all(answer.json()["status"] == "processing" for answer in answers)
    # Nine polls, one read: each joined the one in flight instead of asking again.
    assert _upstream_reads(relay, upstream_id) == before + 1
    with gateway.client(token) as api:
        assert api.get(f"/predictions/{prediction_id}").status_code == 200
    assert _upstream_reads(relay, upstream_id) == before + 2  # the next poll reads again


def test_polls_that_joined_a_read_get_what_it_recorded(gateway_factory: Any, relay: FakeRelay) -> None:
    gateway = gateway_factory(reconcile_interval=3600)
    token = create_token(gateway.db_url, "poller")
    with gateway.client(token) as api:
        relay.starting_seconds = 0
        relay.processing_seconds = 0.5  # over by the time the slow read answers
        created = create(api)
        assert created.status_code == 201, created.text
        prediction_id = created.json()["id"]
    answers = _polls_while_the_upstream_is_slow(gateway, token, relay, prediction_id, joining=6)
    assert [answer.json()["status"] for answer in answers] == ["succeeded"] * 7
    assert len({answer.json()["output"][0] for answer in answers}) == 1
    settlements = [r for r in rows(gateway.db_url, "ledger_entry")
                   if r["prediction_id"] == prediction_id and r["kind"] != "reservation"]
    assert len(settlements) == 1


def test_a_row_read_while_this_process_wrote_it_is_not_kept(gateway_factory: Any, relay: FakeRelay) -> None:
    gateway = gateway_factory(reconcile_interval=3600, running_cache_seconds=60)
    service = gateway.server.server.config.app.state.gateway.predictions
    with gateway.client(create_token(gateway.db_url, "poller")) as api:
        prediction_id = _running(gateway, api, relay)
        service._running.forget(prediction_id)
        read = service._hot_reads.get
        raced: list[str] = []

        async def read_then_written(entity: Any, ident: Any) -> Any:
            row = await read(entity, ident)
            if not raced:  # this process ends the prediction while the read's row is on its way
                raced.append(ident)
                assert await service.force_finish(ident, status="aborted", reason="ended meanwhile")
            return row

        service._hot_reads.get = read_then_written
        # The poll that read the row before the write may show it unfinished, once; later polls
        # must not keep showing what that read saw (the relay still says "processing").
        api.get(f"/predictions/{prediction_id}")
        assert raced == [prediction_id]
        assert api.get(f"/predictions/{prediction_id}").json()["status"] == "canceled"
