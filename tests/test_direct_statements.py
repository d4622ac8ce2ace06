"""Single statements outside any transaction (`DirectStatements`): on asyncpg straight on the driver,
with Core's values, rows and errors; the pool's connections kept, replaced or waited for as Core's are."""

from __future__ import annotations

import asyncio
import gc
import time
import warnings
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest
from sqlalchemy import Integer, bindparam, func, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import QueuePool

from app.db import DirectStatements, entity_by_key, make_engine
from app.predictions.models import PREDICTIONS, Prediction
from app.predictions.recording import _state_update
from app.predictions.service import _INSERT
from tests.dbtools import rows
from tests.test_prepared import NOW, _columns, _core_read, _prediction, _row_values, _token

T = TypeVar("T")


def _postgres_only(db_url: str) -> None:
    if not db_url.startswith("postgresql"):
        pytest.skip("asyncpg's own path")


def _run(db_url: str, scenario: Callable[[DirectStatements, AsyncEngine], Awaitable[T]], pool_size: int = 2) -> T:
    async def main() -> T:
        engine = make_engine(db_url, pool_size=pool_size)
        try:
            return await scenario(DirectStatements(engine), engine)
        finally:
            await engine.dispose()

    return asyncio.run(main())


def _pool(engine: AsyncEngine) -> QueuePool:
    pool = engine.sync_engine.pool
    assert isinstance(pool, QueuePool)
    return pool


def test_writes_and_reads_store_and_return_what_core_does(db_url: str) -> None:
    token_id = _token(db_url)
    prediction = _prediction(token_id)
    link = _state_update("processing", True, ("status", "upstream_id", "submission", "updated_at"))

    async def scenario(direct: DirectStatements, engine: AsyncEngine) -> dict[str, Any]:
        inserted = await direct.rowcount(_INSERT.statement, _row_values(prediction))
        read = _columns(await direct.entity(Prediction, prediction.id))
        async with engine.connect() as connection:
            core = await connection.run_sync(lambda sync: _core_read(sync, prediction.id))
        parameters = {"match_id": prediction.id, "set_status": "processing", "set_upstream_id": "up-1",
                      "set_submission": "accepted", "set_updated_at": NOW}
        linked = await direct.rowcount(link.statement, parameters)
        again = await direct.rowcount(link.statement, parameters)  # no longer pending: matches nothing
        count = await direct.scalar(select(func.count()).select_from(PREDICTIONS).where(
            PREDICTIONS.c.status == bindparam("status")), {"status": "processing"})
        return {"inserted": inserted, "read": read, "core": core, "linked": linked, "again": again,
                "count": count, "missing": await direct.entity(Prediction, "n" * 26)}

    seen = _run(db_url, scenario)
    assert (seen["inserted"], seen["linked"], seen["again"], seen["count"]) == (1, 1, 0, 1)
    assert seen["read"] == seen["core"]
    assert seen["read"]["input"] == {"prompt": "hi ✓", "n": [1, 2.5, None]}
    assert seen["read"]["created_at"] == NOW
    assert seen["read"]["bill_failures"] is True
    assert seen["missing"] is None
    (row,) = rows(db_url, "prediction")
    assert (row["status"], row["upstream_id"], row["submission"]) == ("processing", "up-1", "accepted")


def test_a_duplicate_key_raises_sqlalchemys_integrity_error_and_the_connection_is_kept(db_url: str) -> None:
    token_id = _token(db_url)
    prediction = _prediction(token_id)

    async def scenario(direct: DirectStatements, engine: AsyncEngine) -> tuple[int, int, int]:
        await direct.rowcount(_INSERT.statement, _row_values(prediction))
        opened = _pool(engine).checkedin() + _pool(engine).checkedout()
        with pytest.raises(IntegrityError) as raised:
            await direct.rowcount(_INSERT.statement, _row_values(prediction))
        if db_url.startswith("postgresql"):
            assert getattr(raised.value.orig, "sqlstate", None) == "23505"
        # The same connection serves the next statement: an error the server reported leaves it sound.
        return (_pool(engine).checkedout(), _pool(engine).checkedin() + _pool(engine).checkedout() - opened,
                await direct.scalar(select(func.count()).select_from(PREDICTIONS), {}))

    assert _run(db_url, scenario, pool_size=1) == (0, 0, 1)
    assert len(rows(db_url, "prediction")) == 1


