"""Chaos: two gateway processes on one database under mixed load, faults and kills; invariants after.

GATEWAY_CHAOS_SECONDS sets how long the chaos lasts (a short run by default; longer ones for a
nightly run), GATEWAY_CHAOS_SEED the random seed (printed on failure: it replays a run's choices, not their
timing).
"""

from __future__ import annotations

import itertools
import os
import random
import signal
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.dbtools import create_token, rows
from tests.fakes.receiver import Receiver
from tests.fakes.relay import FakeRelay
from tests.helpers import wait_until_all_final
from tests.invariants import TERMINAL, check_all, moves_forward
from tests.processes import GatewayProcess

CHAOS_SECONDS = float(os.environ.get("GATEWAY_CHAOS_SECONDS", "15"))
CLIENTS = 6
# The upstream's failures as a create or cancel passes them on: unreachable, reset or garbled
# (502), timed out (504), and its own throttling and errors, which keep their status. A 500 is
# allowed only as the upstream's own (`UPSTREAM_ERROR_TITLE`), never as the gateway's.
UPSTREAM_FAILURES = {429, 500, 502, 503, 504}
UPSTREAM_ERROR_TITLE = "Upstream error"
# A create may also be refused by the budget or the rate limit (402/429), or be an idempotent
# replay of one still in progress (409).
CREATE_STATUSES = {200, 201, 202, 402, 409} | UPSTREAM_FAILURES


@dataclass
class Observed:
    """What the clients saw, to be checked against the ledger afterwards."""

    answered: dict[str, str] = field(default_factory=dict)  # id answered to a create -> its model
    by_key: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    # "client prediction-id" -> the statuses that client saw, in order: answers to different
    # clients may be noted in another order than they were given.
    statuses: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    unexpected: list[str] = field(default_factory=list)
    requests: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def note(self, what: str, response: httpx.Response, allowed: set[int]) -> None:
        with self.lock:
            self.requests += 1
            if response.status_code not in allowed:
                self.unexpected.append(f"{what}: {response.status_code} {response.text[:300]}")
            elif response.status_code >= 400 and not response.headers.get(
                "content-type", "").startswith("application/problem+json"):
                self.unexpected.append(f"{what}: {response.status_code} is not problem+json")
            elif response.status_code == 500 and response.json().get("title") != UPSTREAM_ERROR_TITLE:
                self.unexpected.append(f"{what}: the gateway's own 500: {response.text[:300]}")

    def seen(self, prediction: dict[str, Any]) -> None:
        with self.lock:
            self.statuses[f"{threading.get_ident()} {prediction['id']}"].append(prediction["status"])


class Instances:
    """Two gateway processes on one database; the chaos kills and restarts them."""

    def __init__(self, db_url: str, relay: FakeRelay, workdir: Path) -> None:
        settings = {
            "allow_private_webhooks": "true", "allow_http_webhooks": "true", "webhook_interval": "0.2",
            # One storage for both, as the multi-instance layout shares it.
            "storage_dir": str(workdir / "storage"), "log_level": "ERROR",
        }
        self._lock = threading.Lock()
        self.processes = [
            GatewayProcess(db_url=db_url, upstream_url=relay.upstream_url, upstream_token=relay.key,
                           workdir=workdir, **settings)
            for _ in range(2)
        ]
        self.urls = [process.start().url for process in self.processes]
        self._disturbing: list[threading.Thread | None] = [None, None]

    def url(self, rng: random.Random) -> str:
        with self._lock:
            return rng.choice(self.urls)

    def disturb(self, index: int, how: str, rng: random.Random) -> bool:
        """Kill (`kill`), stop (`restart`) and start one instance again, or freeze it for a while
        (`pause`: its leases run out meanwhile), on a thread of its own so that the other faults
        go on; False if that instance is being disturbed already."""
        with self._lock:
            busy = self._disturbing[index]
            if busy is not None and busy.is_alive():
                return False
            thread = threading.Thread(target=self._disturb, args=(index, how, rng.uniform(0.5, 3)))
            self._disturbing[index] = thread
        thread.start()
        return True

    def _disturb(self, index: int, how: str, pause_seconds: float) -> None:
        process = self.processes[index]
        if how == "pause":
            assert process.process is not None
            process.process.send_signal(signal.SIGSTOP)
            time.sleep(pause_seconds)
            process.process.send_signal(signal.SIGCONT)
            return
        process.kill() if how == "kill" else process.stop()
        time.sleep(0.3)
        process.start()  # may come up on another port: clients pick it up from `urls`
        with self._lock:
            self.urls[index] = process.url

    def settle(self) -> None:
        """Wait for the disturbances under way to end."""
        for thread in self._disturbing:
            if thread is not None:
                thread.join(timeout=60)

    def stop(self) -> None:
        self.settle()
        for process in self.processes:
            process.stop()


