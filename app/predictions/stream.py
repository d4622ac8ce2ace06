"""Server-sent events for a prediction, in the exact shape both official clients parse.

The gateway builds the stream itself from the prediction as it refreshes it from the upstream:
a relay's stream URL belongs to the relay's own Replicate account and is never followed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from app.predictions.models import Prediction

log = logging.getLogger(__name__)

KEEPALIVE = b": keepalive\n\n"
SHUTDOWN_DETAIL = "The gateway is restarting; the prediction goes on: poll it or stream it again"
FAILED_DETAIL = "The gateway could not follow the prediction; it goes on: poll it or stream it again"
# However soon the next keep-alive is due, a refresh may take this long.
LEAST_REFRESH_SECONDS = 1.0
# The prediction brought up to date, waiting at most the given seconds for the upstream.
Refresh = Callable[[Prediction, float], Awaitable[Prediction]]


def sse(event: str, data: str, event_id: str) -> bytes:
    """One event: `event:`, `id:` and a `data:` line per line of data (clients join them with \\n)."""
    lines = [f"event: {event}", f"id: {event_id}"]
    lines += [f"data: {line}" for line in (data.split("\n") if data else [""])]
    return ("\n".join(lines) + "\n\n").encode()


def _text(item: Any) -> str:
    return item if isinstance(item, str) else orjson.dumps(item).decode()


@dataclass
class StreamCursor:
    """What has been sent so far, so each poll emits only what is new."""

    prefix: str
    outputs_sent: int = 0
    text_sent: int = 0
    logs_sent: int = 0
    events: int = 0
    pending: list[bytes] = field(default_factory=list)

    def _emit(self, event: str, data: str) -> None:
        self.pending.append(sse(event, data, f"{self.prefix}:{self.events}"))
        self.events += 1

    def interrupted(self, detail: str) -> bytes:
        """The `error` event that ends a stream before its prediction does."""
        self._emit("error", orjson.dumps({"detail": detail}).decode())
        return self.pending.pop()

    def advance(self, prediction: Prediction) -> list[bytes]:
        """The events for what changed since the last call, and `error`/`done` when final."""
        output = prediction.output
        if isinstance(output, list):
            for item in output[self.outputs_sent:]:
                self._emit("output", _text(item))
            self.outputs_sent = max(self.outputs_sent, len(output))
        elif isinstance(output, str):
            if len(output) > self.text_sent:
                self._emit("output", output[self.text_sent:])
                self.text_sent = len(output)
        elif output is not None and prediction.is_terminal and self.outputs_sent == 0:
            self._emit("output", _text(output))
            self.outputs_sent = 1
        logs = prediction.logs or ""
        if len(logs) > self.logs_sent:
            self._emit("logs", logs[self.logs_sent:].rstrip("\n"))
            self.logs_sent = len(logs)
        if prediction.is_terminal:
            if prediction.status == "failed":
                self._emit("error", orjson.dumps({"detail": prediction.error or "Prediction failed"}).decode())
                self._emit("done", orjson.dumps({"reason": "error"}).decode())
            elif prediction.status in ("canceled", "aborted"):
                self._emit("done", orjson.dumps({"reason": "canceled"}).decode())
            else:
                self._emit("done", "{}")
        events, self.pending = self.pending, []
        return events


async def events(
    prediction: Prediction,
    refresh: Refresh,
    *,
    poll_interval: float,
    keepalive_interval: float = 15.0,
    stopping: Callable[[], bool] = lambda: False,
) -> AsyncIterator[bytes]:
    """Events until the prediction is final; a keep-alive comment whenever nothing was sent for
    `keepalive_interval` seconds (Python's client gives up after 30 s of silence). When
    `stopping()` turns true (the gateway shuts down) an unfinished stream ends with an `error`
    event: the prediction goes on, and its client can poll it or stream it again elsewhere."""
    loop = asyncio.get_running_loop()
    cursor = StreamCursor(prefix=str(int(prediction.created_at.timestamp())))
    quiet_since = loop.time()
    row = prediction
    while True:
        chunks = cursor.advance(row)
        for chunk in chunks:
            yield chunk
        if chunks:
            quiet_since = loop.time()
        if row.is_terminal:
            return
        if stopping():
            yield cursor.interrupted(SHUTDOWN_DETAIL)
            return
        if loop.time() - quiet_since >= keepalive_interval:
            yield KEEPALIVE
            quiet_since = loop.time()
        await asyncio.sleep(poll_interval)
        # Within the time left before the next keep-alive: a slow upstream must not silence
        # the stream past what clients wait.
        within = max(quiet_since + keepalive_interval - loop.time(), LEAST_REFRESH_SECONDS)
        try:
            row = await refresh(row, within)
        except Exception as error:  # the database away, say: end the stream as clients expect
            log.warning("stream.refresh_failed", extra={"prediction_id": row.id, "error": type(error).__name__})
            yield cursor.interrupted(FAILED_DETAIL)
            return
