"""The token group migration applies to, and reverts from, a database that is already in use."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic import command
from alembic.script import ScriptDirectory

from app.db import alembic_config
from tests.conftest import DATABASES, POSTGRES_URL
from tests.dbtools import execute, rows, truncate_all

GROUPS_REVISION = "e0a5228f9a66"


@pytest.mark.parametrize("database", DATABASES)
def test_upgrade_and_downgrade_keep_tokens_predictions_and_the_ledger(database: str, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'm.db'}" if database == "sqlite" else str(POSTGRES_URL)
    config = alembic_config(url)
    script = ScriptDirectory.from_config(config).get_revision(GROUPS_REVISION)
    assert script is not None
    before = str(script.down_revision)
    command.upgrade(config, "head")
    if database == "postgresql":
        truncate_all(url)
    command.downgrade(config, before)
    try:
        # Rows that reference api_token and prediction, as a gateway in use has them.
        execute(url, "INSERT INTO api_token (id, name, display_prefix, token_hash, created_at) "
                     "VALUES ('tok1', 'alice', 'gw_abcdef', 'hash1', '2026-01-01 00:00:00')")
        execute(url, "INSERT INTO prediction (id, token_id, upstream, submission, model, status, input, "
                     "streamable, created_at, updated_at, estimate_micros, cost_micros) VALUES ('pred1', 'tok1', "
                     "'default', 'accepted', 'a/b', 'succeeded', '{}', false, '2026-01-01 00:00:00', "
                     "'2026-01-01 00:00:00', 7, 7)")
        execute(url, "INSERT INTO ledger_entry (prediction_id, token_id, kind, amount_micros, created_at) "
                     "VALUES ('pred1', 'tok1', 'settlement', 7, '2026-01-01 00:00:00')")
        command.upgrade(config, "head")
        command.check(config)
        (token,) = rows(url, "api_token")
        (prediction,) = rows(url, "prediction")
        assert (token["name"], token["group_id"]) == ("alice", None)
        assert (prediction["cost_micros"], prediction["price_multiplier_ppm"]) == (7, 1_000_000)
        assert len(rows(url, "ledger_entry")) == 1

        execute(url, "INSERT INTO token_group (id, name, created_at) VALUES ('grp1', 'ops', '2026-01-01 00:00:00')")
        execute(url, "UPDATE api_token SET group_id = 'grp1'")
        assert rows(url, "token_group")[0]["price_multiplier_ppm"] == 1_000_000
        command.downgrade(config, before)
        (token,) = rows(url, "api_token")
        assert "group_id" not in token
        assert "price_multiplier_ppm" not in rows(url, "prediction")[0]
        assert len(rows(url, "ledger_entry")) == 1
    finally:
        command.upgrade(config, "head")
        if database == "postgresql":
            truncate_all(url)
    command.check(config)
