"""A TCP relay on 127.0.0.1 to another local port that a test can cut and restore, as a database
outage or a network partition would."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Self


class CuttableLink:
    """Forwards connections to `target_port`. `cut()` resets every open connection and refuses new
    ones (the port stays bound, so reconnecting fails fast); `restore()` accepts again."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self._target = (target_host, target_port)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._cut = False
        self.port = 0

    def start(self) -> Self:
        """Listen on a free loopback port."""
        self._thread.start()
        self._call(self._listen())
        return self

    def stop(self) -> None:
        """Close everything and end the thread."""
        self._call(self._close_all(stop_listening=True))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)

    def cut(self) -> None:
        """Reset every forwarded connection and refuse new ones until `restore()`."""
        self._cut = True
        self._call(self._close_all(stop_listening=False))

    def restore(self) -> None:
        """Forward new connections again."""
        self._cut = False

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _call(self, coroutine: object) -> None:
        asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=10)  # type: ignore[arg-type]

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _close_all(self, *, stop_listening: bool) -> None:
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()
        if stop_listening and self._server is not None:
            self._server.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._cut:
            writer.transport.abort()
            return
        try:
            target_reader, target_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, target_writer))

        async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            sink.transport.abort()

        await asyncio.gather(pump(reader, target_writer), pump(target_reader, writer))
        self._writers.difference_update((writer, target_writer))
