"""Database engine, declarative base and the Alembic migration entry points."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from contextvars import ContextVar, Token
from pathlib import Path
from typing import Any, TypeVar

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import (
    Engine,
    MetaData,
    Select,
    bindparam,
    create_engine,
    event,
    inspect,
    make_url,
    select,
)
from sqlalchemy.engine import Connection
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker
from sqlalchemy.pool import SingletonThreadPool

from app import sqlite_inline
from app.config import to_async_url

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

T = TypeVar("T")
READ_ONLY_OPTION = "gateway_read_only"
MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


class Base(DeclarativeBase):
    """Declarative base with stable constraint names on every database."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def make_engine(database_url: str, **kwargs: Any) -> AsyncEngine:
    """An async engine; on SQLite, WAL and write-locking transactions (BEGIN IMMEDIATE)."""
    url = to_async_url(database_url)
    if url.startswith("sqlite"):
        parsed = make_url(url)
        # Statements run on the event loop's thread (app/sqlite_inline.py); readers run side by
        # side in WAL mode, so keep enough connections that a burst never waits for one.
        engine = create_async_engine(
            url, pool_size=20, max_overflow=40,
            async_creator=sqlite_inline.connector(parsed.database or "", uri=parsed.query.get("uri") == "true"),
            **kwargs,
        )
        _configure_sqlite(engine)
        return engine
    connect_args = {"server_settings": {"timezone": "UTC"}}
    return create_async_engine(
        url, pool_size=10, max_overflow=20, pool_pre_ping=True, connect_args=connect_args, **kwargs
    )


def _on_connect_pragmas(engine: Engine, *pragmas: str) -> None:
    # isolation_level None: transactions begin only where our "begin" listeners say.
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        for pragma in pragmas:
            cursor.execute(f"PRAGMA {pragma}")
        cursor.close()


def _configure_sqlite(engine: AsyncEngine) -> None:
    # No busy_timeout: a lock held by another process is waited out without blocking the
    # event loop (app/sqlite_inline.py).
    _on_connect_pragmas(engine.sync_engine, "journal_mode=WAL", "foreign_keys=ON", "synchronous=NORMAL")

    # SQLAlchemy's documented pysqlite recipe: take the write lock when a transaction
    # begins, so read-then-write transactions never fail with "database is locked".
    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(connection: Connection) -> None:
        # Readers take no lock in WAL mode; only sessions that may write queue for the write lock.
        if connection.get_execution_options().get(READ_ONLY_OPTION):
            connection.exec_driver_sql("BEGIN")
        else:
            connection.exec_driver_sql("BEGIN IMMEDIATE")


_holding_write_lock: ContextVar[bool] = ContextVar("holding_write_lock", default=False)


