"""The least a create can cost in Python here: a measurement aid for bench/run.py --floor, not a gateway.

    python bench/floor.py --database gateway.db --upstream http://127.0.0.1:9101/replicate --port 9201

It answers `POST /replicate/v1/models/{owner}/{name}/predictions` only, doing the part of a
gateway create that no implementation can leave out, in the cheapest way this machine's Python
allows: raw asyncio + httptools + uvloop on both sides (no framework, no ASGI, no request or
response objects), the caller's token looked up by its keyed hash, and the gateway's own ledger
writes: the same SQL statements with the same type processing (planned from the gateway's
statements), group-committed on one SQLite connection in two transactions, the first before any
byte goes upstream and the second, the link, before the answer, with the log checkpointed on a
thread of its own as the gateway does. Left out, because a real create needs them but they are
not the floor: validating the body, idempotency keys, webhooks, file inputs, groups and failover,
the circuit breaker, metrics, logs, a request id, the reconciler, and everything that turns an
error into a Replicate problem (any error here just closes the connection). The database must be
migrated, with the caller's token created by the gateway's CLI and no GATEWAY_SECRET_KEY; the
relay's key comes from BENCH_FLOOR_UPSTREAM_KEY.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sqlite3
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httptools
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.accounting.service import _ADMIT, _ENTRY, admission_parameters
from app.db import WalCheckpointer, _plan, _values, make_engine
from app.predictions.recording import _state_update
from app.predictions.service import _INSERT
from app.tokens.service import INSTANCE_KEY_ID, hash_token, instance_key, new_id

# The parameters each statement gets from the gateway on a create (bench/upstream.py's answers).
ADMIT_NAMES = ("token_id", "estimate", "now", "month", "minute", "rate_weight")
INSERT_NAMES = ("id", "token_id", "upstream", "submission", "model", "status", "input", "created_at",
                "updated_at", "estimate_micros", "price_multiplier_ppm", "bill_failures", "submit_deadline",
                "public_base", "streamable", "poll_attempts", "webhook_sequence", "outputs_archived",
                "missing_polls")
ENTRY_NAMES = ("prediction_id", "token_id", "kind", "amount_micros", "created_at")
LINK_COLUMNS = ("output", "logs", "metrics", "updated_at", "streamable", "upstream_id", "submission",
                "next_poll_at", "version")


class Statement:
    """One of the gateway's statements as SQL and positional parameters, as its `Prepared` runs it."""

    def __init__(self, statement: Any, names: tuple[str, ...], dialect: Any) -> None:
        plan = _plan(statement, dialect, names)
        if plan is None:
            raise RuntimeError(f"cannot plan {statement}")
        self.sql, self._slots = plan

    def values(self, parameters: dict[str, Any]) -> list[Any]:
        return _values(self._slots, parameters)


class Statements:
    """A create's four statements, planned for the dialect of the gateway's own engine on `database`
    (so every parameter is processed as the gateway processes it)."""

    def __init__(self, database: str) -> None:
        engine = make_engine(f"sqlite:///{database}")
        dialect = engine.sync_engine.dialect
        self.admit = Statement(_ADMIT.statement, ADMIT_NAMES, dialect)
        self.insert = Statement(_INSERT.statement, INSERT_NAMES, dialect)
        self.entry = Statement(_ENTRY.statement, ENTRY_NAMES, dialect)
        self.link = Statement(_state_update("starting", True, LINK_COLUMNS).statement,
                              ("match_id", *(f"set_{name}" for name in LINK_COLUMNS)), dialect)
        engine.sync_engine.dispose()


