"""Writes a create could not make while the database was away, retried in the background until they land."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from app.db import database_unavailable

log = logging.getLogger(__name__)

FIRST_PAUSE_SECONDS = 0.2
LONGEST_PAUSE_SECONDS = 2.0


class DeferredWrites:
    """One retrying task per write. A write is tried again, after a pause that doubles up to
    LONGEST_PAUSE_SECONDS, for as long as the database stays unavailable; any other failure ends it,
    logged. What is still waiting when the process stops is logged as abandoned: the reconciler
    then treats its prediction as a create in doubt."""

    def __init__(self, *, first_pause: float = FIRST_PAUSE_SECONDS) -> None:
        self._first_pause = first_pause
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def add(self, what: str, prediction_id: str, write: Callable[[], Awaitable[object]]) -> None:
        """Retry `write` in the background; one write a prediction at a time (a later one replaces
        an earlier, which the later supersedes)."""
        earlier = self._tasks.pop(prediction_id, None)
        if earlier is not None:
            earlier.cancel()
        log.warning("database.write_deferred", extra={"what": what, "prediction_id": prediction_id})
        task = asyncio.get_running_loop().create_task(self._retry(what, prediction_id, write),
                                                      name=f"deferred {what}")
        self._tasks[prediction_id] = task
        task.add_done_callback(lambda done: self._forget(prediction_id, done))

    def holds(self, prediction_id: str) -> bool:
        """Whether a write of this prediction is still waiting for the database."""
        return prediction_id in self._tasks

    def __len__(self) -> int:
        return len(self._tasks)

    async def _retry(self, what: str, prediction_id: str, write: Callable[[], Awaitable[object]]) -> None:
        pause = self._first_pause
        while True:
            await asyncio.sleep(pause)
            try:
                await write()
            except Exception as error:
                if database_unavailable(error):
                    pause = min(pause * 2, LONGEST_PAUSE_SECONDS)
                    continue
                log.error("database.deferred_write_failed",
                          extra={"what": what, "prediction_id": prediction_id, "error": type(error).__name__})
                return
            log.info("database.deferred_write_done", extra={"what": what, "prediction_id": prediction_id})
            return

    def _forget(self, prediction_id: str, done: asyncio.Task[None]) -> None:
        if self._tasks.get(prediction_id) is done:
            del self._tasks[prediction_id]

    async def aclose(self) -> None:
        """Stop retrying; log each write given up."""
        for prediction_id, task in list(self._tasks.items()):
            task.cancel()
            log.error("database.deferred_write_abandoned", extra={"prediction_id": prediction_id})
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        self._tasks.clear()