class QueuedWriteSession(AsyncSession):
    """A SQLite session that first queues on its process's write lock.

    SQLite lets one writer in at a time, and a writer that finds the lock taken sleeps and
    retries in SQLite's busy handler, on a pooled connection's thread, for up to hundreds of
    milliseconds a try. Queuing in the event loop instead hands the lock over in arrival order
    the moment it is free. A session opened while the task already holds the lock does not
    queue again (that would deadlock); other processes are still kept out by SQLite itself."""

    def __init__(self, *args: Any, write_lock: asyncio.Lock, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._write_lock = write_lock
        self._holding: Token[bool] | None = None

    async def __aenter__(self) -> QueuedWriteSession:
        if not _holding_write_lock.get():
            await self._write_lock.acquire()
            self._holding = _holding_write_lock.set(True)
        return self

    async def __aexit__(self, type_: Any, value: Any, traceback: Any) -> None:
        try:
            await super().__aexit__(type_, value, traceback)
        finally:
            if self._holding is not None:
                _holding_write_lock.reset(self._holding)
                self._holding = None
                self._write_lock.release()


def make_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Sessions that keep loaded rows usable after commit (queued for the write lock on SQLite)."""
    if engine.dialect.name == "sqlite":
        return async_sessionmaker(engine, class_=QueuedWriteSession, expire_on_commit=False,
                                  write_lock=asyncio.Lock())
    return async_sessionmaker(engine, expire_on_commit=False)


def make_read_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Sessions for reads only: on SQLite they neither take nor wait for the write lock, so a
    session made here must never write (its deferred transaction could not upgrade safely)."""
    return async_sessionmaker(engine.execution_options(**{READ_ONLY_OPTION: True}), expire_on_commit=False)


_BY_KEY: dict[type[Any], tuple[Select[Any], list[str]]] = {}


def _by_key(entity: type[Any]) -> tuple[Select[Any], list[str]]:
    found = _BY_KEY.get(entity)
    if found is None:
        mapper = inspect(entity)
        (key_column,) = mapper.primary_key
        columns = list(mapper.local_table.columns)
        found = (select(*columns).where(key_column == bindparam("key")),
                 [mapper.get_property_by_column(column).key for column in columns])
        _BY_KEY[entity] = found
    return found


def entity_by_key(connection: Connection, entity: type[T], ident: Any) -> T | None:
    """A row by primary key as a new, session-less object (never add it to a session).

    Built from a keyed Core select: the ORM's identity map and loaders cost more than the read."""
    statement, keys = _by_key(entity)
    row = connection.execute(statement, {"key": ident}).first()
    return None if row is None else entity(**dict(zip(keys, row, strict=True)))


def _sync_sqlite_engine(engine: AsyncEngine) -> Engine:
    # One plain connection per thread: used only from the event loop's thread.
    return create_engine(engine.url.set(drivername="sqlite"), poolclass=SingletonThreadPool,
                         connect_args={"check_same_thread": True})


class HotReads:
    """The two reads every API request makes (a token by its hash, a prediction by its id).

    On SQLite they run on the event loop's own thread with a plain connection: a keyed read of
    a WAL database takes tens of microseconds and never waits for a writer, while a hop to an
    aiosqlite thread and back costs far more than the read itself. On PostgreSQL they use an
    ordinary read session."""

    def __init__(self, engine: AsyncEngine, read_sessions: async_sessionmaker[AsyncSession]) -> None:
        self._read_sessions = read_sessions
        self._sync: sessionmaker[Session] | None = None
        self._sync_engine: Engine | None = None
        if engine.dialect.name == "sqlite":
            self._sync_engine = _sync_sqlite_engine(engine)
            _configure_sync_sqlite_reader(self._sync_engine)
            self._sync = sessionmaker(self._sync_engine, expire_on_commit=False)

    async def get(self, entity: type[T], ident: Any) -> T | None:
        """A row by primary key (on SQLite a new, session-less object; never write it back)."""
        if self._sync_engine is not None:
            with self._sync_engine.connect() as connection:
                return entity_by_key(connection, entity, ident)
        async with self._read_sessions() as session:
            return await session.get(entity, ident)

    async def first(self, query: Select[Any]) -> Any:
        """The first entity a query selects, or None."""
        if self._sync is not None:
            with self._sync() as session:
                return session.scalars(query).first()
        async with self._read_sessions() as session:
            return (await session.scalars(query)).first()

    def dispose(self) -> None:
        """Close the loop thread's connection."""
        if self._sync_engine is not None:
            self._sync_engine.dispose()


_Waiting = tuple[Callable[[Connection], Any], "asyncio.Future[Any]"]


class Transactions:
    """Write transactions written as synchronous functions of a Core connection.

    On SQLite the function runs on the event loop's thread over a plain connection, after
    queuing on the same write lock as the write sessions, and nothing else runs on the loop
    until it commits. Its statements then cost what SQLite and Core cost, without the async
    session's greenlet switch and adapter hop around every statement, which took about three
    quarters of a one-statement transaction's CPU. The functions handed in while one batch
    waits for the lock commit together (group commit), each in its own savepoint: a commit
    writes every page the transaction touched to the log, and requests that arrive together
    share the pages of the same tables and indexes. Each caller is answered only once its work
    is committed, and a function that raises undoes its own work alone.

    On PostgreSQL the same function runs in its own transaction on an async connection through
    `run_sync`. The function must not wait on anything but the database, and a caller already
    inside a write session must not use this (deadlock)."""

    def __init__(self, engine: AsyncEngine, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._engine = engine
        self._sync_engine: Engine | None = None
        self._write_lock: asyncio.Lock | None = sessions.kw.get("write_lock")
        self._waiting: list[_Waiting] = []
        self._committer: asyncio.Task[None] | None = None
        if engine.dialect.name == "sqlite":
            self._sync_engine = _sync_sqlite_engine(engine)
            _configure_sync_sqlite_writer(self._sync_engine)

    async def run(self, work: Callable[[Connection], T]) -> T:
        """Run `work` in a transaction: its writes are committed when this returns, and rolled
        back when it raises (with what `work` raised)."""
        if self._sync_engine is None:
            async with self._engine.begin() as connection:
                return await connection.run_sync(work)
        if _holding_write_lock.get() or self._write_lock is None:
            raise RuntimeError("a write transaction cannot start inside a write session")
        done: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._waiting.append((work, done))
        if self._committer is None:
            self._committer = asyncio.ensure_future(self._commit_waiting(self._sync_engine, self._write_lock))
        return await done

    def _take_waiting(self) -> list[_Waiting]:
        batch, self._waiting, self._committer = self._waiting, [], None
        return batch

    async def _commit_waiting(self, engine: Engine, lock: asyncio.Lock) -> None:
        taken: list[_Waiting] | None = None
        try:
            async with lock:
                with engine.connect() as connection:
                    try:
                        await _begin_immediate(connection)
                    finally:
                        # From here to the commit nothing awaits: later callers make the next batch.
                        taken = self._take_waiting()
                    _run_batch(connection, [(work, done) for work, done in taken if not done.done()])
        except BaseException as error:
            for _, done in taken if taken is not None else self._take_waiting():
                if done.done():
                    continue
                if isinstance(error, Exception):
                    done.set_exception(error)
                else:
                    done.cancel()
            if not isinstance(error, Exception):
                raise

    def dispose(self) -> None:
        """Close the loop thread's connection."""
        if self._sync_engine is not None:
            self._sync_engine.dispose()


def _run_batch(connection: Connection, batch: list[_Waiting]) -> None:
    """Each work in its own savepoint (when there are several), one commit, then the answers."""
    outcomes: list[tuple[bool, Any]] = []
    alone = len(batch) == 1
    for work, _ in batch:
        savepoint = None if alone else connection.begin_nested()
        try:
            outcomes.append((True, work(connection)))
        except Exception as error:
            if savepoint is not None:
                savepoint.rollback()
            else:  # alone: nothing of it may be committed
                connection.rollback()
            outcomes.append((False, error))
        else:
            if savepoint is not None:
                savepoint.commit()
    try:
        if connection.in_transaction():
            connection.commit()
    except Exception as error:
        connection.rollback()
        outcomes = [(False, error)] * len(batch)
    for (_, done), (succeeded, value) in zip(batch, outcomes, strict=True):
        if done.done():
            continue
        if succeeded:
            done.set_result(value)
        else:
            done.set_exception(value)


async def _begin_immediate(connection: Connection) -> None:
    # Another process may hold SQLite's write lock: wait it out without blocking the loop.
    deadline = time.monotonic() + sqlite_inline.LOCK_WAIT_SECONDS
    for pause in sqlite_inline.pauses():
        try:
            connection.begin()
            return
        except OperationalError as error:
            if not sqlite_inline.locked(error.orig) or time.monotonic() >= deadline:
                raise
        await asyncio.sleep(pause)


def _configure_sync_sqlite_writer(engine: Engine) -> None:
    # busy_timeout=0: SQLite's busy handler would sleep on the loop's thread (_begin_immediate).
    _on_connect_pragmas(engine, "busy_timeout=0", "foreign_keys=ON", "synchronous=NORMAL")

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def _configure_sync_sqlite_reader(engine: Engine) -> None:
    # A reader must never stall the event loop for long; WAL readers do not wait for
    # writers, so this only covers the rare moment a checkpoint resets the log.
    _on_connect_pragmas(engine, "busy_timeout=200", "query_only=ON")


def alembic_config(database_url: str) -> Config:
    """An Alembic configuration for our migrations and the given database."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["database_url"] = to_async_url(database_url)
    return config


def migrate(database_url: str, revision: str = "head") -> None:
    """Apply pending migrations (blocking; call it outside a running event loop)."""
    command.upgrade(alembic_config(database_url), revision)


async def schema_is_current(engine: AsyncEngine) -> bool:
    """Whether the database is at the newest migration this code expects."""
    head = ScriptDirectory.from_config(alembic_config(str(engine.url))).get_current_head()

    def current(connection: Connection) -> str | None:
        return MigrationContext.configure(connection).get_current_revision()

    async with engine.connect() as connection:
        revision = await connection.run_sync(current)
    return revision == head


def run_sync(coro: Any) -> Any:
    """Run a coroutine to completion from synchronous code such as the CLI."""
    return asyncio.run(coro)
