"""The gateway's PostgreSQL pool: kept connections, never more than its size, and it outlives the server
dropping them (a restart, a failover)."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import httpx
from sqlalchemy import event, text
from sqlalchemy.pool import Pool

from app.db import make_engine
from app.main import create_app
from tests.conftest import Gateway, make_settings
from tests.dbtools import create_token, truncate_all
from tests.fakes.relay import FakeRelay
from tests.helpers import burst
from tests.invariants import check_all
from tests.servers import ServerThread


def terminate_other_sessions(url: str) -> int:
    """End every other session on the database, as a server restart would; returns how many."""

    async def terminate() -> int:
        engine = make_engine(url)
        try:
            async with engine.connect() as connection:
                ended = await connection.scalar(text(
                    "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND pid <> pg_backend_pid()) AS ended"
                ))
                return int(ended or 0)
        finally:
            await engine.dispose()

    return asyncio.run(terminate())


def test_requests_after_the_server_ended_every_pooled_connection_succeed(
    postgres_migrated: str, relay: FakeRelay, tmp_path: Path
) -> None:
    url = postgres_migrated
    truncate_all(url)
    settings = make_settings(url, relay.upstream_url, relay.key, storage_dir=tmp_path / "storage")
    server = ServerThread(create_app(settings)).start()
    try:
        secret = create_token(url, "team-a")
        with httpx.Client(base_url=server.url + "/replicate/v1", headers={"Authorization": f"Bearer {secret}"},
                          timeout=30) as api:
            # Creates first, so that the pool holds connections when the server ends them.
            for _ in range(3):
                assert api.post("/models/black-forest-labs/flux-schnell/predictions",
                                json={"input": {"prompt": "warm"}}).status_code == 201
            assert terminate_other_sessions(url) >= 1
            time.sleep(0.2)
            for i in range(6):
                created = api.post("/models/black-forest-labs/flux-schnell/predictions",
                                   json={"input": {"prompt": f"after {i}"}})
                assert created.status_code == 201, created.text
                fetched = api.get(f"/predictions/{created.json()['id']}")
                assert fetched.status_code == 200, fetched.text
            assert api.get("/predictions").status_code == 200
    finally:
        server.stop()
    check_all(url, relay)


def test_a_burst_is_served_on_the_pools_connections_without_opening_more(
    postgres_migrated: str, relay: FakeRelay, tmp_path: Path
) -> None:
    url = postgres_migrated
    truncate_all(url)
    settings = make_settings(url, relay.upstream_url, relay.key, storage_dir=tmp_path / "storage",
                             database_pool_size=3)
    server = ServerThread(create_app(settings)).start()
    opened: list[object] = []
    lock = threading.Lock()

    def note(dbapi_connection: object, _record: object) -> None:
        with lock:
            opened.append(dbapi_connection)

    try:
        gateway = Gateway(url=server.url, db_url=url, settings=settings, server=server)
        secret = create_token(url, "team-a")
        event.listen(Pool, "connect", note)
        try:
            responses = burst(gateway, secret, 40, model="black-forest-labs/flux-schnell")
        finally:
            event.remove(Pool, "connect", note)
        assert [r.status_code for r in responses] == [201] * 40, [r.text for r in responses if r.status_code != 201]
    finally:
        server.stop()
    # Forty creates in flight at once wait for the pool's three connections; none is opened
    # past them (and so none is closed and opened again).
    assert 1 <= len(opened) <= 3, len(opened)
    check_all(url, relay)
