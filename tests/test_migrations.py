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
