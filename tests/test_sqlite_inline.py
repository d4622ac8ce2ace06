"""SQLite on the event loop's thread: another process's write lock is waited out, never blocking."""

from __future__ import annotations

import sqlite3
import threading
import time
from typing import Any

import httpx
import pytest

from tests.conftest import Gateway
from tests.dbtools import create_token, rows
from tests.helpers import create

ADMIN_SECRET = "admin-canary-7c2d9e41ab"


def hold_the_write_lock(db_url: str, seconds: float, *statements: str) -> threading.Thread:
    """A thread holding SQLite's write lock for `seconds`, as another process (the CLI, a second
    gateway) would, running `statements` in that transaction; returned once the lock is held."""
    if not db_url.startswith("sqlite"):
        pytest.skip("SQLite only: PostgreSQL writers do not share one file lock")
    held = threading.Event()

    def hold() -> None:
        other = sqlite3.connect(db_url.removeprefix("sqlite:///"), isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        for statement in statements:
            other.execute(statement)
        held.set()
        time.sleep(seconds)
        other.execute("COMMIT")
        other.close()

    holder = threading.Thread(target=hold)
    holder.start()
    assert held.wait(5)
    return holder


def test_a_write_lock_held_elsewhere_delays_creates_but_never_the_event_loop(
    gateway: Gateway, api: httpx.Client, db_url: str
) -> None:
    holder = hold_the_write_lock(db_url, 1.5)
    results: list[httpx.Response] = []
    creating = threading.Thread(target=lambda: results.append(create(api)))
    started = time.monotonic()
    creating.start()
    time.sleep(0.2)  # the create is now waiting for the lock
    slowest = 0.0
    with httpx.Client(base_url=gateway.url) as plain:
        while holder.is_alive():
            asked = time.monotonic()
            assert plain.get("/healthz").status_code == 200
            slowest = max(slowest, time.monotonic() - asked)
            time.sleep(0.05)
    creating.join(15)
    holder.join()
    assert slowest < 0.3, f"the event loop stalled for {slowest:.2f} s while the lock was held elsewhere"
    (response,) = results
    assert response.status_code == 201, response.text
    assert time.monotonic() - started >= 1.0  # it did wait for the lock, and then went through


def test_a_session_that_reads_then_writes_waits_out_a_write_lock_held_elsewhere(gateway_factory: Any) -> None:
    # Its transaction must take the write lock when it begins: begun as a reader, its write would
    # find the lock taken (or its snapshot stale once the lock is let go) and fail.
    gateway: Gateway = gateway_factory(admin_token=ADMIN_SECRET)
    create_token(gateway.db_url, "team")
    started = time.monotonic()
    holder = hold_the_write_lock(gateway.db_url, 1.0, "UPDATE api_token SET max_in_flight = 3 WHERE name = 'team'")
    with httpx.Client(base_url=gateway.url + "/admin/v1", headers={"Authorization": f"Bearer {ADMIN_SECRET}"},
                      timeout=30) as admin:
        response = admin.patch("/tokens/team", json={"rpm_limit": 7})
    holder.join()
    assert response.status_code == 200, response.text
    assert time.monotonic() - started >= 1.0  # it did wait for the lock, and then went through
    (row,) = rows(gateway.db_url, "api_token")
    assert (row["max_in_flight"], row["rpm_limit"]) == (3, 7)
