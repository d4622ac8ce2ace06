"""Fixtures shared by the accounting tests."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, event
from sqlalchemy.pool import Pool


@pytest.fixture
def executed() -> Iterator[list[str]]:
    """The SQL of every statement sent to a database meanwhile: on asyncpg as the driver sent it
    (Core's or the gateway's own, `DirectStatements`), elsewhere as Core sent it (on pysqlite the
    hot writes bypass Core, so there it sees only the rest)."""
    seen: list[str] = []
    lock = threading.Lock()
    logged: list[Any] = []  # the connections whose queries are logged here

    def note(conn: Any, _cursor: Any, statement: str, _params: Any, _context: Any, _many: bool) -> None:
        if conn.dialect.driver != "asyncpg":
            with lock:
                seen.append(statement)

    def note_query(query: Any) -> None:
        with lock:
            seen.append(query.query)

    def on_checkout(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
        driver = getattr(dbapi_connection, "driver_connection", None)
        if hasattr(driver, "add_query_logger") and not any(known is driver for known in logged):
            logged.append(driver)
            driver.add_query_logger(note_query)

    event.listen(Engine, "before_cursor_execute", note)
    event.listen(Pool, "checkout", on_checkout)
    yield seen
    event.remove(Pool, "checkout", on_checkout)
    event.remove(Engine, "before_cursor_execute", note)