def _client(rng: random.Random, instances: Instances, observed: Observed, secrets: list[str],
            webhook: str, stop: threading.Event) -> None:
    keys = [f"key-{rng.random()}" for _ in range(3)]
    known_by_secret: dict[str, list[str]] = {secret: [] for secret in secrets}
    while not stop.is_set():
        secret = rng.choice(secrets)
        known = known_by_secret[secret]
        action = rng.choices(("create", "get", "cancel", "list", "stream"), weights=(5, 6, 2, 1, 1))[0]
        try:
            with httpx.Client(base_url=instances.url(rng), headers={"Authorization": f"Bearer {secret}"},
                              timeout=15) as api:
                if action == "create" or not known:
                    _create(rng, api, observed, known, keys, webhook)
                elif action == "get":
                    response = api.get(f"/predictions/{rng.choice(known)}")
                    observed.note("get", response, {200})
                    if response.status_code == 200:
                        observed.seen(response.json())
                elif action == "cancel":
                    response = api.post(f"/predictions/{rng.choice(known)}/cancel")
                    observed.note("cancel", response, {200} | UPSTREAM_FAILURES)
                elif action == "list":
                    observed.note("list", api.get("/predictions"), {200})
                else:
                    _stream_a_little(rng, api, observed, known)
        except httpx.TransportError:
            pass  # the instance was killed under this request, or was restarting


def _create(rng: random.Random, api: httpx.Client, observed: Observed, known: list[str],
            keys: list[str], webhook: str) -> None:
    model = rng.choice(("budget/model", "black-forest-labs/flux"))
    body: dict[str, Any] = {"input": {"prompt": f"p{rng.randrange(4)}"}}
    headers: dict[str, str] = {}
    if rng.random() < 0.3:
        body["webhook"] = webhook
    key = rng.choice(keys) if rng.random() < 0.3 else None
    if key is not None:
        # One model and body per key, so that a replay is never a mismatch (a 422, tested elsewhere).
        model, body = "budget/model", {"input": {"prompt": key}}
        headers["Idempotency-Key"] = key
    if rng.random() < 0.2:
        headers["Prefer"] = "wait=1"
    response = api.post(f"/models/{model}/predictions", json=body, headers=headers)
    observed.note("create", response, CREATE_STATUSES)
    if response.status_code in (200, 201, 202):
        prediction = response.json()
        with observed.lock:
            observed.answered[prediction["id"]] = prediction["model"]
            if key is not None:
                observed.by_key[f"{api.headers['Authorization']} {key}"].add(prediction["id"])
        observed.seen(prediction)
        known.append(prediction["id"])


def _stream_a_little(rng: random.Random, api: httpx.Client, observed: Observed, known: list[str]) -> None:
    response = api.get(f"/predictions/{rng.choice(known)}")
    if response.status_code != 200:
        return
    with api.stream("GET", response.json()["urls"]["stream"], headers={"Accept": "text/event-stream"},
                    timeout=3) as stream:
        if stream.status_code != 200:
            stream.read()
        observed.note("stream", stream, {200})
        deadline = time.monotonic() + rng.uniform(0.1, 1.5)
        for _ in stream.iter_lines():
            if time.monotonic() > deadline:
                break  # a client going away mid-stream


