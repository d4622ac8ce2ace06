"""SQLite on the event loop's thread: another process's write lock is waited out, never blocking."""

from __future__ import annotations

import sqlite3
import threading
import time

import httpx
import pytest

from tests.conftest import Gateway
from tests.helpers import create


def test_a_write_lock_held_elsewhere_delays_creates_but_never_the_event_loop(
    gateway: Gateway, api: httpx.Client, db_url: str
) -> None:
    if not db_url.startswith("sqlite"):
        pytest.skip("SQLite only: PostgreSQL writers do not share one file lock")
    held = threading.Event()

    def hold_the_write_lock() -> None:
        other = sqlite3.connect(db_url.removeprefix("sqlite:///"), isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # as another process (the CLI, a second gateway) would
        held.set()
        time.sleep(1.5)
        other.execute("COMMIT")
        other.close()

    holder = threading.Thread(target=hold_the_write_lock)
    holder.start()
    assert held.wait(5)
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