class Ledger:
    """Write transactions as functions of a cursor, group-committed as the gateway's are."""

    def __init__(self, path: str) -> None:
        self.statements = Statements(path)
        self._db = sqlite3.connect(path, isolation_level=None)
        for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "foreign_keys=ON", "wal_autocheckpoint=4000"):
            self._db.execute(f"PRAGMA {pragma}")
        self._waiting: list[tuple[Callable[[sqlite3.Cursor], None], asyncio.Future[None]]] = []
        self._committer: asyncio.Task[None] | None = None
        # The gateway's own checkpointer: an automatic checkpoint inside a commit stalls the loop.
        self._lock = asyncio.Lock()
        self._checkpointer = WalCheckpointer(path)

    def token_id(self, token_hash: str) -> str | None:
        found = self._db.execute("SELECT id FROM api_token WHERE token_hash = ?", (token_hash,)).fetchone()
        return None if found is None else str(found[0])

    def key(self) -> bytes:
        """The key token hashes are made with, as the gateway derives it (GATEWAY_SECRET_KEY unset)."""
        (stored,) = self._db.execute("SELECT key FROM instance_key WHERE id = ?", (INSTANCE_KEY_ID,)).fetchone()
        return instance_key(str(stored))

    async def run(self, work: Callable[[sqlite3.Cursor], None]) -> None:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((work, done))
        if self._committer is None:
            self._committer = asyncio.ensure_future(self._commit())
        await done

    async def _commit(self) -> None:
        await asyncio.sleep(0)
        async with self._lock:
            batch, self._waiting, self._committer = self._waiting, [], None
            cursor = self._db.cursor()
            cursor.execute("BEGIN IMMEDIATE")
            errors: list[Exception | None] = []
            for work, _ in batch:
                cursor.execute("SAVEPOINT work")
                try:
                    work(cursor)
                    errors.append(None)
                except Exception as error:
                    cursor.execute("ROLLBACK TO SAVEPOINT work")
                    errors.append(error)
                cursor.execute("RELEASE SAVEPOINT work")
            cursor.execute("COMMIT")
            self._checkpointer.committed(self._lock)
        for (_, done), error in zip(batch, errors, strict=True):
            if error is None:
                done.set_result(None)
            else:
                done.set_exception(error)


class Relay(asyncio.Protocol):
    """One keep-alive connection to the fake relay, one request at a time."""

    def __init__(self) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self._body: list[bytes] = []
        self.waiter: asyncio.Future[bytes] | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("the relay closed the connection"))

    def data_received(self, data: bytes) -> None:
        self._parser.feed_data(data)

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        waiter, self.waiter = self.waiter, None
        body, self._body = b"".join(self._body), []
        if waiter is not None and not waiter.done():
            waiter.set_result(body)


