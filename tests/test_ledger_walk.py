"""A seeded random walk over the prediction lifecycle, checking the ledger and status machine
after every step (P2, P3, P5, P6; invariants I1-I4, I6, I7, I8)."""

from __future__ import annotations

import random
import sqlite3
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from replicate.prediction import Prediction as ClientPrediction

from app.predictions import service as prediction_service
from tests.conftest import Gateway
from tests.dbtools import create_token, rows, token_row
from tests.fakes.receiver import Receiver
from tests.fakes.relay import FakeRelay
from tests.helpers import release_together, wait_until_all_final
from tests.invariants import TERMINAL, check_all, moves_forward

SEEDS = [11, 23, 37, 41, 59, 73]
VERSION = "5c7d5dc6dd8bf75c1acaa8565735e7986bc5b66206b55cca93cb72c9bf15ccaa"
# Only the path of the inbound URL is used: the walk posts the upstream's hints itself.
PUBLIC_URL = "http://127.0.0.1:1/replicate"
BUDGET_MICROS = 120_000
# What a succeeded prediction costs (TEST_PRICES; the relay reports 2.5 s of predict_time).
PRICES = {"budget/model": 10_000, "underestimated/model": 10_000, "billfailures/model": 20_000,
          "black-forest-labs/flux-schnell": 6_000}
RANK = {"starting": 0, "processing": 1}
FINAL = {"succeeded", "failed", "canceled"}
FAULTS: list[tuple[str, dict[str, Any]]] = [
    ("status", {"status": 500}), ("throttle", {"retry_after": 1}), ("reset", {}), ("non_json", {}),
    ("hang", {"seconds": 0.3}), ("hang", {"seconds": 1.0}),
    # Longer than the create time-out: a create it meets is left in doubt for the reconciler.
    ("hang", {"seconds": 2.5}),
]
CREATE_ERRORS = {402, 429, 502, 503, 504}
SETTINGS: dict[str, Any] = {
    "public_url": PUBLIC_URL, "reconcile_interval": 0.2, "poll_backoff_max": 0.5,
    "allow_private_webhooks": True, "allow_http_webhooks": True, "webhook_interval": 0.1,
    "connect_timeout": 1.0, "create_timeout": 2.0, "request_timeout": 2.0,
}


@dataclass
class Known:
    """What the walk knows of one prediction it created."""

    id: str
    model: str
    status: str
    webhook: bool


@dataclass
class KeyUse:
    """An Idempotency-Key the walk sent, with the body and, once created, the prediction."""

    path: str
    body: dict[str, Any]
    # None while the create it was sent with has no known outcome (an error answer: the row may
    # have been released, which frees the key, or be in doubt, which keeps it).
    prediction_id: str | None
    # A create that waited for its end (`Prefer: wait`) and was answered first: it may still be
    # on its way upstream, and a retry meanwhile is told so (409).
    may_be_in_progress: bool = False