def test_a_connection_the_server_closed_is_replaced(db_url: str) -> None:
    _postgres_only(db_url)

    async def scenario(direct: DirectStatements, engine: AsyncEngine) -> tuple[int, int]:
        first = int(await direct.scalar(select(func.pg_backend_pid()), {}))
        other = make_engine(db_url)
        try:
            async with other.connect() as connection:
                await connection.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": first})
        finally:
            await other.dispose()
        await asyncio.sleep(0.2)  # the loop reads the end of the closed connection
        return first, int(await direct.scalar(select(func.pg_backend_pid()), {}))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first, second = _run(db_url, scenario, pool_size=1)
        gc.collect()
    assert second != first
    # Replacing it from outside a greenlet first is refused; that must leave no connect coroutine behind.
    assert [str(w.message) for w in caught if "never awaited" in str(w.message)] == []


def test_a_cancelled_statement_closes_its_connection_and_the_next_one_runs_on_a_new_one(db_url: str) -> None:
    _postgres_only(db_url)

    async def scenario(direct: DirectStatements, engine: AsyncEngine) -> tuple[int, int, bool, float]:
        before = int(await direct.scalar(select(func.pg_backend_pid()), {}))
        sleeping = asyncio.ensure_future(direct.scalar(select(func.pg_sleep(5)), {}))
        await asyncio.sleep(0.3)
        sleeping.cancel()
        with pytest.raises(asyncio.CancelledError):
            await sleeping
        started = time.monotonic()
        value = await direct.scalar(select(bindparam("n", type_=Integer())), {"n": 7})
        took = time.monotonic() - started
        after = int(await direct.scalar(select(func.pg_backend_pid()), {}))
        return _pool(engine).checkedout(), int(value), after != before, took

    checked_out, value, replaced, took = _run(db_url, scenario, pool_size=1)
    # Its state in doubt, the connection was not given back to the pool: a new one took its place.
    assert (checked_out, value, replaced) == (0, 7, True)
    assert took < 2, took  # not behind the cancelled sleep


def test_a_statement_waits_for_a_connection_when_every_one_is_busy(db_url: str) -> None:
    _postgres_only(db_url)

    async def scenario(direct: DirectStatements, engine: AsyncEngine) -> tuple[bool, int]:
        async with engine.connect() as holder:
            await holder.execute(text("SELECT 1"))
            waiting = asyncio.ensure_future(direct.scalar(select(bindparam("n", type_=Integer())), {"n": 3}))
            await asyncio.sleep(0.3)
            waited = not waiting.done()
        return waited, int(await waiting)

    assert _run(db_url, scenario, pool_size=1) == (True, 3)


def test_a_statement_it_cannot_plan_is_refused_on_the_driver(db_url: str) -> None:
    _postgres_only(db_url)
    expanding = update(PREDICTIONS).where(PREDICTIONS.c.status.in_(bindparam("statuses", expanding=True))).values(
        logs=bindparam("logs"))

    async def scenario(direct: DirectStatements, _engine: AsyncEngine) -> None:
        await direct.rowcount(expanding, {"statuses": ["starting"], "logs": "x"})

    with pytest.raises(ValueError, match="cannot run on the driver"):
        _run(db_url, scenario)


def test_on_sqlite_it_runs_through_core(db_url: str) -> None:
    if not db_url.startswith("sqlite"):
        pytest.skip("the path for drivers other than asyncpg")
    token_id = _token(db_url)
    prediction = _prediction(token_id)

    async def scenario(direct: DirectStatements, engine: AsyncEngine) -> tuple[int, bool]:
        inserted = await direct.rowcount(_INSERT.statement, _row_values(prediction))
        read = await direct.entity(Prediction, prediction.id)
        async with engine.connect() as connection:
            core = await connection.run_sync(lambda sync: entity_by_key(sync, Prediction, prediction.id))
        return inserted, _columns(read) == _columns(core)

    assert _run(db_url, scenario) == (1, True)
