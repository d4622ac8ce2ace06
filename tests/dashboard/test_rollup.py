"""The daily usage rollup: backfilled by its migration from the predictions already recorded."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic import command

from app.db import alembic_config
from tests.conftest import DATABASES, POSTGRES_URL
from tests.dbtools import execute, rows, truncate_all
from tests.invariants import check_daily_usage

BEFORE_ROLLUP = "9da87d741ea3"
PREDICTIONS = [
    # id, model, status, submission, created_at (UTC), cost_micros
    ("p1", "a/one", "succeeded", "accepted", "2026-11-01 23:59:59.000000", 6000),
    ("p2", "a/one", "succeeded", "accepted", "2026-11-01 00:00:00.000000", 4000),
    ("p3", "a/one", "failed", "accepted", "2026-11-01 12:00:00.000000", 0),
    ("p4", "a/one", "failed", "rejected", "2026-11-01 12:00:00.000000", 0),
    ("p5", "a/one", "aborted", "unknown", "2026-11-02 00:00:00.000000", 3000),
    ("p6", "b/two", "canceled", "accepted", "2026-11-02 08:00:00.000000", 0),
    ("p7", "b/two", "processing", "accepted", "2026-11-02 09:00:00.000000", None),
]


@pytest.mark.parametrize("database", DATABASES)
def test_the_migration_backfills_the_rollup(database: str, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'r.db'}" if database == "sqlite" else str(POSTGRES_URL)
    config = alembic_config(url)
    command.upgrade(config, "head")
    if database == "postgresql":
        truncate_all(url)
    command.downgrade(config, BEFORE_ROLLUP)
    stamp = "" if database == "sqlite" else "+00"
    execute(url, "INSERT INTO api_token (id, name, display_prefix, token_hash, created_at) "  # noqa: S608
                 f"VALUES ('t1', 'team', 'gw_x', 'h1', '2026-10-01 00:00:00{stamp}')")
    for pid, model, status, submission, created, cost in PREDICTIONS:
        execute(url, "INSERT INTO prediction (id, token_id, upstream, submission, model, status, input, "  # noqa: S608
                     "streamable, created_at, updated_at, cost_micros) VALUES "
                     f"('{pid}', 't1', 'default', '{submission}', '{model}', '{status}', '{{}}', false, "
                     f"'{created}{stamp}', '{created}{stamp}', {'NULL' if cost is None else cost})")
    command.upgrade(config, "head")
    check_daily_usage(url)
    by_key = {(str(r["day"])[:10], r["model"]): r for r in rows(url, "usage_daily")}
    assert set(by_key) == {("2026-11-01", "a/one"), ("2026-11-02", "a/one"), ("2026-11-02", "b/two")}
    first = by_key[("2026-11-01", "a/one")]
    assert (first["predictions"], first["succeeded"], first["failed"], first["cost_micros"]) == (3, 2, 1, 10000)
    assert by_key[("2026-11-02", "a/one")]["failed"] == 1  # aborted counts as failed
    assert by_key[("2026-11-02", "b/two")]["canceled"] == 1  # the running one is not in it
    if database == "postgresql":
        truncate_all(url)