class Floor:
    """The create itself: the caller's token, two group-committed transactions around the relay call."""

    def __init__(self, ledger: Ledger, upstream: str, key: str, public_base: str) -> None:
        parts = urlsplit(upstream)
        self._ledger = ledger
        self._relay = (parts.hostname or "127.0.0.1", parts.port or 80)
        self._head = (f"POST {parts.path.rstrip('/')}/v1/models/%s/predictions HTTP/1.1\r\nHost: {parts.netloc}\r\n"
                      f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n")
        self._idle: list[Relay] = []
        self._tokens: dict[str, str] = {}
        self._key = ledger.key()
        self.public_base = public_base

    def caller(self, authorization: bytes) -> str | None:
        if not authorization.startswith(b"Bearer "):
            return None
        token_hash = hash_token(authorization[7:].decode(), self._key)
        found = self._tokens.get(token_hash)
        if found is None:
            found = self._ledger.token_id(token_hash)
            if found is not None:
                self._tokens[token_hash] = found
        return found

    async def upstream(self, model: str, payload: bytes) -> dict[str, Any]:
        while self._idle and self._idle[-1].transport is None:
            self._idle.pop()
        relay = self._idle.pop() if self._idle else (await asyncio.get_running_loop().create_connection(
            Relay, *self._relay))[1]
        relay.waiter = asyncio.get_running_loop().create_future()
        assert relay.transport is not None  # noqa: S101
        relay.transport.write((self._head % (model, len(payload))).encode() + payload)
        body = await relay.waiter
        self._idle.append(relay)
        answer: dict[str, Any] = orjson.loads(body)
        return answer

    async def create(self, token_id: str, model: str, raw: bytes) -> bytes:
        body = orjson.loads(raw)
        now = datetime.now(UTC)
        prediction_id = new_id()
        row = {"id": prediction_id, "token_id": token_id, "upstream": "default", "submission": "pending",
               "model": model, "status": "starting", "input": body["input"], "created_at": now, "updated_at": now,
               "estimate_micros": 0, "price_multiplier_ppm": 1_000_000, "bill_failures": False,
               "submit_deadline": now + timedelta(seconds=40), "public_base": self.public_base,
               "streamable": False, "poll_attempts": 0, "webhook_sequence": 0, "outputs_archived": False,
               "missing_polls": 0}

        statements = self._ledger.statements

        def admit_and_record(cursor: sqlite3.Cursor) -> None:
            admission = admission_parameters(token_id=token_id, estimate_micros=0, now=now)
            cursor.execute(statements.admit.sql, statements.admit.values(admission))
            if cursor.rowcount != 1:
                raise RuntimeError("not admitted")
            cursor.execute(statements.insert.sql, statements.insert.values(row))
            reservation = {"prediction_id": prediction_id, "token_id": token_id, "kind": "reservation",
                           "amount_micros": 0, "created_at": datetime.now(UTC)}
            cursor.execute(statements.entry.sql, statements.entry.values(reservation))

        await self._ledger.run(admit_and_record)
        reply = await self.upstream(model, orjson.dumps({"input": body["input"]}))
        linked = datetime.now(UTC)

        def link(cursor: sqlite3.Cursor) -> None:
            cursor.execute(statements.link.sql, statements.link.values({
                "match_id": prediction_id, "set_output": reply.get("output"), "set_logs": reply.get("logs"),
                "set_metrics": reply.get("metrics"), "set_updated_at": linked, "set_streamable": True,
                "set_upstream_id": reply["id"], "set_submission": "accepted",
                "set_next_poll_at": linked + timedelta(seconds=2), "set_version": reply.get("version")}))
            if cursor.rowcount != 1:
                raise RuntimeError("not linked")

        await self._ledger.run(link)
        url = f"{self.public_base}/v1/predictions/{prediction_id}"
        return orjson.dumps({
            "id": prediction_id, "model": model, "version": reply.get("version"), "input": body["input"],
            "logs": reply.get("logs") or "", "output": reply.get("output"), "data_removed": False, "error": None,
            "status": reply["status"], "created_at": now.isoformat().replace("+00:00", "Z"),
            "urls": {"get": url, "cancel": url + "/cancel", "web": None, "stream": None},
        })


class Client(asyncio.Protocol):
    """One client connection: each complete request answered in order of completion."""

    def __init__(self, floor: Floor) -> None:
        self._floor = floor
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._url = b""
        self._authorization = b""
        self._body: list[bytes] = []
        self._answering: set[asyncio.Future[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None

    def data_received(self, data: bytes) -> None:
        self._parser.feed_data(data)

    def on_message_begin(self) -> None:
        self._url, self._authorization, self._body = b"", b"", []

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"authorization":
            self._authorization = value

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        answering = asyncio.ensure_future(self._answer(self._url.decode(), self._authorization, b"".join(self._body)))
        self._answering.add(answering)
        answering.add_done_callback(self._answering.discard)

    async def _answer(self, url: str, authorization: bytes, raw: bytes) -> None:
        parts = url.split("?", 1)[0].split("/")  # /replicate/v1/models/{owner}/{name}/predictions
        try:
            token_id = self._floor.caller(authorization)
            if token_id is None or len(parts) != 7 or parts[3] != "models" or parts[6] != "predictions":
                raise ValueError("not a create of this aid")
            body = await self._floor.create(token_id, f"{parts[4]}/{parts[5]}", raw)
        except Exception as error:
            print(f"floor: {type(error).__name__}: {error}", file=sys.stderr)
            if self._transport is not None:
                self._transport.close()
            return
        if self._transport is not None:
            self._transport.write(b"HTTP/1.1 201 Created\r\ncontent-type: application/json\r\n"
                                  b"content-length: %d\r\n\r\n%s" % (len(body), body))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database", required=True, help="a migrated gateway SQLite file")
    parser.add_argument("--upstream", required=True, help="the fake relay's base URL, .../replicate")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    if urlsplit(args.upstream).hostname != "127.0.0.1":
        parser.error("the floor talks to 127.0.0.1 only")
    import uvloop

    uvloop.install()

    async def serve() -> None:
        floor = Floor(Ledger(args.database), args.upstream, os.environ.get("BENCH_FLOOR_UPSTREAM_KEY", ""),
                      f"http://127.0.0.1:{args.port}/replicate")
        server = await asyncio.get_running_loop().create_server(lambda: Client(floor), "127.0.0.1", args.port,
                                                                backlog=4096)
        async with server:
            await asyncio.Event().wait()

    asyncio.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
