"""bench/floor.py writes what a gateway create writes: the benchmark's floor measures the same ledger work."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.dbtools import rows
from tests.helpers import cli, free_port
from tests.processes import GatewayProcess

ROOT = Path(__file__).resolve().parent.parent
RELAY_KEY = "floor-test-relay-key"
BODY = {"input": {"prompt": "a lighthouse at dusk", "seed": 42}}
# What differs between two creates whatever does them: their ids, times and the address they were asked through.
VOLATILE = {"id", "upstream_id", "created_at", "updated_at", "submit_deadline", "next_poll_at", "public_base"}


def _serve(argv: list[str], port: int, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with log.open("ab") as errors:
        process = subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                   stderr=errors)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{argv[0]} exited: {log.read_text()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process
        except OSError:
            time.sleep(0.1)
    process.kill()
    process.wait(timeout=10)
    raise RuntimeError(f"{argv[0]} did not start")


@pytest.fixture
def relay_port(tmp_path: Path) -> Iterator[int]:
    port = free_port()
    process = _serve(["bench/upstream.py", "--port", str(port)], port, tmp_path / "relay.log")
    yield port
    process.terminate()
    process.wait(timeout=10)


def test_the_floor_records_a_create_as_the_gateway_does(tmp_path: Path, relay_port: int) -> None:
    db_url = f"sqlite:///{tmp_path / 'ledger.db'}"
    assert cli(db_url, "migrate").returncode == 0
    made = cli(db_url, "tokens", "create", "floor", "--json")
    assert made.returncode == 0, made.stderr
    secret = json.loads(made.stdout.strip().splitlines()[-1])["token"]
    headers = {"Authorization": f"Bearer {secret}"}
    upstream = f"http://127.0.0.1:{relay_port}/replicate"

    gateway = GatewayProcess(db_url=db_url, upstream_url=upstream, upstream_token=RELAY_KEY, workdir=tmp_path,
                             reconcile_interval="3600").start()
    try:
        through_gateway = httpx.post(gateway.url + "/models/bench/load/predictions", json=BODY, headers=headers)
    finally:
        gateway.stop()
    assert through_gateway.status_code == 201, through_gateway.text

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env["BENCH_FLOOR_UPSTREAM_KEY"] = RELAY_KEY
    floor = _serve(["bench/floor.py", "--database", str(tmp_path / "ledger.db"), "--upstream", upstream,
                    "--port", str(port)], port, tmp_path / "floor.log", env)
    try:
        through_floor = httpx.post(f"http://127.0.0.1:{port}/replicate/v1/models/bench/load/predictions",
                                   json=BODY, headers=headers)
        # It answers nothing it cannot create: an unknown token gets its connection closed.
        with pytest.raises(httpx.TransportError):
            httpx.post(f"http://127.0.0.1:{port}/replicate/v1/models/bench/load/predictions", json=BODY,
                       headers={"Authorization": "Bearer not-a-token"})
    finally:
        floor.terminate()
        floor.wait(timeout=10)
    assert through_floor.status_code == 201, through_floor.text

    answer = through_floor.json()
    assert answer["status"] == "starting"
    assert answer["urls"]["get"] == f"http://127.0.0.1:{port}/replicate/v1/predictions/{answer['id']}"

    predictions = {row["id"]: row for row in rows(db_url, "prediction")}
    assert set(predictions) == {through_gateway.json()["id"], answer["id"]}
    by_gateway, by_floor = predictions[through_gateway.json()["id"]], predictions[answer["id"]]
    assert by_floor["upstream_id"].startswith("prd")
    assert by_floor["submission"] == "accepted"
    same = {name: value for name, value in by_gateway.items() if name not in VOLATILE}
    assert {name: by_floor[name] for name in same} == same

    entries = sorted((row["prediction_id"] == answer["id"], row["kind"], row["amount_micros"])
                     for row in rows(db_url, "ledger_entry"))
    assert entries == [(False, "reservation", 0), (True, "reservation", 0)]
    (token,) = rows(db_url, "api_token")
    assert token["in_flight"] == 2
    assert token["rate_count"] in (1, 2)  # the two creates may fall in two minutes
