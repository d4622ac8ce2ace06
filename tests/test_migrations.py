"""Migrations apply, revert and re-apply on every database, and match the models exactly."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest
from alembic import command
from alembic.util.exc import CommandError

from app.db import alembic_config, make_engine, schema_is_current
from tests.conftest import DATABASES, POSTGRES_URL
from tests.dbtools import execute, rows, truncate_all


@pytest.mark.parametrize("database", DATABASES)
def test_upgrade_check_downgrade_upgrade(database: str, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'm.db'}" if database == "sqlite" else str(POSTGRES_URL)
    config = alembic_config(url)
    command.upgrade(config, "head")
    command.check(config)  # raises when the models and the migrations disagree
    command.downgrade(config, "base")
    with pytest.raises(CommandError):
        command.check(config)
    command.upgrade(config, "head")
    command.check(config)


@pytest.mark.parametrize("database", DATABASES)
def test_the_previous_minutes_rate_count_is_added_as_zero_and_dropped_again(database: str, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'm.db'}" if database == "sqlite" else str(POSTGRES_URL)
    config = alembic_config(url)
    before = "8c41f0a9d2e6"
    command.upgrade(config, "head")
    if database != "sqlite":
        truncate_all(url)  # the shared database may hold other tests' rows
    command.downgrade(config, before)
    execute(url, "INSERT INTO api_token (id, name, display_prefix, token_hash, rpm_limit, rate_window, rate_count, "
                 "created_at) VALUES ('t1', 'kept', 'gw_ab', 'h1', 5, 29000000, 4, CURRENT_TIMESTAMP)")
    command.upgrade(config, "df21c9d16b54")
    (row,) = rows(url, "api_token")
    assert (row["rate_window"], row["rate_count"], row["rate_previous_count"]) == (29000000, 4, 0)
    command.downgrade(config, before)
    (row,) = rows(url, "api_token")
    assert "rate_previous_count" not in row
    assert (row["name"], row["rate_count"]) == ("kept", 4)
    command.upgrade(config, "head")
    execute(url, "DELETE FROM api_token")


def test_the_gateway_refuses_an_unmigrated_database(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'empty.db'}"

    async def current() -> bool:
        engine = make_engine(url)
        try:
            return await schema_is_current(engine)
        finally:
            await engine.dispose()

    assert asyncio.run(current()) is False
    command.upgrade(alembic_config(url), "head")
    assert asyncio.run(current()) is True
    assert shutil.which("alembic") is not None


@pytest.mark.skipif(not POSTGRES_URL, reason="needs GATEWAY_TEST_DATABASE_URL")
def test_replicas_migrating_at_once_take_turns() -> None:
    import os
    import subprocess
    import sys
    import time

    from sqlalchemy import text

    from app.db import make_engine

    admin_url = str(POSTGRES_URL)
    scratch = admin_url.rsplit("/", 1)[0] + "/gateway_migrate_race"

    async def admin(statement: str) -> None:
        engine = make_engine(admin_url, isolation_level="AUTOCOMMIT")
        try:
            async with engine.connect() as connection:
                await connection.execute(text(statement))
        finally:
            await engine.dispose()

    asyncio.run(admin("DROP DATABASE IF EXISTS gateway_migrate_race"))
    asyncio.run(admin("CREATE DATABASE gateway_migrate_race"))
    try:
        # Separate processes, as replicas are, imported first and then released at one instant.
        at = time.time() + 3
        script = ("import time, app.cli, app.db, alembic.command, app.schema; "
                  f"time.sleep(max(0, {at} - time.time())); raise SystemExit(app.cli.main(['migrate']))")
        env = {**os.environ, "GATEWAY_DATABASE_URL": scratch}
        runs = [subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, cwd=Path(__file__).resolve().parent.parent)
                for _ in range(4)]
        results = [(run.wait(timeout=120), run.stderr.read().decode()[-300:] if run.stderr else "") for run in runs]
        assert [code for code, _ in results] == [0, 0, 0, 0], results
        command.check(alembic_config(scratch))
    finally:
        asyncio.run(admin("DROP DATABASE IF EXISTS gateway_migrate_race WITH (FORCE)"))
