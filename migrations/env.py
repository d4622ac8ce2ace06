"""Alembic environment: async engine, URL from the caller or from Settings."""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy.engine import Connection

from app.config import Settings
from app.db import make_engine
from app.schema import Base

target_metadata = Base.metadata
MIGRATION_LOCK_ID = 7_271_961


def _database_url() -> str:
    url = context.config.attributes.get("database_url")
    return str(url) if url else Settings().async_database_url


def _driver_pragma(connection: Connection, pragma: str) -> None:
    # On the driver's own cursor: through Core it would first open a transaction, inside which
    # SQLite ignores a change of foreign_keys.
    cursor = connection.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    try:
        cursor.execute(f"PRAGMA {pragma}")
    finally:
        cursor.close()


def _run(connection: Connection) -> None:
    sqlite = connection.dialect.name == "sqlite"
    if sqlite:
        # SQLite's own recipe for rebuilding a table other tables refer to, as batch mode does:
        # foreign keys off outside the transaction, every reference checked before it commits.
        _driver_pragma(connection, "foreign_keys=OFF")
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        compare_type=True,
        render_as_batch=sqlite,
    )
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            # Replicas starting together migrate one after another, never at once.
            connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK_ID})")
        context.run_migrations()
        if sqlite:
            broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
            if broken:
                raise RuntimeError(f"the migration left {len(broken)} broken references, first {broken[0]}")
    if sqlite:
        _driver_pragma(connection, "foreign_keys=ON")


async def _run_online() -> None:
    engine = make_engine(_database_url())
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_run)
            await connection.commit()
    finally:
        await engine.dispose()


def run_migrations_offline() -> None:
    """Emit SQL to standard output instead of connecting."""
    context.configure(url=_database_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    asyncio.run(_run_online())
