"""Database engine, declarative base and the Alembic migration entry points."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import socket
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar, Token
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import orjson
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import (
    ColumnElement,
    Engine,
    MetaData,
    Select,
    bindparam,
    create_engine,
    event,
    false,
    func,
    inspect,
    literal,
    make_url,
    select,
)
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.exc import DBAPIError, DisconnectionError, MissingGreenlet, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker
from sqlalchemy.orm.instrumentation import manager_of_class
from sqlalchemy.pool import PoolProxiedConnection, QueuePool, SingletonThreadPool
from sqlalchemy.sql.base import Executable
from sqlalchemy.sql.dml import UpdateBase
from sqlalchemy.util import greenlet_spawn

from app import sqlite_inline
from app.columns import utcnow
from app.config import DEFAULT_POOL_SIZE, to_async_url

log = logging.getLogger(__name__)

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


def json_text(value: Any) -> str:
    """A JSON column's text on SQLite: orjson's, or the standard library's for what orjson
    refuses (integers past 64 bits, keys that are not strings).

    The standard library's encoder took a fiftieth of a create's CPU for its two JSON columns."""
    try:
        return orjson.dumps(value).decode()
    except TypeError:
        return json.dumps(value)


# SQLSTATE classes and codes of a server that cannot take statements now: connection exceptions,
# insufficient resources (too many connections, disk full), shutting down or starting up, and a
# server that became a read-only standby in a failover.
_UNAVAILABLE_SQLSTATES = ("08", "53", "57P01", "57P02", "57P03", "25006")
# character_not_in_repertoire and untranslatable_character.
_UNSTORABLE_TEXT_SQLSTATES = frozenset(("22021", "22P05"))
_UNREACHABLE_ERRNOS = frozenset((errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN, errno.EHOSTDOWN))
_UNAVAILABLE_SQLITE = ("database is locked", "database table is locked", "disk i/o error",
                       "unable to open database file", "database or disk is full")


def database_unavailable(error: BaseException) -> bool:
    """Whether `error` says the database could not be reached or could not take a statement now
    (a restart, a failover, a cut network, the pool exhausted, SQLite's lock held past its wait),
    as opposed to a statement or a value being wrong: the one is worth retrying, the other not."""
    if isinstance(error, PoolTimeout | DisconnectionError):
        return True
    if isinstance(error, DBAPIError):
        return error.connection_invalidated or _driver_unavailable(error.orig)
    return _driver_unavailable(error)


def unstorable_text(error: BaseException) -> bool:
    """Whether `error` is PostgreSQL refusing a text value it cannot hold (a NUL character, or
    one its encoding lacks): a value sent in the request, not the database being wrong."""
    sqlstate = getattr(error.orig if isinstance(error, DBAPIError) else error, "sqlstate", None)
    return sqlstate in _UNSTORABLE_TEXT_SQLSTATES


def _driver_unavailable(error: BaseException | None) -> bool:
    # asyncpg raises the socket's own errors when it cannot connect; its other errors, and
    # SQLAlchemy's adaptations of them, carry the server's SQLSTATE.
    if isinstance(error, ConnectionError | TimeoutError | socket.gaierror):
        return True
    if isinstance(error, OSError) and error.errno in _UNREACHABLE_ERRNOS:
        return True
    sqlstate = getattr(error, "sqlstate", None)
    if isinstance(sqlstate, str) and sqlstate.startswith(_UNAVAILABLE_SQLSTATES):
        return True
    return isinstance(error, sqlite3.OperationalError) and str(error).lower().startswith(_UNAVAILABLE_SQLITE)


def make_engine(database_url: str, *, pool_size: int = DEFAULT_POOL_SIZE, **kwargs: Any) -> AsyncEngine:
    """An async engine; on SQLite, WAL and write-locking transactions (BEGIN IMMEDIATE); on
    PostgreSQL, at most `pool_size` connections, each opened once and kept."""
    url = to_async_url(database_url)
    if url.startswith("sqlite"):
        parsed = make_url(url)
        # Statements run on the event loop's thread (app/sqlite_inline.py); readers run side by
        # side in WAL mode, so keep enough connections that a burst never waits for one.
        engine = create_async_engine(
            url, pool_size=20, max_overflow=40, hide_parameters=True,
            async_creator=sqlite_inline.connector(parsed.database or "", uri=parsed.query.get("uri") == "true"),
            json_serializer=json_text, **kwargs,
        )
        _configure_sqlite(engine)
        return engine
    connect_args: dict[str, Any] = {"server_settings": {"timezone": "UTC"}}
    if make_url(url).get_driver_name() == "asyncpg":
        connect_args["async_creator_fn"] = _AsyncpgConnect
    # No overflow: connections past the pool's size were closed as soon as they were given back,
    # so under load every few statements paid for a new server process, its TLS negotiation and
    # asyncpg's statement preparation again (creates at 64 concurrent ran at 220 a second where a
    # pool of ten kept connections, with waits for a free one, ran 550). A request that finds every
    # connection busy waits for one.
    engine = create_async_engine(url, pool_size=pool_size, max_overflow=0, connect_args=connect_args,
                                 hide_parameters=True, **kwargs)
    _replace_closed_connections(engine)
    return engine


class _AsyncpgConnect:
    """asyncpg's connect, begun only when awaited. DirectStatements first takes a connection from
    the pool without a greenlet; when the pool must open one instead, SQLAlchemy refuses
    (MissingGreenlet) after it has called the driver's connect, and a coroutine made by that call
    and never awaited is reported as a RuntimeWarning: after a database restart, one for each
    connection replaced."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._args, self._kwargs = args, kwargs

    def __await__(self) -> Any:
        import asyncpg  # type: ignore[import-untyped]

        return asyncpg.connect(*self._args, **self._kwargs).__await__()


def _replace_closed_connections(engine: AsyncEngine) -> None:
    # In place of pool_pre_ping, whose ping on asyncpg is three round trips (BEGIN, a query,
    # ROLLBACK) before every transaction, as many as a one-statement transaction takes.
    # A connection the server ended (a restart, a failover, an idle timeout) is closed by
    # asyncpg as soon as the loop reads its end; the pool then swaps it for a new one.
    @event.listens_for(engine.sync_engine, "checkout")
    def _on_checkout(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
        if dbapi_connection.driver_connection.is_closed():
            raise DisconnectionError("the server closed this connection")


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


def database_now(connection: Connection) -> datetime:
    """The database's clock where it has a real one (PostgreSQL), this process's otherwise: the
    leases several instances take are compared against one clock."""
    if connection.dialect.name == "postgresql":
        moment = connection.scalar(select(func.now()))
        if isinstance(moment, datetime):
            return moment
    return utcnow()


async def session_now(session: AsyncSession) -> datetime:
    """`database_now` for a session; no round trip where the clock is this process's own."""
    if session.get_bind().dialect.name != "postgresql":
        return utcnow()
    return await session.run_sync(lambda sync: database_now(sync.connection()))


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


class Prepared:
    """A write statement compiled once per parameter set and, on SQLite, run as the driver's SQL.

    Core's `execute` builds the statement's cache key, looks its compiled form up and sets up an
    execution context on every call. For the handful of writes each prediction makes, that cost
    three to four times what SQLite takes to run them (an admission update: 29 µs against 7 µs,
    measured by hand); here the compiled SQL, the order of its parameters and their type
    processing are worked out once. Inside a transaction on pysqlite it runs on the driver's
    cursor: Core's execution context around driver SQL still cost 7 µs a statement. Driver errors
    are raised as Core raises them (IntegrityError and the like). Statements this cannot plan
    (expanding or callable parameters, RETURNING, a missing value) and other databases go through
    Core as usual (on PostgreSQL only inside a transaction: a statement alone runs on the driver,
    `DirectStatements`)."""

    __slots__ = ("_plans", "statement")

    def __init__(self, statement: UpdateBase) -> None:
        self.statement = statement
        self._plans: dict[tuple[type[Dialect], tuple[str, ...]], _Plan | None] = {}

    def execute(self, connection: Connection, parameters: Mapping[str, Any]) -> int:
        """Execute with these parameters; the number of rows it matched."""
        dialect = connection.dialect
        if dialect.name != "sqlite":
            return connection.execute(self.statement, parameters).rowcount
        key = (type(dialect), tuple(parameters))
        try:
            plan = self._plans[key]
        except KeyError:
            plan = self._plans[key] = _plan(self.statement, dialect, key[1])
        if plan is None:
            return connection.execute(self.statement, parameters).rowcount
        sql, slots = plan
        values = _values(slots, parameters)
        if dialect.driver != "pysqlite" or not connection.in_transaction():
            # Core's autobegin (and its "begin" listeners) must open the transaction.
            return connection.exec_driver_sql(sql, tuple(values)).rowcount
        cursor = connection.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        try:
            cursor.execute(sql, values)
            return int(cursor.rowcount)
        except dialect.loaded_dbapi.Error as error:
            raise DBAPIError.instance(sql, values, error, dialect.loaded_dbapi.Error, dialect=dialect) from error
        finally:
            cursor.close()


def in_values(column: ColumnElement[Any], values: Iterable[Any]) -> ColumnElement[bool]:
    """`column IN (values)` with one plain parameter per value (false when there are none).

    Core's `in_` with plain values binds them as one expanding parameter, rendered anew on every
    execution, which `Prepared` cannot plan."""
    parameters = [literal(value, column.type) for value in values]
    return column.in_(parameters) if parameters else false()


_GIVEN = object()
# The SQL, then for each positional parameter: its name, its fixed value (or _GIVEN when the
# caller gives it) and its type's bind processor.
_Plan = tuple[str, tuple[tuple[str, Any, Callable[[Any], Any] | None], ...]]


def _plan(statement: Executable, dialect: Dialect, names: tuple[str, ...]) -> _Plan | None:
    compiled = statement.compile(dialect=dialect, column_keys=list(names))  # type: ignore[attr-defined]
    if (compiled.effective_returning or not compiled.positional or compiled.positiontup is None
            or compiled.post_compile_params or compiled.literal_execute_params or compiled.escaped_bind_names
            or compiled.insert_prefetch or compiled.update_prefetch):
        return None
    given = set(names)
    slots = []
    for name in compiled.positiontup:
        bind = compiled.binds.get(name)
        if bind is None or bind.callable is not None or (name not in given and bind.required):
            return None
        processor = bind.type.dialect_impl(dialect).bind_processor(dialect)
        slots.append((name, _GIVEN if name in given else bind.value, processor))
    return compiled.string, tuple(slots)


def _values(slots: tuple[tuple[str, Any, Callable[[Any], Any] | None], ...], parameters: Mapping[str, Any]) -> list[Any]:
    """A plan's positional values for these parameters, each processed as Core processes it."""
    values = []
    for name, fixed, processor in slots:
        value = parameters[name] if fixed is _GIVEN else fixed
        values.append(value if processor is None else processor(value))
    return values


_BY_KEY: dict[type[Any], tuple[Select[Any], list[str]]] = {}
# Per driver's dialect and entity: the keyed select's SQL, its key's bind processor and each
# column's result processor.
_BY_KEY_SQL: dict[tuple[type[Dialect], type[Any]], tuple[str, Any, list[Any]]] = {}


def _by_key(entity: type[Any]) -> tuple[Select[Any], list[str]]:
    found = _BY_KEY.get(entity)
    if found is None:
        mapper = inspect(entity)
        (key_column,) = mapper.primary_key
        columns = list(mapper.local_table.columns)
        found = (select(*columns).where(key_column == bindparam("key", type_=key_column.type)),
                 [mapper.get_property_by_column(column).key for column in columns])
        _BY_KEY[entity] = found
    return found


def _by_key_sql(dialect: Dialect, entity: type[Any]) -> tuple[str, Any, list[Any]]:
    found = _BY_KEY_SQL.get((type(dialect), entity))
    if found is None:
        statement, _ = _by_key(entity)
        (key_column,) = inspect(entity).primary_key
        found = (statement.compile(dialect=dialect).string,
                 key_column.type.dialect_impl(dialect).bind_processor(dialect),
                 [column.type.dialect_impl(dialect).result_processor(dialect, None)
                  for column in statement.selected_columns])
        _BY_KEY_SQL[(type(dialect), entity)] = found
    return found


def detached(entity: type[T], /, **values: Any) -> T:
    """A new, session-less object holding these attribute values (never add it to a session).

    Made without the mapped constructor, whose attribute events cost about 30 µs for a
    prediction's thirty-odd columns: these objects are only read and written back by Core."""
    instance: T = manager_of_class(entity).new_instance()
    instance.__dict__.update(values)
    return instance


def entity_by_key(connection: Connection, entity: type[T], ident: Any) -> T | None:
    """A row by primary key as a new, session-less object (never add it to a session).

    Built from a keyed select (`detached`): the ORM's identity map and loaders cost more than
    the read. On pysqlite, where this read runs on the loop's thread for every GET and every
    recorded state, the select is compiled once and run on the driver's cursor. Core's select
    and the mapped constructor took about 65 µs, four times as long (measured by hand)."""
    statement, keys = _by_key(entity)
    driver = connection.connection.dbapi_connection if connection.dialect.driver == "pysqlite" else None
    if driver is None:
        row = connection.execute(statement, {"key": ident}).first()
        return None if row is None else detached(entity, **dict(zip(keys, row, strict=True)))
    sql, key_processor, processors = _by_key_sql(connection.dialect, entity)
    cursor = driver.cursor()
    try:
        cursor.execute(sql, (ident if key_processor is None else key_processor(ident),))
        raw = cursor.fetchone()
    finally:
        cursor.close()
    return _processed(entity, keys, raw, processors)


def _processed(entity: type[T], keys: list[str], raw: Any, processors: list[Any]) -> T | None:
    """A keyed select's driver row (or None) as a session-less object, each value processed."""
    if raw is None:
        return None
    return detached(entity, **{key: value if processor is None else processor(value)
                               for key, value, processor in zip(keys, raw, processors, strict=True)})


class DirectStatements:
    """Single statements run alone: on asyncpg straight on a pooled driver connection, in no
    transaction; with other drivers through Core, each in a transaction of its own.

    On PostgreSQL one update through Core's async connection (the checkout, `run_sync`'s greenlet,
    Core's execution context, the adapter's cursor) took 640 µs of the gateway's CPU, where
    asyncpg's own call took 130 µs and taking an idle connection from the pool 15 µs (measured by
    hand on loopback). Here each statement is compiled once per set of parameter names, its
    values go through their types' bind processors as Core's would, and asyncpg prepares it once
    per connection (its statement cache). Errors are raised as Core raises them (IntegrityError
    and the like). A connection is given back to the pool only after a success or an error the
    server reported; after any other failure or a cancellation its state is in doubt, and it is
    closed and replaced instead."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._pool = engine.sync_engine.pool
        self._dialect = engine.sync_engine.dialect
        self._on_driver = self._dialect.driver == "asyncpg"
        self._server_error: type[Exception] = self._dialect.loaded_dbapi.asyncpg.PostgresError if self._on_driver else Exception
        # Keyed by the statement's id: each plan keeps its statement, so the id is never reused.
        self._plans: dict[tuple[int, tuple[str, ...]], tuple[Executable, _Plan]] = {}

    async def rowcount(self, statement: Executable, parameters: Mapping[str, Any]) -> int:
        """Run a write; the number of rows it matched."""
        if not self._on_driver:
            async with self._engine.begin() as connection:
                return (await connection.execute(statement, parameters)).rowcount
        status = await self._run(statement, parameters, lambda driver, sql, values: driver.execute(sql, *values))
        # "UPDATE 1", "DELETE 0", "INSERT 0 1": the count comes last.
        return int(str(status).rpartition(" ")[2])

    async def scalar(self, statement: Executable, parameters: Mapping[str, Any]) -> Any:
        """Run a statement; the first column of its first row (None when it has no rows)."""
        if not self._on_driver:
            async with self._engine.begin() as connection:
                return (await connection.execute(statement, parameters)).scalar()
        return await self._run(statement, parameters, lambda driver, sql, values: driver.fetchval(sql, *values))

    async def entity(self, entity: type[T], ident: Any) -> T | None:
        """A row by primary key as a new, session-less object (`entity_by_key`)."""
        if not self._on_driver:
            async with self._engine.connect() as connection:
                return await connection.run_sync(lambda sync: entity_by_key(sync, entity, ident))
        sql, key_processor, processors = _by_key_sql(self._dialect, entity)
        _, keys = _by_key(entity)
        values = [ident if key_processor is None else key_processor(ident)]
        return _processed(entity, keys, await self._sent(sql, values, lambda driver: driver.fetchrow(sql, *values)),
                          processors)

    async def _run(self, statement: Executable, parameters: Mapping[str, Any],
                   call: Callable[[Any, str, list[Any]], Awaitable[Any]]) -> Any:
        names = tuple(parameters)
        found = self._plans.get((id(statement), names))
        if found is None:
            plan = _plan(statement, self._dialect, names)
            if plan is None:
                raise ValueError(f"this statement cannot run on the driver: {statement}")
            found = self._plans[(id(statement), names)] = (statement, plan)
        sql, slots = found[1]
        values = _values(slots, parameters)
        return await self._sent(sql, values, lambda driver: call(driver, sql, values))

    async def _sent(self, sql: str, values: list[Any], call: Callable[[Any], Awaitable[Any]]) -> Any:
        connection = await self._connection()
        driver: Any = connection.driver_connection
        try:
            result = await call(driver)
        except BaseException as error:
            if isinstance(error, self._server_error) and not driver.is_closed():
                connection.close()
            else:
                connection.invalidate(error if isinstance(error, Exception) else None)
            if isinstance(error, Exception):
                translated = _as_core_error(self._dialect, sql, values, error)
                if translated is not error:
                    raise translated from error
            raise
        connection.close()
        return result

    async def _connection(self) -> PoolProxiedConnection:
        # Taking an idle connection awaits nothing. Opening one, replacing one the server closed
        # and waiting for one to be given back await inside SQLAlchemy's pool, which needs the
        # greenlet its async engine runs sync code in (its own MissingGreenlet otherwise).
        if isinstance(self._pool, QueuePool) and self._pool.checkedin():
            try:
                return self._pool.connect()
            except MissingGreenlet:
                pass
        return await greenlet_spawn(self._pool.connect)


def _as_core_error(dialect: Dialect, sql: str, values: list[Any], error: Exception) -> Exception:
    """An asyncpg error as Core raises it (IntegrityError and the like), through the dialect's own
    translation; any other error as it is."""
    from sqlalchemy.dialects.postgresql.asyncpg import AsyncAdapt_asyncpg_connection

    dbapi = dialect.loaded_dbapi
    try:
        AsyncAdapt_asyncpg_connection._handle_exception_no_connection(dbapi, error)
    except dbapi.Error as translated:
        return DBAPIError.instance(sql, values, translated, dbapi.Error, hide_parameters=True, dialect=dialect)
    except Exception as untranslated:  # the error itself, raised again as it came
        return untranslated
    return error


def _sync_sqlite_engine(engine: AsyncEngine, *, other_threads: int = 0) -> Engine:
    """A plain sqlite3 engine on the same file: by default one connection, used only from the
    event loop's thread; with `other_threads`, a pool of that many for threads of their own."""
    if other_threads:
        return create_engine(engine.url.set(drivername="sqlite"), poolclass=QueuePool, pool_size=other_threads,
                             max_overflow=0, connect_args={"check_same_thread": False}, json_serializer=json_text)
    return create_engine(engine.url.set(drivername="sqlite"), poolclass=SingletonThreadPool,
                         connect_args={"check_same_thread": True}, json_serializer=json_text)


class HotReads:
    """The two reads every API request makes (a token by its hash, a prediction by its id).

    On SQLite they run on the event loop's own thread with a plain connection: a keyed read of
    a WAL database takes tens of microseconds and never waits for a writer, while a hop to an
    aiosqlite thread and back costs far more than the read itself. On PostgreSQL they use an
    ordinary read session, but for the prediction by its id: one statement on the driver
    (`DirectStatements`), without the session's BEGIN and ROLLBACK."""

    def __init__(self, engine: AsyncEngine, read_sessions: async_sessionmaker[AsyncSession]) -> None:
        self._read_sessions = read_sessions
        self._sync: sessionmaker[Session] | None = None
        self._sync_engine: Engine | None = None
        self._direct = DirectStatements(engine)
        if engine.dialect.name == "sqlite":
            self._sync_engine = _sync_sqlite_engine(engine)
            _configure_sync_sqlite_reader(self._sync_engine)
            self._sync = sessionmaker(self._sync_engine, expire_on_commit=False)

    @property
    def on_loop_thread(self) -> bool:
        """Whether these reads run on the event loop's thread (SQLite): cheap, and lock-free."""
        return self._sync_engine is not None

    async def get(self, entity: type[T], ident: Any) -> T | None:
        """A row by primary key as a new, session-less object (never write it back)."""
        if self._sync_engine is not None:
            with self._sync_engine.connect() as connection:
                return entity_by_key(connection, entity, ident)
        return await self._direct.entity(entity, ident)

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


REPORTS_AT_ONCE = 2


class ReportReads:
    """Reads that walk many rows at once: usage reports and their exports.

    On SQLite every other statement runs on the event loop's thread, where a year's report by
    day, token and model (tens of thousands of groups) held up every request for half a second.
    These run on a thread of their own with their own read-only connection instead, which WAL
    lets read beside the writer; at most two at a time, so exports cannot take every thread.
    On PostgreSQL the driver waits without holding the loop, so they use a read session there;
    folding the rows into the report still runs on the loop's thread."""

    def __init__(self, engine: AsyncEngine, read_sessions: async_sessionmaker[AsyncSession]) -> None:
        self._read_sessions = read_sessions
        self._sync_engine: Engine | None = None
        self._running = asyncio.Semaphore(REPORTS_AT_ONCE)
        if engine.dialect.name == "sqlite":
            self._sync_engine = _sync_sqlite_engine(engine, other_threads=REPORTS_AT_ONCE)
            # Off the loop a reader may wait for a checkpoint as long as any query would.
            _on_connect_pragmas(self._sync_engine, "busy_timeout=10000", "query_only=ON")

    async def run(self, work: Callable[[Connection], T]) -> T:
        """`work` on a connection that only reads, in one transaction, and its result."""
        async with self._running:
            engine = self._sync_engine
            if engine is not None:
                return await asyncio.to_thread(self._in_thread, engine, work)
            async with self._read_sessions() as session:
                # One snapshot for all of a report's statements: a prediction settled between
                # two of them is counted once, in one of them.
                connection = await session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
                return await connection.run_sync(work)

    @staticmethod
    def _in_thread(engine: Engine, work: Callable[[Connection], T]) -> T:
        with engine.connect() as connection:
            # sqlite3 begins no transaction for reads: without this, each statement would read
            # the database as it is by then.
            connection.exec_driver_sql("BEGIN")
            return work(connection)

    def dispose(self) -> None:
        """Close the thread's connections."""
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
        self._autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
        self._sync_engine: Engine | None = None
        self._write_lock: asyncio.Lock | None = sessions.kw.get("write_lock")
        self._waiting: list[_Waiting] = []
        self._committer: asyncio.Task[None] | None = None
        self._connection: Connection | None = None
        self._checkpointer: WalCheckpointer | None = None
        self._direct: DirectStatements | None = None
        if engine.dialect.name != "sqlite":
            self._direct = DirectStatements(engine)
        else:
            self._sync_engine = _sync_sqlite_engine(engine)
            _configure_sync_sqlite_writer(self._sync_engine)
            database = self._sync_engine.url.database
            if database and database != ":memory:" and not database.startswith("file:"):
                self._checkpointer = WalCheckpointer(database)

    @property
    def direct(self) -> DirectStatements:
        """Single statements run alone, outside any transaction: not on SQLite, where every write
        waits for its turn on the one writer and commits in a group."""
        if self._direct is None:
            raise RuntimeError("SQLite's writes go through run(), in groups")
        return self._direct

    @property
    def groups_commits(self) -> bool:
        """Whether works run inline and commit in groups (SQLite), rather than each in its own
        transaction over the network (PostgreSQL)."""
        return self._sync_engine is not None

    async def run(self, work: Callable[[Connection], T], *, one_write: bool = False) -> T:
        """Run `work` in a transaction: its writes are committed when this returns, and rolled
        back when it raises (with what `work` raised).

        `one_write` promises that `work` makes at most one write, which is atomic by itself: on
        PostgreSQL it then runs without BEGIN and COMMIT, one round trip instead of three."""
        if self._sync_engine is None:
            if one_write:
                async with self._autocommit.connect() as connection:
                    return await connection.run_sync(work)
            async with self._engine.begin() as connection:
                return await connection.run_sync(work)
        if _holding_write_lock.get() or self._write_lock is None:
            raise RuntimeError("a write transaction cannot start inside a write session")
        done: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._waiting.append((work, done))
        if self._committer is None:
            self._committer = asyncio.ensure_future(self._commit_waiting(self._sync_engine, self._write_lock))
        return await done

    def _writer(self, engine: Engine) -> Connection:
        # One connection kept for all batches: checking one out of the pool and wrapping it
        # cost more than the BEGIN and COMMIT of a small batch (33 µs against 19 µs).
        if self._connection is None or self._connection.closed or self._connection.invalidated:
            self._connection = engine.connect()
        return self._connection

    def _take_waiting(self) -> list[_Waiting]:
        batch, self._waiting, self._committer = self._waiting, [], None
        return batch

    async def _commit_waiting(self, engine: Engine, lock: asyncio.Lock) -> None:
        taken: list[_Waiting] | None = None
        try:
            # One turn of the loop first: what that turn's network events hand in (the next
            # creates, the answers just read) joins this batch. A commit writes each page its
            # works dirtied once, and works that arrive together share most of their pages (the
            # last pages of the time-ordered indexes, the token's row). Under the 50 ms relay
            # this cut a create's CPU by a tenth in two interleaved comparisons of three (the
            # third was even), at the cost of one turn's wait.
            await asyncio.sleep(0)
            async with lock:
                connection = self._writer(engine)
                try:
                    try:
                        await _begin_immediate(connection)
                    finally:
                        # From here to the commit nothing awaits: later callers make the next batch.
                        taken = self._take_waiting()
                    _run_batch(connection, [(work, done) for work, done in taken if not done.done()])
                    if self._checkpointer is not None:
                        self._checkpointer.committed(lock)
                finally:
                    if connection.in_transaction():
                        connection.rollback()
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
        """Close the loop thread's connection (and the checkpointer's, after its last run)."""
        if self._checkpointer is not None:
            self._checkpointer.close()
            self._checkpointer = None
        if self._connection is not None:
            self._connection.close()
            self._connection = None
        if self._sync_engine is not None:
            self._sync_engine.dispose()


def commits_per_checkpoint(frames: int, commits: int, target_frames: int) -> int:
    """How many commits to let pass before the next checkpoint, so that the log holds about
    `target_frames` pages when it starts: `commits` commits just wrote `frames` pages."""
    if frames <= 0 or commits <= 0:
        return WalCheckpointer.MIN_COMMITS
    wanted = int(target_frames * commits / frames)
    return max(WalCheckpointer.MIN_COMMITS, min(WalCheckpointer.MAX_COMMITS, wanted))


class WalCheckpointer:
    """Checkpoints the write-ahead log on a thread of its own, once it holds about a thousand pages.

    With SQLite's automatic checkpoint, the commit that filled the log copied it into the
    database and synced both files on the event loop's thread: one commit in sixty took 4 to
    7 ms instead of 80 µs, and those stalls were 40% of all commit time under load. Here the
    copy and the syncs run on another thread (the sqlite3 module lets go of the GIL meanwhile)
    while the loop serves everything. A first pass copies what the log holds while writes go
    on; a second holds the write lock, so no commit adds to the log while it copies what they
    added meanwhile, the checkpoint completes, and the next write starts the log over instead
    of growing it. The writer keeps an automatic checkpoint at a larger log size, in case this
    ever falls behind.

    How many commits pass between checkpoints follows how many pages a commit writes: small
    commits, one request's each, write a few pages, and at a fixed 32 commits a process serving
    one client at a time checkpointed fifty times a second, its second pass holding the write
    lock for about a millisecond each time."""

    MIN_COMMITS = 32
    MAX_COMMITS = 1024
    TARGET_FRAMES = 1000  # pages (4 MiB at SQLite's default page size)

    def __init__(self, database: str) -> None:
        self._database = database
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wal-checkpoint")
        self._commits = 0
        self._running: asyncio.Future[None] | None = None
        self._connection: sqlite3.Connection | None = None
        self.every_commits = self.MIN_COMMITS
        self.target_frames = self.TARGET_FRAMES
        self.runs = 0
        self.thread_ids: set[int] = set()

    def committed(self, write_lock: asyncio.Lock) -> None:
        """Count a commit; start a checkpoint when enough have passed and none is under way."""
        self._commits += 1
        if self._commits >= self.every_commits and (self._running is None or self._running.done()):
            commits, self._commits = self._commits, 0
            self._running = asyncio.ensure_future(self._checkpoint_between_writes(write_lock, commits))

    async def wait(self) -> None:
        """Wait for the checkpoint under way, if any."""
        if self._running is not None:
            await self._running

    async def _checkpoint_between_writes(self, write_lock: asyncio.Lock, commits: int) -> None:
        loop = asyncio.get_running_loop()
        # Holding the lock for the whole copy stalled every write for 3.8 ms a checkpoint at
        # the median under the 50 ms relay's creates; for the second pass alone, 1.7 ms.
        frames = await loop.run_in_executor(self._executor, self._checkpoint)
        async with write_lock:
            await loop.run_in_executor(self._executor, self._checkpoint)
        # The log started over after the last checkpoint, so it holds what these commits wrote.
        self.every_commits = commits_per_checkpoint(frames, commits, self.target_frames)

    def _checkpoint(self) -> int:
        """One passive checkpoint; the pages the log held (0 when it failed)."""
        try:
            if self._connection is None:
                self._connection = sqlite3.connect(self._database, isolation_level=None, check_same_thread=False)
                self._connection.execute("PRAGMA busy_timeout=0")
            _, frames, _ = self._connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            self.runs += 1
            self.thread_ids.add(threading.get_ident())
            return max(0, int(frames))
        except sqlite3.Error as error:
            # The writer's own automatic checkpoint still bounds the log.
            log.warning("sqlite.checkpoint_failed", extra={"error": type(error).__name__})
            return 0

    def close(self) -> None:
        """Let the last checkpoint finish, then close the thread and its connection."""
        if self._running is not None and not self._running.done():
            self._running.cancel()
        self._executor.shutdown(wait=True)
        if self._connection is not None:
            self._connection.close()
            self._connection = None


def _run_batch(connection: Connection, batch: list[_Waiting]) -> None:
    """Each work in its own savepoint (when there are several), one commit, then the answers."""
    outcomes: list[tuple[bool, Any]] = []
    alone = len(batch) == 1
    # Plain SAVEPOINT statements on the driver's cursor: Core's nested transaction cost 63 µs
    # and the same statements through Core 15 µs, against 1 µs here; this connection never
    # hands a savepoint to anyone else.
    savepoints = None if alone else connection.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    for work, _ in batch:
        if savepoints is not None:
            savepoints.execute("SAVEPOINT work")
        try:
            outcomes.append((True, work(connection)))
        except Exception as error:
            if savepoints is None:  # alone: nothing of it may be committed
                connection.rollback()
            else:
                savepoints.execute("ROLLBACK TO SAVEPOINT work")
                savepoints.execute("RELEASE SAVEPOINT work")
            outcomes.append((False, error))
        else:
            if savepoints is not None:
                savepoints.execute("RELEASE SAVEPOINT work")
    if savepoints is not None:
        savepoints.close()
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
    # The log is checkpointed on another thread (WalCheckpointer); the writer does so itself only
    # if that thread falls far behind. temp_store=MEMORY: each work of a group commit runs in a
    # savepoint, whose journal of the pages it changes SQLite otherwise keeps in a temporary
    # file; by hand, a create's admission took 60 µs in a savepoint backed by a file against
    # 40 µs in memory (32 µs with no savepoint). The writer's works are short, so these journals
    # stay small.
    _on_connect_pragmas(engine, "busy_timeout=0", "foreign_keys=ON", "synchronous=NORMAL", "wal_autocheckpoint=4000",
                        "temp_store=MEMORY")

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        # On the driver itself: Core's execution context around this one statement cost more than
        # SQLite's BEGIN, and every write transaction begins here. Errors are raised as Core
        # raises them, so a lock held by another process is told apart as before.
        try:
            connection.connection.dbapi_connection.execute("BEGIN IMMEDIATE")  # type: ignore[union-attr]
        except sqlite3.Error as error:
            raise DBAPIError.instance("BEGIN IMMEDIATE", (), error, sqlite3.Error,
                                      dialect=connection.dialect) from error


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
