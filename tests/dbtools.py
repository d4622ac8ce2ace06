"""Test helpers that read and prepare the database directly."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.sql import Executable

from app.config import Settings
from app.db import Transactions, make_engine, make_sessionmaker
from app.predictions.recording import PredictionRecorder
from app.schema import Base
from app.tokens import service as token_service
from app.upstream.registry import Registry

TABLES = [table.name for table in reversed(Base.metadata.sorted_tables)]


def run(coro: Any) -> Any:
    """Run a coroutine from a synchronous test."""
    return asyncio.run(coro)


async def _truncate(url: str) -> None:
    engine = make_engine(url)
    try:
        async with engine.begin() as connection:
            await connection.execute(text(f"TRUNCATE {', '.join(TABLES)} CASCADE"))
    finally:
        await engine.dispose()


def truncate_all(url: str) -> None:
    """Empty every table (PostgreSQL), keeping the migrated schema."""
    run(_truncate(url))


async def _rows(url: str, table: str) -> list[dict[str, Any]]:
    engine = make_engine(url)
    try:
        async with engine.connect() as connection:
            result = await connection.execute(text(f"SELECT * FROM {table}"))  # noqa: S608
            return [dict(row._mapping) for row in result]
    finally:
        await engine.dispose()


def rows(url: str, table: str) -> list[dict[str, Any]]:
    """Every row of a table as dicts."""
    result: list[dict[str, Any]] = run(_rows(url, table))
    return result


def token_row(url: str, name: str) -> dict[str, Any]:
    """The token named `name`, as its row."""
    (row,) = [t for t in rows(url, "api_token") if t["name"] == name]
    return row


def dump_database(url: str) -> str:
    """Every value of every table as one text, for secret scans."""
    return "\n".join(repr(row) for table in TABLES for row in rows(url, table))


async def _create_token(url: str, name: str, **kwargs: Any) -> str:
    engine = make_engine(url)
    try:
        async with make_sessionmaker(engine)() as session:
            key = await token_service.load_instance_key(session, None)
            issued = await token_service.create(session, key=key, name=name, **kwargs)
            return issued.secret
    finally:
        await engine.dispose()


def create_token(url: str, name: str, **kwargs: Any) -> str:
    """Create a gateway token directly in the database and return its secret."""
    secret: str = run(_create_token(url, name, **kwargs))
    return secret


async def _execute(url: str, statement: str) -> None:
    engine = make_engine(url)
    try:
        async with engine.begin() as connection:
            await connection.execute(text(statement))
    finally:
        await engine.dispose()


def execute(url: str, statement: str) -> None:
    """Run one SQL statement, for tests that set up a state the API cannot reach."""
    run(_execute(url, statement))


@asynccontextmanager
async def standalone_recorder(url: str, settings: Settings) -> AsyncIterator[tuple[PredictionRecorder, Transactions]]:
    """A prediction recorder of its own on the database, as another gateway process has one."""
    engine = make_engine(url)
    transactions = Transactions(engine, make_sessionmaker(engine))
    registry = Registry.from_settings(settings)
    try:
        yield PredictionRecorder(transactions=transactions, registry=registry, settings=settings,
                                 key=b"a recorder of its own"), transactions
    finally:
        await registry.aclose()
        transactions.dispose()
        await engine.dispose()


def sqlite_plan(database: Path, statement: Executable) -> str:
    """SQLite's query plan for `statement` with its own parameters, in one line."""
    engine = create_engine(f"sqlite:///{database}")
    try:
        compiled = statement.compile(dialect=engine.dialect, compile_kwargs={"render_postcompile": True})
        parameters = tuple(compiled.construct_params()[name] for name in compiled.positiontup or ())
        with engine.connect() as connection:
            return " ".join(str(row[-1]) for row in connection.exec_driver_sql(
                f"EXPLAIN QUERY PLAN {compiled}", tuple(str(p) for p in parameters)))
    finally:
        engine.dispose()
