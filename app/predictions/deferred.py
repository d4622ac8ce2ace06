"""Writes a create could not make while the database was away, retried in the background until they land."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from app.db import database_unavailable

log = logging.getLogger(__name__)

FIRST_PAUSE_SECONDS = 0.2
LONGEST_PAUSE_SECONDS = 2.0
LAST_ATTEMPT_SECONDS = 2.0


@dataclass(frozen=True)
class _Write:
    what: str
    prediction_id: str
    write: Callable[[], Awaitable[object]]

    async def attempt(self) -> bool:
        """Try once: True when the write landed or failed for another reason than the database
        being away (logged), False when it is still away."""
        extra = {"what": self.what, "prediction_id": self.prediction_id}
        try:
            await self.write()
        except Exception as error:
            if database_unavailable(error):
                return False
            log.error("database.deferred_write_failed", extra={**extra, "error": type(error).__name__})
            return True
        log.info("database.deferred_write_done", extra=extra)
        return True


class DeferredWrites:
    """One retrying task per write. A write is tried again, after a pause that doubles up to
    LONGEST_PAUSE_SECONDS, for as long as the database stays unavailable; any other failure ends it,
    logged. When the process stops, each write still waiting is tried once more; one that still
    does not land is logged as abandoned, and the reconciler then treats its prediction as a create
    in doubt."""

    def __init__(self, *, first_pause: float = FIRST_PAUSE_SECONDS) -> None:
        self._first_pause = first_pause
        self._tasks: dict[asyncio.Task[None], _Write] = {}

    def add(self, what: str, prediction_id: str, write: Callable[[], Awaitable[object]]) -> None:
        """Retry `write`, a write of this prediction, in the background."""
        log.warning("database.write_deferred", extra={"what": what, "prediction_id": prediction_id})
        deferred = _Write(what, prediction_id, write)
        task = asyncio.get_running_loop().create_task(self._retry(deferred), name=f"deferred {what}")
        self._tasks[task] = deferred
        task.add_done_callback(self._tasks.pop)

    def holds(self, prediction_id: str) -> bool:
        """Whether a write of this prediction is still waiting for the database."""
        # Writes wait only while the database is away, so there are few of them to look through.
        return any(deferred.prediction_id == prediction_id for deferred in self._tasks.values())

    def __len__(self) -> int:
        return len(self._tasks)

    async def _retry(self, deferred: _Write) -> None:
        pause = self._first_pause
        while True:
            await asyncio.sleep(pause)
            if await deferred.attempt():
                return
            pause = min(pause * 2, LONGEST_PAUSE_SECONDS)

    async def aclose(self, *, last_attempt_seconds: float = LAST_ATTEMPT_SECONDS) -> None:
        """Stop retrying, try each write still waiting once more (for at most
        `last_attempt_seconds`), and log each one given up."""
        waiting = list(self._tasks.items())
        for task, _ in waiting:
            task.cancel()
        await asyncio.gather(*(task for task, _ in waiting), return_exceptions=True)

        async def last(deferred: _Write) -> None:
            try:
                landed = await asyncio.wait_for(deferred.attempt(), last_attempt_seconds)
            except TimeoutError:
                landed = False
            if not landed:
                log.error("database.deferred_write_abandoned",
                          extra={"what": deferred.what, "prediction_id": deferred.prediction_id})

        await asyncio.gather(*(last(deferred) for _, deferred in waiting))
