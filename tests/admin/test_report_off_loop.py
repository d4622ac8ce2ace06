"""A long usage export does not hold up other requests: on SQLite it reads on a thread of its own."""

from __future__ import annotations

import sqlite3
import threading
import time
from datetime import date, timedelta
from typing import Any

import httpx
import pytest

from tests.conftest import Gateway
from tests.dbtools import create_token, token_row

ADMIN_SECRET = "admin-canary-0ff1007c2a"
DAYS, MODELS = 600, 100  # 60,000 day, token and model groups: about a year and a half of a busy team


def _seed_rollup(db_url: str, token_id: str) -> None:
    first = date(2025, 1, 1)
    with sqlite3.connect(db_url.removeprefix("sqlite:///")) as connection:
        connection.executemany(
            "INSERT INTO usage_daily (day, token_id, model, predictions, succeeded, failed, canceled, cost_micros)"
            " VALUES (?, ?, ?, 3, 2, 1, 0, 4500)",
            ((str(first + timedelta(days=d)), token_id, f"owner/model-{m:03d}")
             for d in range(DAYS) for m in range(MODELS)))


def test_an_export_of_every_day_token_and_model_leaves_the_loop_free(gateway_factory: Any) -> None:
    gateway: Gateway = gateway_factory(admin_token=ADMIN_SECRET)
    if not gateway.db_url.startswith("sqlite"):
        pytest.skip("SQLite only: on PostgreSQL the driver waits off the loop, but the rows are still folded on it")
    create_token(gateway.db_url, "team")
    _seed_rollup(gateway.db_url, token_row(gateway.db_url, "team")["id"])
    try:
        export, waits, response = _export_while_probing(gateway)
    finally:
        # A rollup with no predictions behind it: the invariants checked after each test would
        # rightly call it wrong.
        with sqlite3.connect(gateway.db_url.removeprefix("sqlite:///")) as connection:
            connection.execute("DELETE FROM usage_daily")
    assert response.status_code == 200
    lines = response.text.splitlines()
    assert lines[0] == "token,model,day,predictions,cost_usd"
    assert len(lines) == 1 + DAYS * MODELS
    assert lines[1] == "team,owner/model-000,2025-01-01,3,0.004500"
    # Long enough to matter; when it ran on the loop, a health check waited for all of it.
    assert export > 0.1, f"the export took only {export:.3f} s: the test no longer measures anything"
    assert max(waits) < export / 2, f"a health check waited {max(waits):.3f} s of the export's {export:.3f} s"


def _export_while_probing(gateway: Gateway) -> tuple[float, list[float], httpx.Response]:
    """The all-time export by day, token and model, with /healthz asked all the while."""
    stop, waits = threading.Event(), []

    def probe() -> None:
        with httpx.Client(base_url=gateway.url, timeout=30) as client:
            while not stop.is_set():
                started = time.perf_counter()
                assert client.get("/healthz").status_code == 200
                waits.append(time.perf_counter() - started)
                time.sleep(0.002)

    prober = threading.Thread(target=probe)
    with httpx.Client(base_url=gateway.url + "/admin/v1", timeout=60,
                      headers={"Authorization": f"Bearer {ADMIN_SECRET}"}) as admin:
        prober.start()
        time.sleep(0.05)
        started = time.perf_counter()
        response = admin.get("/usage?format=csv&group_by=day&group_by=token&group_by=model")
        export = time.perf_counter() - started
        stop.set()
        prober.join()
    return export, waits, response