def _chaos(rng: random.Random, relay: FakeRelay, receiver: Receiver, instances: Instances,
           stop: threading.Event, log: list[str]) -> None:
    while not stop.wait(rng.uniform(0.3, 1.0)):
        what = rng.choices(("relay", "receiver", "kill", "restart", "pause"), weights=(6, 2, 2, 1, 1))[0]
        if what == "relay":
            kind = rng.choice(("status", "throttle", "reset", "hang", "non_json"))
            method = rng.choice(("POST", "GET", None))
            params: dict[str, Any] = {"status": rng.choice((500, 503))} if kind == "status" else {}
            if kind == "hang":
                params["seconds"] = rng.uniform(0.5, 3)  # past the create time-out at times
            relay.fail_next(kind, count=rng.randint(1, 3), method=method, **params)
            log.append(f"relay {kind} {method} {params}")
        elif what == "receiver":
            receiver.answer(rng.choice((500, 503, 410)), count=rng.randint(1, 3))
            log.append("receiver fails")
        else:
            index = rng.randrange(2)
            if instances.disturb(index, what, rng):
                log.append(f"{what} instance {index}")


def test_chaos_on_two_instances_leaves_every_invariant_holding(
    db_url: str, relay: FakeRelay, tmp_path: Path
) -> None:
    seed = int(os.environ.get("GATEWAY_CHAOS_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    relay.starting_seconds, relay.processing_seconds = 0.3, 0.6
    secrets = [create_token(db_url, "chaos-rich", budget_micros=50_000_000),
               create_token(db_url, "chaos-poor", budget_micros=60_000)]  # runs out mid-way
    receiver = Receiver().start()
    instances = Instances(db_url, relay, tmp_path)
    observed = Observed()
    chaos_log: list[str] = []
    stop = threading.Event()
    threads = [threading.Thread(target=_client, args=(random.Random(rng.random()), instances, observed, secrets,
                                                      receiver.url(), stop)) for _ in range(CLIENTS)]
    threads.append(threading.Thread(target=_chaos, args=(random.Random(rng.random()), relay, receiver, instances,
                                                         stop, chaos_log)))
    try:
        for thread in threads:
            thread.start()
        time.sleep(CHAOS_SECONDS)
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
        replay = f"seed {seed} (GATEWAY_CHAOS_SEED={seed}); chaos: {chaos_log}"
        assert not any(thread.is_alive() for thread in threads), f"a client hung; {replay}"
        instances.settle()
        relay.clear_faults()
        wait_until_all_final(db_url, 90)
    finally:
        instances.stop()
        receiver.stop()

    assert observed.requests > 50, f"too little load to mean anything: {observed.requests}; {replay}"
    assert not observed.unexpected, f"{observed.unexpected[:10]}; {replay}"
    recorded = {p["id"]: p for p in rows(db_url, "prediction")}
    lost = set(observed.answered) - set(recorded)
    assert not lost, f"predictions answered to clients but not in the ledger: {lost}; {replay}"
    for ids in observed.by_key.values():
        assert len(ids) == 1, f"one idempotency key, several predictions: {ids}; {replay}"
    for client_and_id, seen in observed.statuses.items():
        prediction_id = client_and_id.split()[1]
        _check_never_backwards(prediction_id, seen, recorded[prediction_id]["status"], replay)
    check_all(db_url, relay, settled=True)


def _check_never_backwards(prediction_id: str, seen: list[str], final: str, replay: str) -> None:
    """I6 as clients saw it: a status never goes back, a terminal one never changes (the ledger's
    `aborted` is `canceled` to clients)."""
    final = {"aborted": "canceled"}.get(final, final)
    for before, after in itertools.pairwise(seen):
        assert moves_forward(before, after), f"{prediction_id} went {before} -> {after} ({seen}); {replay}"
    if seen[-1] in TERMINAL:
        assert seen[-1] == final, f"{prediction_id} was shown {seen[-1]}, recorded {final}; {replay}"
