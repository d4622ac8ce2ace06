"""SQLite for the async engine without a thread per connection: statements run inline.

aiosqlite runs every call on its connection's own thread. A keyed read or write of a WAL database
takes tens of microseconds, but each hop to that thread and back costs more than the statement
itself, and under load a transaction's hops wait behind everything else the event loop has to
do while it holds SQLite's write lock. Here the same aiosqlite-shaped interface (what
SQLAlchemy's aiosqlite dialect drives) runs each call directly on the event loop's thread.

Nothing here may block the loop for long: connections use a zero busy timeout, and a statement
that finds the database locked by another process is retried after an asynchronous sleep, for
as long as the busy timeout would have waited. Inside a transaction a lock error is raised as it
is, as it would be with a busy timeout.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any

LOCK_WAIT_SECONDS = 10.0
_FIRST_BACKOFF = 0.0005
_MAX_BACKOFF = 0.02


def locked(error: BaseException | None) -> bool:
    """Whether a sqlite3 error says another connection holds the lock."""
    if not isinstance(error, sqlite3.OperationalError):
        return False
    text = str(error).lower()
    return "locked" in text or "busy" in text


def pauses() -> Iterator[float]:
    """Back-off pauses between attempts to take a lock another process holds."""
    pause = _FIRST_BACKOFF
    while True:
        yield pause
        pause = min(pause * 2, _MAX_BACKOFF)


class _ImmediateQueue:
    """Runs what SQLAlchemy hands to aiosqlite's worker queue at once, on this thread."""

    def put_nowait(self, item: tuple[asyncio.Future[Any], Callable[[], Any]]) -> None:
        future, function = item
        try:
            future.set_result(function())
        except Exception as error:
            future.set_exception(error)


class InlineCursor:
    """An aiosqlite-shaped cursor over a sqlite3 cursor."""

    def __init__(self, connection: InlineConnection) -> None:
        self._connection = connection
        self._cursor = connection._conn.cursor()

    async def __aenter__(self) -> InlineCursor:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    @property
    def description(self) -> Any:
        return self._cursor.description

    @property
    def rowcount(self) -> int:
        return self._cursor.rowcount

    @property
    def lastrowid(self) -> int | None:
        return self._cursor.lastrowid

    @property
    def arraysize(self) -> int:
        return self._cursor.arraysize

    @arraysize.setter
    def arraysize(self, value: int) -> None:
        self._cursor.arraysize = value

    async def execute(self, sql: str, parameters: Any = ()) -> InlineCursor:
        await self._connection.run(lambda: self._cursor.execute(sql, parameters))
        return self

    async def executemany(self, sql: str, parameters: Iterable[Any]) -> InlineCursor:
        rows = list(parameters)
        await self._connection.run(lambda: self._cursor.executemany(sql, rows))
        return self

    async def fetchone(self) -> Any:
        return self._cursor.fetchone()

    async def fetchmany(self, size: int | None = None) -> list[Any]:
        return self._cursor.fetchmany(size if size is not None else self._cursor.arraysize)

    async def fetchall(self) -> list[Any]:
        return self._cursor.fetchall()

    async def nextset(self) -> None:
        return None

    async def setinputsizes(self, *_: Any) -> None:
        return None

    async def close(self) -> None:
        self._cursor.close()


class InlineConnection:
    """An aiosqlite-shaped connection whose calls run on the calling (event loop) thread."""

    def __init__(self, conn: sqlite3.Connection, lock_wait: float) -> None:
        self._conn = conn
        self._connection = conn  # SQLAlchemy checks this to know the connection is open
        self._tx = _ImmediateQueue()
        self._lock_wait = lock_wait

    @property
    def isolation_level(self) -> str | None:
        return self._conn.isolation_level

    @property
    def in_transaction(self) -> bool:
        return self._conn.in_transaction

    async def run(self, statement: Callable[[], Any]) -> Any:
        """Run one call; outside a transaction, wait out another process's lock without
        blocking the loop."""
        deadline = time.monotonic() + self._lock_wait
        for pause in pauses():
            began_in_transaction = self._conn.in_transaction
            try:
                return statement()
            except sqlite3.OperationalError as error:
                if began_in_transaction or not locked(error) or time.monotonic() >= deadline:
                    raise
            await asyncio.sleep(pause)
        raise AssertionError("unreachable")  # pauses() never ends

    def cursor(self) -> InlineCursor:
        return InlineCursor(self)

    async def execute(self, sql: str, parameters: Any = ()) -> InlineCursor:
        cursor = self.cursor()
        await cursor.execute(sql, parameters)
        return cursor

    async def commit(self) -> None:
        await self.run(self._conn.commit)

    async def rollback(self) -> None:
        self._conn.rollback()

    async def create_function(self, *args: Any, **kwargs: Any) -> None:
        self._conn.create_function(*args, **kwargs)

    async def close(self) -> None:
        self._conn.close()

    def stop(self) -> None:
        self._conn.close()


def connector(path: str, *, uri: bool = False, lock_wait: float = LOCK_WAIT_SECONDS
              ) -> Callable[[], Awaitable[InlineConnection]]:
    """An `async_creator` for `create_async_engine` opening `path` inline."""

    async def connect() -> InlineConnection:
        conn = sqlite3.connect(path, uri=uri, timeout=0, isolation_level=None,
                               check_same_thread=False, detect_types=0)
        return InlineConnection(conn, lock_wait)

    return connect