@dataclass
class Walk:
    """The gateway under test and the walk's model of what it must show."""

    rng: random.Random
    start_gateway: Callable[[], Gateway]
    gateway: Gateway
    relay: FakeRelay
    receiver: Receiver
    secret: str
    snapshot: Path
    predictions: dict[str, Known] = field(default_factory=dict)
    keys: dict[str, KeyUse] = field(default_factory=dict)
    history: list[str] = field(default_factory=list)
    stored: dict[str, str] = field(default_factory=dict)  # each row's status at the last snapshot
    api: httpx.Client = field(init=False)

    def __post_init__(self) -> None:
        self.api = self.gateway.client(self.secret)

    @property
    def db_url(self) -> str:
        return self.gateway.db_url

    def note(self, line: str) -> None:
        self.history.append(f"{len(self.history):3d} {line}")

    # ---- the model's checks ----

    def seen(self, body: dict[str, Any], where: str, *, waited: bool = False) -> None:
        """I8 and I6: a prediction object the official client accepts, never going backwards.
        `waited`: the answer to a create with `Prefer: wait`, which shows any unfinished
        prediction as `starting`, as Replicate does (its clients poll only after that)."""
        ClientPrediction(**body)
        known = self.predictions.get(body["id"])
        if known is None:
            return
        status = body["status"]
        if known.status in FINAL:
            assert status == known.status, f"{where}: {known.id} was {known.status}, now {status}"
        elif not (waited and status == "starting"):
            assert RANK.get(status, 2) >= RANK[known.status], f"{where}: {known.id} went {known.status} -> {status}"
            known.status = status

    def prediction_answer(self, response: httpx.Response, where: str, *, waited: bool = False) -> dict[str, Any]:
        assert response.status_code in (200, 201), f"{where}: {response.status_code} {response.text}"
        body: dict[str, Any] = response.json()
        self.seen(body, where, waited=waited)
        return body

    def pick(self) -> Known | None:
        return self.rng.choice(list(self.predictions.values())) if self.predictions else None

    def upstream_ids(self) -> dict[str, str]:
        return {p["id"]: p["upstream_id"] for p in rows(self.db_url, "prediction") if p["upstream_id"]}

    def check_snapshot(self) -> None:
        """I1-I3 and I7 on a consistent copy of the database, taken while the gateway runs (on
        SQLite; on PostgreSQL no copy of a database in use can be taken, and tables read one by
        one while the gateway writes do not add up, so there the walk checks them once settled)."""
        if not self.db_url.startswith("sqlite"):
            return
        source = sqlite3.connect(self.db_url.removeprefix("sqlite:///"))
        copy = sqlite3.connect(self.snapshot)
        try:
            source.backup(copy)
        finally:
            source.close()
            copy.close()
        snapshot_url = f"sqlite:///{self.snapshot}"
        check_all(snapshot_url)
        # I6 in the store: a row's status never goes back, and a closed one stays final.
        closed = {e["prediction_id"] for e in rows(snapshot_url, "ledger_entry") if e["kind"] != "reservation"}
        for row in rows(snapshot_url, "prediction"):
            status, earlier = row["status"], self.stored.get(row["id"], "starting")
            assert moves_forward(earlier, status), f"stored {row['id']} went {earlier} -> {status}"
            assert row["id"] not in closed or status in TERMINAL, f"{row['id']} is closed but {status}"
            self.stored[row["id"]] = status
        # Linked rows name predictions the relay made, one each (orphans wait for the end).
        linked = [p["upstream_id"] for p in rows(snapshot_url, "prediction") if p["upstream_id"]]
        created = {call.prediction_id for call in self.relay.creates()}
        assert len(linked) == len(set(linked)), "two rows share an upstream id"
        assert set(linked) <= created, "a row links an upstream prediction the relay never made"
        check_budget(snapshot_url)

    # ---- actions ----

    def create(self) -> None:
        model = self.rng.choice([*PRICES, "version"])
        prompt = f"p{self.rng.randrange(3)}"
        body: dict[str, Any] = {"input": {"prompt": prompt, "fail": self.rng.random() < 0.2}}
        path = f"/models/{model}/predictions"
        if model == "version":
            path, body["version"] = "/predictions", VERSION
        webhook = self.rng.random() < 0.3
        if webhook:
            body["webhook"] = self.receiver.url()
            body["webhook_events_filter"] = self.rng.choice([["completed"], ["start", "completed"]])
        headers = {"Prefer": "wait=1"} if self.rng.random() < 0.2 else {}
        key, reuse = self._idempotency_key()
        if reuse is not None:
            path, body = reuse.path, (reuse.body if self.rng.random() < 0.7 else body)
            webhook = "webhook" in body
        if key is not None:
            headers["Idempotency-Key"] = key
        creates, count = len(self.relay.creates()), len(rows(self.db_url, "prediction"))
        response = self.api.post(path, json=body, headers=headers)
        where = f"create {path} {body} {headers}"
        self.note(f"{where} -> {response.status_code} {response.text[:120]}")
        if reuse is not None and self._replayed(response, reuse, body, where, waited="Prefer" in headers):
            assert len(self.relay.creates()) == creates, f"{where}: an idempotent replay created upstream"
            return
        if response.status_code != 201:
            assert_refused(response, where)
            if response.status_code == 402:
                assert len(self.relay.creates()) == creates, f"{where}: a refused create reached the upstream"
                assert len(rows(self.db_url, "prediction")) == count, f"{where}: a refused create left a row"
            if key is not None:
                self.keys[key] = KeyUse(path, body, None)
            return
        created: dict[str, Any] = response.json()
        assert created["id"] not in self.predictions, f"{where}: a new create answered an old id"
        model = "budget/model" if path == "/predictions" else path.removeprefix("/models/").removesuffix("/predictions")
        self.predictions[created["id"]] = Known(created["id"], model, "starting", webhook)
        self.seen(created, where, waited="Prefer" in headers)
        if key is not None:
            in_progress = "Prefer" in headers and created["status"] == "starting"
            self.keys[key] = KeyUse(path, body, created["id"], in_progress)

    def _idempotency_key(self) -> tuple[str | None, KeyUse | None]:
        """No key, a new one, or one sent before (with its first body, or sometimes another)."""
        roll = self.rng.random()
        if roll < 0.4:
            return None, None
        if roll < 0.7 or not self.keys:
            key = f"walk-{len(self.keys)}"
            return key, None
        key = self.rng.choice(sorted(self.keys))
        return key, self.keys[key]

    def _replayed(self, response: httpx.Response, reuse: KeyUse, body: dict[str, Any], where: str,
                  *, waited: bool) -> bool:
        """Check the answer to a reused key; False when the key was free again (its create
        released), so that the answer is a new create's."""
        if reuse.prediction_id is None:
            # Its key names a create in doubt (a replay, new to the walk), or nothing any more.
            return response.status_code == 422 and body != reuse.body
        if body != reuse.body:
            assert response.status_code == 422, f"{where}: a key reused with another body gave {response.status_code}"
            return True
        if response.status_code == 409 and reuse.may_be_in_progress:
            return True
        replay = self.prediction_answer(response, where, waited=waited)
        assert replay["id"] == reuse.prediction_id, f"{where}: the same key and body answered another prediction"
        return True

    def get(self) -> None:
        known = self.pick()
        if known is None:
            return
        response = self.api.get(f"/predictions/{known.id}")
        self.note(f"get {known.id} -> {response.status_code} {response.json().get('status')}")
        self.prediction_answer(response, f"get {known.id}")

    def list_page(self) -> None:
        response = self.api.get("/predictions")
        self.note(f"list -> {response.status_code}")
        assert response.status_code == 200, response.text
        for body in response.json()["results"]:
            self.seen(body, "list")

    def cancel(self) -> None:
        known = self.pick()
        if known is None:
            return
        before = known.status
        stored = {p["id"]: p for p in rows(self.db_url, "prediction")}[known.id]
        response = self.api.post(f"/predictions/{known.id}/cancel")
        self.note(f"cancel {known.id} ({before}) -> {response.status_code} {response.text[:80]}")
        if before in FINAL:
            body = self.prediction_answer(response, f"cancel {known.id}")
            assert body["status"] == before, f"cancel of final {known.id} answered {body['status']}"
            after = {p["id"]: p for p in rows(self.db_url, "prediction")}[known.id]
            assert {k: after[k] for k in ("status", "cost_micros", "completed_at")} == {
                k: stored[k] for k in ("status", "cost_micros", "completed_at")}, f"cancel changed final {known.id}"
        elif response.status_code >= 400:
            assert response.status_code != 402, f"cancel {known.id}: {response.text}"
            assert_refused(response, f"cancel {known.id}")
        else:
            self.prediction_answer(response, f"cancel {known.id}")

    def finish(self) -> None:
        known = self.pick()
        upstream_id = self.upstream_ids().get(known.id) if known else None
        if known is None or upstream_id is None:
            return
        self.note(f"relay finishes {known.id} ({upstream_id})")
        self.relay.finish(upstream_id)

    def hint(self) -> None:
        known = self.pick()
        upstream_id = self.upstream_ids().get(known.id) if known else None
        if known is None or upstream_id is None:
            return
        response = self._hint(upstream_id)
        self.note(f"hint {known.id} -> {response.status_code}")
        assert response.status_code == 204, response.text

    def _hint(self, upstream_id: str) -> httpx.Response:
        """The upstream's webhook for a prediction: only a hint, which makes the gateway poll."""
        (call,) = [c for c in self.relay.creates() if c.prediction_id == upstream_id]
        hint_path = httpx.URL(call.json()["webhook"]).path
        return httpx.post(self.gateway.url + hint_path, json={"id": upstream_id, "status": "succeeded"}, timeout=10)

    def race(self) -> None:
        """The upstream's end, a cancel, two polls and a hint on one running prediction at once."""
        linked = self.upstream_ids()
        running = [k for k in self.predictions.values() if k.status not in FINAL and k.id in linked]
        if not running:
            return
        known = self.rng.choice(running)
        upstream_id, before = linked[known.id], known.status
        racers: list[Callable[[], Any]] = [
            lambda: self.relay.finish(upstream_id),
            lambda: self.api.post(f"/predictions/{known.id}/cancel"),
            lambda: self.api.get(f"/predictions/{known.id}"),
            lambda: self.api.get(f"/predictions/{known.id}"),
            lambda: self._hint(upstream_id),
        ]
        results = release_together(len(racers), lambda i: racers[i]())
        answers = [r for r in results[1:4] if isinstance(r, httpx.Response) and r.status_code < 300]
        self.note(f"race on {known.id} ({before}) -> {[r.status_code for r in results[1:] if r is not None]} "
                  f"{[r.json()['status'] for r in answers]}")
        finals = set()
        for answer in answers:
            body = answer.json()
            ClientPrediction(**body)
            assert RANK.get(body["status"], 2) >= RANK[before], f"race on {known.id}: {before} -> {body['status']}"
            if body["status"] in FINAL:
                finals.add(body["status"])
        assert len(finals) <= 1, f"race on {known.id}: answered {finals}"
        if finals:
            known.status = finals.pop()

    def late_poll(self) -> None:
        """A poll whose upstream answer, made while the prediction ran, lands after its end was
        recorded: the stale state changes nothing (the status compare-and-set, P5)."""
        linked = self.upstream_ids()
        running = [k for k in self.predictions.values() if k.status not in FINAL and k.id in linked]
        if not running:
            return
        known = self.rng.choice(running)
        upstream_id = linked[known.id]
        self.relay.fail_next("late", method="GET", path_contains=upstream_id, seconds=0.5)
        with ThreadPoolExecutor(1) as background:
            polled = background.submit(self.api.get, f"/predictions/{known.id}")
            time.sleep(0.1)
            self.relay.finish(upstream_id)
            ended = self.api.post(f"/predictions/{known.id}/cancel")
            late = polled.result(timeout=10)
        self.note(f"late poll of {known.id} -> {late.status_code} {late.json().get('status')}, "
                  f"its end -> {ended.status_code} {ended.json().get('status')}")
        # The poll overlaps the end: it may show the prediction as it was before, never earlier.
        polled_body = late.json()
        ClientPrediction(**polled_body)
        assert late.status_code == 200, late.text
        assert RANK.get(polled_body["status"], 2) >= RANK[known.status], f"late poll of {known.id}: {polled_body}"
        self.prediction_answer(ended, f"cancel of {known.id}")
        self.check_snapshot()

    def fault(self) -> None:
        kind, params = self.rng.choice(FAULTS)
        self.note(f"fault {kind} {params}")
        self.relay.fail_next(kind, **params)

    def sleep(self) -> None:
        seconds = self.rng.choice([0.1, 0.3, 0.6])
        self.note(f"sleep {seconds}")
        time.sleep(seconds)

    def restart(self) -> None:
        self.note("restart")
        self.api.close()
        self.gateway.server.stop()
        self.gateway = self.start_gateway()
        self.api = self.gateway.client(self.secret)

    # ---- the end ----

    def settle(self) -> None:
        """Every upstream prediction ends, the gateway records each end, and the outbox drains."""
        for upstream_id in self.relay.predictions:
            self.relay.finish(upstream_id)
        self.note("relay finishes everything")
        wait_until_all_final(self.db_url, 30)
        deadline = time.monotonic() + 15
        while any(d["status"] == "pending" for d in rows(self.db_url, "webhook_delivery")):
            assert time.monotonic() < deadline, "webhook deliveries still pending"
            time.sleep(0.1)

    def check_settled(self) -> None:
        check_all(self.db_url, self.relay, settled=True)
        check_budget(self.db_url)
        stored = {p["id"]: p for p in rows(self.db_url, "prediction")}
        for known in self.predictions.values():
            body = self.prediction_answer(self.api.get(f"/predictions/{known.id}"), f"final get {known.id}")
            assert body["status"] in FINAL, body
            row = stored[known.id]
            charged = (known, row["cost_micros"], row["cost_note"])
            if row["cost_note"] is not None:
                # Unknown cost is charged at the estimate and flagged (P4).
                assert row["cost_micros"] == row["estimate_micros"], charged
            elif row["status"] == "succeeded":
                assert row["cost_micros"] == PRICES[known.model], charged
            elif known.model != "billfailures/model":
                assert row["cost_micros"] == 0, charged
        delivered = set()
        for delivery in self.receiver.requests:
            body = delivery.json()
            ClientPrediction(**body)
            if body["status"] in FINAL:
                assert body["status"] == stored[body["id"]]["status"], (body["id"], body["status"])
                delivered.add(body["id"])
        # I7: every prediction created with a webhook had its end delivered.
        hooked = {known.id for known in self.predictions.values() if known.webhook}
        assert hooked <= delivered, f"no completed webhook for {hooked - delivered}"


