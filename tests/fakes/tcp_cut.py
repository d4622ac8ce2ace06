"""A TCP relay on 127.0.0.1 to another local port that a test can cut and restore, as a database
outage or a network partition would."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Self


class CuttableLink:
    """Forwards connections to `target_port`. `cut()` resets every open connection and refuses new
    ones (the port stays bound, so reconnecting fails fast); `restore()` accepts again. For
    PostgreSQL, `refuse_statements` resets the connections that send one statement, and
    `cut_once_answered` cuts once a statement has committed, before its answer arrives."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self._target = (target_host, target_port)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._cut = False
        self._marker: bytes | None = None
        self._refused: bytes | None = None
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
        if not self._thread.is_alive():
            self._loop.close()

    def cut(self) -> None:
        """Reset every forwarded connection and refuse new ones until `restore()`."""
        self._cut = True
        self._call(self._close_all(stop_listening=False))

    def restore(self) -> None:
        """Forward new connections again."""
        self._cut = False

    def refuse_statements(self, marker: bytes | None) -> None:
        """Reset any connection that sends a statement whose text holds `marker` before it
        reaches the server, until called again with None: one write that meets the database
        away every time while every other statement goes through."""
        self._refused = marker

    def cut_once_answered(self, marker: bytes) -> None:
        """Cut every connection once PostgreSQL has run the next statement whose text holds
        `marker` and is ready for the next query (its implicit transaction committed), before
        any of its answer reaches the client: a commit whose answer is lost."""
        self._marker = marker

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

        marked = asyncio.Event()

        async def requests() -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await reader.read(65536):
                    if self._refused is not None and self._refused in data:
                        writer.transport.abort()
                        break
                    if self._marker is not None and self._marker in data:
                        self._marker = None
                        marked.set()
                    target_writer.write(data)
                    await target_writer.drain()
            target_writer.transport.abort()

        async def answers() -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await target_reader.read(65536):
                    if marked.is_set():
                        # The marked statement went out before this came back: its answer.
                        await self._hold_back_the_answer(data, target_reader, writer)
                        return
                    writer.write(data)
                    await writer.drain()
            writer.transport.abort()

        await asyncio.gather(requests(), answers())
        self._writers.difference_update((writer, target_writer))

    async def _hold_back_the_answer(self, data: bytes, source: asyncio.StreamReader,
                                    sink: asyncio.StreamWriter) -> None:
        """Forward the server's messages up to the statement's result, hold back that and all
        after it until ReadyForQuery ('Z'), which comes once its implicit transaction committed
        (at the Sync that follows the statement); then cut everything."""
        buffer = bytearray(data)
        holding = False
        while True:
            while len(buffer) >= 5:
                kind = buffer[0:1]
                length = int.from_bytes(buffer[1:5], "big")
                if len(buffer) < 1 + length:
                    break
                message, buffer = bytes(buffer[:1 + length]), buffer[1 + length:]
                # Its first row (DataRow), or its end (CommandComplete, PortalSuspended).
                holding = holding or kind in (b"D", b"C", b"s")
                if holding and kind == b"Z":
                    self._cut = True
                    await self._close_all(stop_listening=False)
                    return
                if not holding:
                    sink.write(message)
            await sink.drain()
            more = await source.read(65536)
            if not more:
                return
            buffer += more
