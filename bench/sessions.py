"""What one database session costs the gateway on SQLite, in-process: the engine and sessions
of app/db.py (WAL, BEGIN IMMEDIATE, aiosqlite), one trivial statement per session.

    python bench/sessions.py

Prints wall and CPU time per session and the aiosqlite calls (each a round trip to that
connection's thread) one session makes.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.db import make_engine, make_sessionmaker
from sqlalchemy import text


async def measure(url: str, n: int = 1000) -> None:
    import aiosqlite.core

    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    for _ in range(100):
        async with sessions() as session:
            await session.execute(text("select 1"))
    started, cpu = time.perf_counter(), time.process_time()
    for _ in range(n):
        async with sessions() as session:
            await session.execute(text("select 1"))
    wall, used = (time.perf_counter() - started) / n, (time.process_time() - cpu) / n
    calls: list[str] = []
    original = aiosqlite.core.Connection._execute

    async def counting(self: object, fn: object, *args: object, **kwargs: object) -> object:
        calls.append(getattr(fn, "__name__", repr(fn)) + (f"({args[0]!r})" if args else ""))
        return await original(self, fn, *args, **kwargs)  # type: ignore[arg-type]

    aiosqlite.core.Connection._execute = counting  # type: ignore[method-assign]
    async with sessions() as session:
        await session.execute(text("select 1"))
    aiosqlite.core.Connection._execute = original  # type: ignore[method-assign]
    await engine.dispose()
    print(f"one session with one `select 1`: {wall * 1e6:.0f} us wall, {used * 1e6:.0f} us CPU "
          f"(all threads), {len(calls)} aiosqlite round trips: {', '.join(calls)}")

    import aiosqlite

    with tempfile.TemporaryDirectory() as tmp:
        async with aiosqlite.connect(f"{tmp}/raw.db") as db:
            started = time.perf_counter()
            for _ in range(n):
                await db.execute("select 1")
            print(f"one bare aiosqlite round trip: {(time.perf_counter() - started) / n * 1e6:.0f} us wall")


def main() -> int:
    import uvloop

    with tempfile.TemporaryDirectory() as tmp:
        uvloop.run(measure(f"sqlite:///{tmp}/bench.db"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
