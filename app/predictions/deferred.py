"""Writes a create could not make while the database was away, kept on disk and retried until they land."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

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
    kept_at: Path | None = None

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
            self._forget()
            return True
        log.info("database.deferred_write_done", extra=extra)
        self._forget()
        return True

    def _forget(self) -> None:
        if self.kept_at is not None:
            with contextlib.suppress(OSError):
                self.kept_at.unlink(missing_ok=True)


def _kept_path(journal: Path, what: str, prediction_id: str) -> Path:
    return journal / f"{prediction_id}.{what}.json"


def _write_durably(path: Path, content: bytes) -> None:
    partial = path.with_name(path.name + ".part")
    with partial.open("wb") as handle:
        handle.write(content)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


class DeferredWrites:
    """One retrying task per write. A write is tried again, after a pause that doubles up to
    LONGEST_PAUSE_SECONDS, for as long as the database stays unavailable; any other failure ends it,
    logged. A write given a `record` is also kept as a file in `journal` until it has landed, so
    that a process killed meanwhile does not lose it: the next start reads the files back
    (`kept()`) and retries them. When the process stops, each write still waiting is tried once
    more; one that still does not land is logged as abandoned (kept on disk, if it was)."""

    def __init__(self, *, first_pause: float = FIRST_PAUSE_SECONDS, journal: Path | None = None) -> None:
        self._first_pause = first_pause
        self._journal = journal
        self._tasks: dict[asyncio.Task[None], _Write] = {}

    def add(self, what: str, prediction_id: str, write: Callable[[], Awaitable[object]],
            *, record: dict[str, Any] | None = None) -> None:
        """Retry `write`, a write of this prediction, in the background; with `record` (what
        `kept()` gives back to redo it), kept on disk until it lands."""
        log.warning("database.write_deferred", extra={"what": what, "prediction_id": prediction_id})
        self._start(_Write(what, prediction_id, write,
                           self._keep(what, prediction_id, record) if record is not None else None))

    def resume(self, what: str, prediction_id: str, write: Callable[[], Awaitable[object]]) -> None:
        """Retry `write`, one that `kept()` gave back: its file is already on disk."""
        kept_at = None if self._journal is None else _kept_path(self._journal, what, prediction_id)
        self._start(_Write(what, prediction_id, write, kept_at))

    def _start(self, deferred: _Write) -> None:
        task = asyncio.get_running_loop().create_task(self._retry(deferred), name=f"deferred {deferred.what}")
        self._tasks[task] = deferred
        task.add_done_callback(self._tasks.pop)

    def _keep(self, what: str, prediction_id: str, record: dict[str, Any]) -> Path | None:
        if self._journal is None:
            return None
        path = _kept_path(self._journal, what, prediction_id)
        # On the loop's thread, before the caller is answered: only while the database is away,
        # and the write must be on disk before anyone relies on it.
        try:
            self._journal.mkdir(parents=True, exist_ok=True)
            _write_durably(path, orjson.dumps(
                {"what": what, "prediction_id": prediction_id, "record": record}))
        except OSError as error:
            log.error("database.deferred_write_not_kept",
                      extra={"what": what, "prediction_id": prediction_id, "error": type(error).__name__})
            return None
        return path

    def kept(self) -> list[tuple[str, str, dict[str, Any]]]:
        """The writes kept on disk by this or an earlier process and not yet landed: (what,
        prediction id, record) each. Unreadable files are logged and left where they are."""
        if self._journal is None or not self._journal.is_dir():
            return []
        found = []
        for path in sorted(self._journal.glob("*.json")):
            try:
                entry = orjson.loads(path.read_bytes())
                found.append((str(entry["what"]), str(entry["prediction_id"]), dict(entry["record"])))
            except (OSError, ValueError, KeyError, TypeError) as error:
                log.error("database.deferred_write_unreadable", extra={"file": path.name, "error": type(error).__name__})
        return found

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
                          extra={"what": deferred.what, "prediction_id": deferred.prediction_id,
                                 "kept": deferred.kept_at is not None})

        await asyncio.gather(*(last(deferred) for _, deferred in waiting))
