"""Writes a create could not make while the database was away, retried in the background until they land."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
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
        self._tasks: dict[asyncio.Task[None], str] = {}
        self._held = Counter[str]()

    def add(self, what: str, prediction_id: str, write: Callable[[], Awaitable[object]]) -> None:
        """Retry `write`, a write of this prediction, in the background."""
        log.warning("database.write_deferred", extra={"what": what, "prediction_id": prediction_id})
        task = asyncio.get_running_loop().create_task(self._retry(what, prediction_id, write),
                                                      name=f"deferred {what}")
        self._tasks[task] = prediction_id
        self._held[prediction_id] += 1
        task.add_done_callback(self._forget)

    def holds(self, prediction_id: str) -> bool:
        """Whether a write of this prediction is still waiting for the database."""
        return prediction_id in self._held

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

    def _forget(self, done: asyncio.Task[None]) -> None:
        prediction_id = self._tasks.pop(done)
        self._held[prediction_id] -= 1
        if not self._held[prediction_id]:
            del self._held[prediction_id]

    async def aclose(self) -> None:
        """Stop retrying; log each write given up."""
        tasks = list(self._tasks.items())
        for task, prediction_id in tasks:
            task.cancel()
            log.error("database.deferred_write_abandoned", extra={"prediction_id": prediction_id})
        await asyncio.gather(*(task for task, _ in tasks), return_exceptions=True)
