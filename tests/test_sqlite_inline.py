"""SQLite on the event loop's thread: another process's write lock is waited out, never blocking."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from app.db import WalCheckpointer, make_engine
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


async def _fill_the_log(tmp_path: Path, *, checkpoint_on_commit: bool) -> tuple[AsyncEngine, Path]:
    """1,500 one-page commits: past the 1,000 pages at which SQLite checkpoints on its own."""
    database = tmp_path / "log.db"
    engine = make_engine(f"sqlite:///{database}", checkpoint_on_commit=checkpoint_on_commit)
    async with engine.begin() as connection:
        await connection.exec_driver_sql("CREATE TABLE page (id INTEGER PRIMARY KEY, body BLOB)")
    for number in range(1500):
        async with engine.begin() as connection:
            await connection.exec_driver_sql("INSERT INTO page (id, body) VALUES (?, zeroblob(3000))", (number,))
    return engine, database.with_name("log.db-wal")


async def test_commits_leave_the_log_to_the_checkpointer(tmp_path: Path) -> None:
    engine, wal = await _fill_the_log(tmp_path, checkpoint_on_commit=False)
    checkpointer = WalCheckpointer(engine)
    assert WalCheckpointer.applies_to(engine)
    assert wal.stat().st_size > 1500 * 4096  # no commit copied the log back
    busy, logged, copied = checkpointer.checkpoint()
    assert busy == 0
    assert logged == copied >= 1500
    stop = asyncio.Event()
    running = asyncio.create_task(checkpointer.run_until(stop))
    await asyncio.sleep(0.05)
    stop.set()
    await asyncio.wait_for(running, timeout=2)
    async with engine.connect() as connection:
        assert (await connection.exec_driver_sql("SELECT count(*) FROM page")).scalar() == 1500
    await engine.dispose()


async def test_by_default_commits_checkpoint_as_sqlite_does(tmp_path: Path) -> None:
    engine, wal = await _fill_the_log(tmp_path, checkpoint_on_commit=True)
    assert wal.stat().st_size < 1100 * 4096
    await engine.dispose()