def assert_refused(response: httpx.Response, where: str) -> None:
    """A clean refusal: the budget's, or the upstream's failure (its own 5xx passed on, scrubbed)."""
    assert response.headers["content-type"].startswith("application/problem+json"), f"{where}: {response.text}"
    passed_on = response.status_code >= 500 and response.json()["title"] == "Upstream error"
    assert response.status_code in CREATE_ERRORS or passed_on, f"{where}: {response.status_code} {response.text}"


def check_budget(db_url: str) -> None:
    """P3: what the token spent and holds stays within its budget, give or take what each
    prediction may cost beyond what was held for it (an underestimate, a per-second price held at
    its fixed part, a version whose model was not known yet)."""
    token = token_row(db_url, "walker")
    overrun = sum(max(0, PRICES.get(p["model"], max(PRICES.values())) - p["estimate_micros"])
                  for p in rows(db_url, "prediction"))
    assert token["spent_micros"] + token["reserved_micros"] <= BUDGET_MICROS + overrun, token


ACTIONS: list[tuple[Callable[[Walk], None], int]] = [
    (Walk.create, 30), (Walk.get, 14), (Walk.list_page, 4), (Walk.cancel, 8), (Walk.finish, 10),
    (Walk.hint, 5), (Walk.race, 4), (Walk.late_poll, 3), (Walk.fault, 5), (Walk.sleep, 8), (Walk.restart, 2),
]


