"""Write transactions as synchronous functions: committed, rolled back, and queued with sessions."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import pytest
from sqlalchemy import event, text
from sqlalchemy.engine import Connection

from app.accounting import service as accounting
from app.db import (
    Transactions,
    WalCheckpointer,
    commits_per_checkpoint,
    make_engine,
    make_sessionmaker,
)
from app.errors import PaymentRequired
from tests.dbtools import create_token, rows

NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
T = TypeVar("T")


def _token(db_url: str, **kwargs: Any) -> dict[str, Any]:
    create_token(db_url, "probe", **kwargs)
    (token,) = rows(db_url, "api_token")
    return token


def _admit(token_id: str, estimate: int) -> Any:
    return lambda connection: accounting.admit(
        connection, token_id=token_id, estimate_micros=estimate, now=NOW)


def _run(db_url: str, body: Callable[[Transactions], Awaitable[T]]) -> T:
    async def scenario() -> T:
        engine = make_engine(db_url)
        transactions = Transactions(engine, make_sessionmaker(engine))
        try:
            return await body(transactions)
        finally:
            transactions.dispose()
            await engine.dispose()

    return asyncio.run(scenario())


def test_what_the_function_writes_commits_and_what_it_returns_comes_back(db_url: str) -> None:
    token = _token(db_url)

    def admit_twice(connection: Connection) -> int:
        _admit(token["id"], 100)(connection)
        _admit(token["id"], 20)(connection)
        return 7

    assert _run(db_url, lambda transactions: transactions.run(admit_twice)) == 7
    (after,) = rows(db_url, "api_token")
    assert (after["reserved_micros"], after["in_flight"]) == (120, 2)


def test_a_function_that_raises_leaves_nothing_behind(db_url: str) -> None:
    token = _token(db_url, budget_micros=150)

    def admit_past_the_budget(connection: Connection) -> None:
        _admit(token["id"], 100)(connection)
        _admit(token["id"], 100)(connection)  # refused: 402, after the first wrote

    async def scenario(transactions: Transactions) -> None:
        with pytest.raises(PaymentRequired):
            await transactions.run(admit_past_the_budget)
        await transactions.run(_admit(token["id"], 100))  # the connection is usable again

    _run(db_url, scenario)
    (after,) = rows(db_url, "api_token")
    assert (after["reserved_micros"], after["in_flight"]) == (100, 1)


def test_on_sqlite_a_transaction_queues_behind_a_write_session_of_another_task(db_url: str) -> None:
    if not db_url.startswith("sqlite"):
        pytest.skip("SQLite only: one write lock per database file")
    token = _token(db_url)
    order: list[str] = []

    async def scenario() -> None:
        engine = make_engine(db_url)
        sessions = make_sessionmaker(engine)
        transactions = Transactions(engine, sessions)
        session_open = asyncio.Event()

        async def slow_session() -> None:
            async with sessions() as session:
                await session.execute(text("UPDATE api_token SET in_flight = in_flight + 10"))
                session_open.set()
                await asyncio.sleep(0.2)  # holds SQLite's write lock across an await
                await session.commit()
                order.append("session")

        async def transaction() -> None:
            await session_open.wait()

            def admit(connection: Connection) -> None:
                order.append("transaction")
                _admit(token["id"], 5)(connection)
            await transactions.run(admit)

        try:
            await asyncio.gather(slow_session(), transaction())
            inside = sessions()
            async with inside:
                with pytest.raises(RuntimeError, match="inside a write session"):
                    await transactions.run(_admit(token["id"], 5))
        finally:
            transactions.dispose()
            await engine.dispose()

    asyncio.run(scenario())
    assert order == ["session", "transaction"]
    (after,) = rows(db_url, "api_token")
    assert after["in_flight"] == 11


def test_on_sqlite_functions_handed_in_together_commit_together_and_a_failure_undoes_only_its_own(
    db_url: str,
) -> None:
    if not db_url.startswith("sqlite"):
        pytest.skip("SQLite only: PostgreSQL runs each function in its own transaction")
    token = _token(db_url, budget_micros=1000)
    commits: list[int] = []

    def admit_then_fail(connection: Connection) -> None:
        _admit(token["id"], 400)(connection)
        raise ValueError("changed its mind")

    async def scenario(transactions: Transactions) -> list[Any]:
        event.listen(transactions._sync_engine, "commit", lambda _: commits.append(1))
        works = [_admit(token["id"], 100), admit_then_fail, _admit(token["id"], 200),
                 _admit(token["id"], 900)]  # the last is past the budget: 402
        return await asyncio.gather(*(transactions.run(work) for work in works), return_exceptions=True)

    answers = _run(db_url, scenario)
    assert answers[0] is None
    assert answers[2] is None
    assert isinstance(answers[1], ValueError)
    assert isinstance(answers[3], PaymentRequired)
    assert len(commits) == 1  # one transaction for the four
    (after,) = rows(db_url, "api_token")
    assert (after["reserved_micros"], after["in_flight"]) == (300, 2)


def test_on_sqlite_a_function_handed_in_on_the_next_turn_of_the_loop_joins_the_batch(db_url: str) -> None:
    # What the next turn's network events hand in shares the commit, and the pages it writes.
    if not db_url.startswith("sqlite"):
        pytest.skip("SQLite only: PostgreSQL runs each function in its own transaction")
    token = _token(db_url, budget_micros=1000)
    commits: list[int] = []

    async def scenario(transactions: Transactions) -> list[Any]:
        event.listen(transactions._sync_engine, "commit", lambda _: commits.append(1))
        first = asyncio.ensure_future(transactions.run(_admit(token["id"], 100)))
        await asyncio.sleep(0)  # the first is now waiting for its commit
        second = asyncio.ensure_future(transactions.run(_admit(token["id"], 200)))
        return list(await asyncio.gather(first, second))

    assert _run(db_url, scenario) == [None, None]
    assert len(commits) == 1
    (after,) = rows(db_url, "api_token")
    assert (after["reserved_micros"], after["in_flight"]) == (300, 2)


def test_on_sqlite_the_log_is_checkpointed_on_another_thread_never_by_the_writer(db_url: str) -> None:
    if not db_url.startswith("sqlite"):
        pytest.skip("SQLite only: its write-ahead log")
    token = _token(db_url, budget_micros=10**9)

    async def scenario(transactions: Transactions) -> tuple[Any, set[int], int, int, int]:
        checkpointer = transactions._checkpointer
        assert checkpointer is not None
        checkpointer.target_frames = 1  # a checkpoint every MIN_COMMITS commits
        autocheckpoint = await transactions.run(
            lambda connection: connection.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar())
        admitted = 0
        for _ in range(3 * checkpointer.MIN_COMMITS):
            await transactions.run(_admit(token["id"], 1))
            admitted += 1
        # A checkpoint still under way when its turn came again makes the next one start later,
        # so write on until one starts with no commit after it, and let it complete.
        await checkpointer.wait()
        while True:
            await transactions.run(_admit(token["id"], 1))
            admitted += 1
            if checkpointer._commits == 0:
                break
            assert admitted < 6 * checkpointer.MIN_COMMITS
        await checkpointer.wait()
        # The checkpoint completed, so the next write starts the log over rather than growing it.
        await transactions.run(_admit(token["id"], 1))
        admitted += 1
        assert transactions._sync_engine is not None
        probe = sqlite3.connect(str(transactions._sync_engine.url.database))
        try:
            _, log_frames, _ = probe.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        finally:
            probe.close()
        assert 0 < log_frames < 10
        return autocheckpoint, checkpointer.thread_ids, checkpointer.runs, threading.get_ident(), admitted

    autocheckpoint, checkpoint_threads, runs, loop_thread, admitted = _run(db_url, scenario)
    assert autocheckpoint == 4000  # the writer's own checkpoint is only a fallback
    assert runs >= 2
    assert checkpoint_threads
    assert loop_thread not in checkpoint_threads
    (after,) = rows(db_url, "api_token")
    assert after["in_flight"] == admitted


def test_on_sqlite_the_writers_savepoint_journals_stay_in_memory(db_url: str) -> None:
    if not db_url.startswith("sqlite"):
        pytest.skip("SQLite only: its temporary files")

    async def scenario(transactions: Transactions) -> Any:
        return await transactions.run(lambda connection: connection.exec_driver_sql("PRAGMA temp_store").scalar())

    # 2 is MEMORY: every work of a group commit runs in a savepoint, and with the default a
    # savepoint's journal of changed pages can spill into a new temporary file.
    assert _run(db_url, scenario) == 2


def test_checkpoints_come_further_apart_when_commits_are_small() -> None:
    # 32 commits wrote 320 pages: the next checkpoint comes after 100, at about a thousand pages.
    assert commits_per_checkpoint(320, 32, 1000) == 100
    # Big commits never checkpoint more often than every MIN_COMMITS, tiny ones at least every MAX.
    assert commits_per_checkpoint(32_000, 32, 1000) == WalCheckpointer.MIN_COMMITS
    assert commits_per_checkpoint(16, 32, 1000) == WalCheckpointer.MAX_COMMITS
    # A failed checkpoint (no page count) falls back to the shortest interval.
    assert commits_per_checkpoint(0, 32, 1000) == WalCheckpointer.MIN_COMMITS


def test_on_sqlite_the_checkpointer_spaces_its_runs_by_the_pages_commits_write(db_url: str) -> None:
    if not db_url.startswith("sqlite"):
        pytest.skip("SQLite only: its write-ahead log")
    token = _token(db_url, budget_micros=10**9)

    async def scenario(transactions: Transactions) -> tuple[int, int]:
        checkpointer = transactions._checkpointer
        assert checkpointer is not None
        for _ in range(checkpointer.MIN_COMMITS):
            await transactions.run(_admit(token["id"], 1))
        await checkpointer.wait()
        runs = checkpointer.runs
        # One admission writes a few pages, so a thousand pages are many more commits away.
        for _ in range(checkpointer.MIN_COMMITS):
            await transactions.run(_admit(token["id"], 1))
        await checkpointer.wait()
        return checkpointer.every_commits, checkpointer.runs - runs

    every_commits, later_runs = _run(db_url, scenario)
    assert every_commits > 3 * WalCheckpointer.MIN_COMMITS
    assert later_runs == 0

