"""Fixtures shared by the accounting tests."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, event


@pytest.fixture
def executed() -> Iterator[list[str]]:
    """The SQL of every statement Core sent to a database meanwhile (on pysqlite the hot writes
    bypass Core, so there it sees only the rest)."""
    seen: list[str] = []
    lock = threading.Lock()

    def note(_conn: Any, _cursor: Any, statement: str, _params: Any, _context: Any, _many: bool) -> None:
        with lock:
            seen.append(statement)

    event.listen(Engine, "before_cursor_execute", note)
    yield seen
    event.remove(Engine, "before_cursor_execute", note)