@pytest.fixture
def walking(gateway_factory: Any, relay: FakeRelay, tmp_path: Path,
            monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[int], Walk]]:
    # Predictions run long enough for the walk to meet them in flight; the reconciler polls
    # them soon, and resolves a create left in doubt soon after its time-out.
    relay.starting_seconds, relay.processing_seconds = 0.5, 4.0
    relay.versions[VERSION] = "budget/model"
    monkeypatch.setattr(prediction_service, "FIRST_POLL_SECONDS", 0.2)
    monkeypatch.setattr(prediction_service, "IN_DOUBT_MARGIN_SECONDS", 0.5)
    receiver = Receiver().start()
    walks: list[Walk] = []

    def begin(seed: int) -> Walk:
        gateway: Gateway = gateway_factory(**SETTINGS)
        secret = create_token(gateway.db_url, "walker", budget_micros=BUDGET_MICROS)
        walk = Walk(random.Random(seed), lambda: gateway_factory(**SETTINGS), gateway, relay, receiver, secret,
                    tmp_path / "snapshot.db")
        walks.append(walk)
        return walk

    yield begin
    for walk in walks:
        walk.api.close()
        # Before the receiver: a gateway still running would find it gone and retry its deliveries.
        walk.gateway.server.stop()
    receiver.stop()


@pytest.mark.parametrize("seed", SEEDS)
def test_a_random_walk_keeps_the_ledger_and_status_machine(walking: Callable[[int], Walk], seed: int) -> None:
    walk = walking(seed)
    steps = walk.rng.randrange(30, 81)
    actions, weights = zip(*ACTIONS, strict=True)
    try:
        for step in range(steps):
            action = walk.rng.choices(actions, weights)[0]
            action(walk)
            if step % 5 == 4:
                walk.check_snapshot()
        walk.settle()
        walk.check_settled()
    except Exception as error:
        history = "\n".join(walk.history)
        raise AssertionError(f"the walk of seed {seed} (replay: -k 'walk and {seed}') failed: {error!r}\n"
                             f"its steps:\n{history}") from error
