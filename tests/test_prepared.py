"""Prepared writes and the prepared keyed read: the same rows and errors as Core, without compiling."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, TypeVar

import pytest
from sqlalchemy import DateTime, Engine, bindparam, event, select, text, update
from sqlalchemy.dialects import sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError, StatementError

from app.accounting import service as accounting
from app.columns import UTCDateTime
from app.db import Prepared, Transactions, entity_by_key, json_text, make_engine, make_sessionmaker
from app.predictions.models import PREDICTIONS, Prediction, Submission
from app.predictions.recording import _state_update
from app.predictions.service import _INSERT
from app.upstream.schemas import parse_prediction
from tests.conftest import make_settings
from tests.dbtools import create_token, rows, standalone_recorder

NOW = datetime(2026, 11, 21, 12, 0, 0, 123456, tzinfo=UTC)
T = TypeVar("T")


def _in_transaction(db_url: str, work: Callable[[Connection], T]) -> T:
    async def scenario() -> T:
        engine = make_engine(db_url)
        transactions = Transactions(engine, make_sessionmaker(engine))
        try:
            return await transactions.run(work)
        finally:
            transactions.dispose()
            await engine.dispose()

    return asyncio.run(scenario())


@pytest.fixture
def compiled_statements() -> Iterator[list[str]]:
    """The SQL of every statement Core compiled (rather than ran as driver SQL) meanwhile."""
    seen: list[str] = []

    def note(_conn: Any, _cursor: Any, statement: str, _params: Any, context: Any, _many: bool) -> None:
        if context.compiled is not None:
            seen.append(statement)

    event.listen(Engine, "before_cursor_execute", note)
    yield seen
    event.remove(Engine, "before_cursor_execute", note)


def _prediction(token_id: str, **overrides: Any) -> Prediction:
    values: dict[str, Any] = {
        "id": "p" * 26, "token_id": token_id, "upstream": "relay", "submission": Submission.PENDING,
        "model": "acme/hello", "status": "starting", "input": {"prompt": "hi ✓", "n": [1, 2.5, None]},
        "created_at": NOW, "updated_at": NOW, "estimate_micros": 12_345, "price_multiplier_ppm": 1_000_000,
        "bill_failures": True, "submit_deadline": NOW + timedelta(seconds=30), "streamable": False,
        "poll_attempts": 0, "webhook_sequence": 0, "outputs_archived": False, "missing_polls": 0,
    }
    return Prediction(**{**values, **overrides})


def _row_values(prediction: Prediction) -> dict[str, Any]:
    """The columns a create inserts: those the prediction sets."""
    values = {column.name: getattr(prediction, column.key) for column in PREDICTIONS.columns}
    return {name: value for name, value in values.items() if value is not None}


def _columns(prediction: Prediction | None) -> dict[str, Any]:
    assert prediction is not None
    return {column.key: getattr(prediction, column.key) for column in PREDICTIONS.columns}


def _core_read(connection: Connection, prediction_id: str) -> dict[str, Any]:
    row = connection.execute(select(PREDICTIONS).where(PREDICTIONS.c.id == prediction_id)).one()
    return dict(row._mapping)


def test_a_create_admission_writes_what_core_would_and_compiles_nothing_on_sqlite(
        db_url: str, compiled_statements: list[str]) -> None:
    token_id = _token(db_url)
    prediction = _prediction(token_id)

    def admit_and_record(connection: Connection) -> tuple[dict[str, Any], dict[str, Any]]:
        compiled_statements.clear()
        accounting.admit(connection, token_id=token_id, estimate_micros=prediction.estimate_micros, now=NOW)
        _INSERT.execute(connection, _row_values(prediction))
        accounting.reserve(connection, prediction_id=prediction.id, token_id=token_id,
                           estimate_micros=prediction.estimate_micros)
        fast = _columns(entity_by_key(connection, Prediction, prediction.id))
        written = list(compiled_statements)
        return fast, {"core": _core_read(connection, prediction.id), "compiled": written}

    fast, seen = _in_transaction(db_url, admit_and_record)
    # The prepared read converts every column as Core's own select does.
    assert fast == seen["core"]
    assert fast["input"] == {"prompt": "hi ✓", "n": [1, 2.5, None]}
    assert fast["created_at"] == NOW
    assert fast["bill_failures"] is True
    assert fast["submission"] == Submission.PENDING
    assert fast["upstream_id"] is None
    (token,) = rows(db_url, "api_token")
    assert (token["reserved_micros"], token["in_flight"], token["rate_count"]) == (12_345, 1, 1)
    (entry,) = rows(db_url, "ledger_entry")
    assert (entry["prediction_id"], entry["kind"], entry["amount_micros"]) == (prediction.id, "reservation", 12_345)
    # Elsewhere the same statements go through Core (and the read with them).
    assert len(seen["compiled"]) == (0 if db_url.startswith("sqlite") else 4)


def test_recording_a_final_state_settles_through_prepared_statements_only(
        db_url: str, compiled_statements: list[str]) -> None:
    token_id = _token(db_url)
    prediction = _prediction(token_id)
    _in_transaction(db_url, lambda connection: _INSERT.execute(connection, _row_values(prediction)))

    def settle(connection: Connection) -> list[str]:
        compiled_statements.clear()
        accounting.admit(connection, token_id=token_id, estimate_micros=100, now=NOW)
        statement = _state_update("succeeded", False, ("status", "output", "completed_at", "cost_micros"))
        changed = statement.execute(connection, {
            "match_id": prediction.id, "set_status": "succeeded", "set_output": ["https://x/y.png"],
            "set_completed_at": NOW, "set_cost_micros": 90,
        })
        assert changed == 1
        accounting.close(connection, prediction_id=prediction.id, token_id=token_id, estimate_micros=100,
                         outcome=accounting.Outcome(charged=True, amount_micros=90), now=NOW)
        return list(compiled_statements)

    compiled = _in_transaction(db_url, settle)
    (row,) = rows(db_url, "prediction")
    assert (row["status"], row["cost_micros"]) == ("succeeded", 90)
    (token,) = rows(db_url, "api_token")
    assert (token["spent_micros"], token["reserved_micros"], token["in_flight"]) == (90, 0, 0)
    (daily,) = rows(db_url, "usage_daily")
    assert (daily["predictions"], daily["succeeded"], daily["cost_micros"]) == (1, 1, 90)
    if db_url.startswith("sqlite"):
        assert compiled == []


def test_the_compare_and_set_refuses_a_status_that_may_not_follow(db_url: str) -> None:
    token_id = _token(db_url)
    prediction = _prediction(token_id, status="succeeded")
    _in_transaction(db_url, lambda connection: _INSERT.execute(connection, _row_values(prediction)))
    statement = _state_update("processing", False, ("status",))
    changed = _in_transaction(db_url, lambda connection: statement.execute(
        connection, {"match_id": prediction.id, "set_status": "processing"}))
    assert changed == 0
    assert rows(db_url, "prediction")[0]["status"] == "succeeded"


def test_a_duplicate_key_raises_sqlalchemys_integrity_error(db_url: str) -> None:
    token_id = _token(db_url)
    prediction = _prediction(token_id)
    _in_transaction(db_url, lambda connection: _INSERT.execute(connection, _row_values(prediction)))
    with pytest.raises(IntegrityError):
        _in_transaction(db_url, lambda connection: _INSERT.execute(connection, _row_values(prediction)))
    assert len(rows(db_url, "prediction")) == 1


def test_statements_it_cannot_plan_go_through_core_and_keep_cores_errors(
        db_url: str, compiled_statements: list[str]) -> None:
    token_id = _token(db_url)
    _in_transaction(db_url, lambda connection: _INSERT.execute(connection, _row_values(_prediction(token_id))))
    # An expanding IN is rendered per call by Core: prepared once, it would be wrong.
    expanding = Prepared(update(PREDICTIONS).where(PREDICTIONS.c.status.in_(bindparam("statuses", expanding=True)))
                         .values(logs=bindparam("logs")))

    def run_expanding(connection: Connection) -> tuple[int, int]:
        compiled_statements.clear()
        changed = expanding.execute(connection, {"statuses": ["processing", "starting"], "logs": "hello"})
        return changed, len(compiled_statements)

    assert _in_transaction(db_url, run_expanding) == (1, 1)
    assert rows(db_url, "prediction")[0]["logs"] == "hello"
    missing = Prepared(update(PREDICTIONS).where(PREDICTIONS.c.id == bindparam("match_id")).values(logs="x"))
    with pytest.raises(StatementError, match="match_id"):
        _in_transaction(db_url, lambda connection: missing.execute(connection, {}))


def _token(db_url: str) -> str:
    create_token(db_url, "probe")
    (token,) = rows(db_url, "api_token")
    token_id: str = token["id"]
    return token_id


def test_the_keyed_read_of_a_missing_row_is_none(db_url: str) -> None:
    assert _in_transaction(db_url, lambda connection: entity_by_key(connection, Prediction, "n" * 26)) is None


def test_a_timestamp_is_stored_as_the_text_sqlalchemys_own_sqlite_type_writes() -> None:
    # Rows written before and after must compare and sort alike, on the same text.
    dialect = sqlite.dialect()
    ours = UTCDateTime().dialect_impl(dialect).bind_processor(dialect)
    theirs = DateTime().dialect_impl(dialect).bind_processor(dialect)
    assert ours is not None
    assert theirs is not None
    five_east = timezone(timedelta(hours=5))
    for moment in (NOW, NOW.replace(microsecond=0), datetime(999, 1, 2, 3, 4, 5, 6, tzinfo=UTC),
                   datetime(2026, 1, 1, 1, 0, 0, 7, tzinfo=five_east)):
        assert ours(moment) == theirs(moment.astimezone(UTC).replace(tzinfo=None))
    assert ours(datetime(2026, 1, 1, 1, tzinfo=five_east)) == "2025-12-31 20:00:00.000000"
    assert ours(None) is None
    with pytest.raises(ValueError, match="naive"):
        ours(datetime(2026, 1, 1))


def test_json_columns_are_written_by_orjson_and_by_the_standard_library_where_orjson_refuses() -> None:
    assert json_text({"prompt": "hi ✓", "n": [1, 2.5, None, True]}) == '{"prompt":"hi ✓","n":[1,2.5,null,true]}'
    assert json.loads(json_text({"seed": 10**30})) == {"seed": 10**30}
    assert json.loads(json_text({1: "one"})) == {"1": "one"}


def test_the_link_key_and_poll_indexes_hold_only_the_rows_that_set_them(db_url: str) -> None:
    token_id = _token(db_url)
    unlinked = [_prediction(token_id, id=f"{n}" * 26) for n in range(1, 3)]
    for prediction in unlinked:
        _in_transaction(db_url, lambda connection, p=prediction: _INSERT.execute(connection, _row_values(p)))
    partial = ("uq_prediction_upstream_upstream_id", "uq_prediction_token_id_idempotency_key",
               "ix_prediction_next_poll_at")
    if db_url.startswith("sqlite"):
        # Each index's entries, counted from its pages: the unlinked rows are in none of them.
        entries = _in_transaction(db_url, lambda connection: dict(connection.exec_driver_sql(
            "SELECT name, sum(ncell) FROM dbstat WHERE pagetype = 'leaf' GROUP BY name").all()))
        assert {name: entries[name] for name in partial} == dict.fromkeys(partial, 0)
        assert entries["ix_prediction_created_at_id"] == 2  # an ordinary index holds both
    else:
        definitions = _in_transaction(db_url, lambda connection: dict(connection.execute(text(
            "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'prediction'")).all()))
        for name in partial:
            assert "WHERE (" in definitions[name], definitions[name]
    # Still unique where set.
    linked = _prediction(token_id, id="7" * 26, upstream_id="up-1", idempotency_key="k")
    _in_transaction(db_url, lambda connection: _INSERT.execute(connection, _row_values(linked)))
    for clash in ({"upstream_id": "up-1"}, {"idempotency_key": "k"}):
        with pytest.raises(IntegrityError):
            _in_transaction(db_url, lambda connection, c=clash: _INSERT.execute(
                connection, _row_values(_prediction(token_id, id="8" * 26, **c))))
    assert len(rows(db_url, "prediction")) == 3


def test_on_sqlite_the_lookups_by_link_and_key_read_the_partial_indexes(db_url: str) -> None:
    if not db_url.startswith("sqlite"):
        pytest.skip("SQLite's query plan")
    lookups = {
        "uq_prediction_upstream_upstream_id": "SELECT id FROM prediction WHERE upstream = ? AND upstream_id = ?",
        "uq_prediction_token_id_idempotency_key":
            "SELECT id FROM prediction WHERE token_id = ? AND idempotency_key = ?",
    }
    for index, query in lookups.items():
        plan = _in_transaction(db_url, lambda connection, q=query: " ".join(
            str(row[-1]) for row in connection.exec_driver_sql(f"EXPLAIN QUERY PLAN {q}", ("a", "b"))))
        assert index in plan, plan


def test_a_state_that_keeps_the_status_leaves_the_status_and_its_index_entry_alone(db_url: str) -> None:
    token_id = _token(db_url)
    prediction = _prediction(token_id, id="9" * 26, upstream_id="up-9", submission=Submission.ACCEPTED)
    _in_transaction(db_url, lambda connection: _INSERT.execute(connection, _row_values(prediction)))
    settings = make_settings(db_url, "http://127.0.0.1:9/replicate", "relay-key")
    statements: list[str] = []

    async def scenario() -> tuple[str, str]:
        async with standalone_recorder(db_url, settings) as (recorder, transactions):
            if db_url.startswith("sqlite"):
                await transactions.run(lambda c: c.connection.dbapi_connection.set_trace_callback(statements.append))
            base = {"id": "up-9", "status": "starting", "logs": "loading"}
            kept = await recorder.apply_upstream_state(prediction.id, parse_prediction(base))
            if db_url.startswith("sqlite"):
                await transactions.run(lambda c: c.connection.dbapi_connection.set_trace_callback(None))
            moved = await recorder.apply_upstream_state(
                prediction.id, parse_prediction({**base, "status": "processing"}))
            return kept.status, moved.status

    assert asyncio.run(scenario()) == ("starting", "processing")
    (row,) = rows(db_url, "prediction")
    assert (row["status"], row["logs"]) == ("processing", "loading")
    if db_url.startswith("sqlite"):
        (update_sql,) = [sql for sql in statements if sql.startswith("UPDATE prediction")]
        assigned = update_sql.split(" SET ", 1)[1].split(" WHERE ", 1)[0].replace(" ", "")
        assert "logs=" in assigned, update_sql
        assert "status=" not in assigned, update_sql
