"""Recording what an upstream says: a compare-and-set that settles a prediction exactly once."""

from __future__ import annotations

import logging
from functools import cache
from typing import Any

from sqlalchemy import Select, Update, bindparam, update
from sqlalchemy.engine import Connection

from app import crashpoints
from app.accounting import pricing
from app.accounting import service as accounting
from app.accounting.limits import SharedLimits
from app.columns import utcnow
from app.config import Settings
from app.db import Prepared, Transactions, entity_by_key, in_values
from app.errors import NotFound
from app.predictions.models import PREDICTIONS, TERMINAL_STATUSES, Prediction, Submission
from app.upstream.registry import Registry
from app.upstream.schemas import UpstreamPrediction
from app.webhooks import outbox

log = logging.getLogger(__name__)

UNKNOWN_MODEL = "unknown/unknown"

# Which stored statuses a new upstream status may replace: never backwards, never out of terminal.
_MAY_FOLLOW = {
    "starting": ("starting",),
    "processing": ("starting", "processing"),
    **dict.fromkeys(TERMINAL_STATUSES, ("starting", "processing")),
}


def _compare_and_set(status: str, linking: bool, names: tuple[str, ...]) -> Update:
    columns = PREDICTIONS.c
    condition = [columns.id == bindparam("match_id"), in_values(columns.status, _MAY_FOLLOW.get(status, ()))]
    if linking:
        condition += [columns.submission == Submission.PENDING, columns.upstream_id.is_(None)]
    return update(PREDICTIONS).where(*condition).values(
        {name: bindparam(f"set_{name}", type_=columns[name].type) for name in names})


@cache
def _state_update(status: str, linking: bool, names: tuple[str, ...]) -> Prepared:
    """The compare-and-set that records an upstream state (parameters `match_id` and `set_{name}`),
    built once per shape: building and keying it on every poll cost more than running it."""
    return Prepared(_compare_and_set(status, linking, names))


@cache
def _final_state_in_one(status: str, linking: bool, names: tuple[str, ...]) -> Select[int]:
    """The compare-and-set of a final state with the prediction's settlement or release, as one
    statement for PostgreSQL (`accounting.close_in_one`), built once per shape."""
    # A new update, not the Prepared one's: once compiled, a statement keeps memoized state that
    # its generative copies inherit, and a CTE made from it with RETURNING lost its columns.
    return accounting.close_in_one(_compare_and_set(status, linking, names))


class NotLinked(Exception):
    """A create's answer could not be linked to its row (it was no longer pending and unlinked)."""


class PredictionRecorder:
    """Writes upstream states to the ledger; the base of the prediction operations."""

    def __init__(
        self,
        *,
        transactions: Transactions,
        registry: Registry,
        settings: Settings,
        key: bytes,
        limits: SharedLimits | None = None,
    ) -> None:
        self._transactions = transactions
        self._registry = registry
        self._settings = settings
        self._prices = settings.prices
        self._key = key
        self._limits = limits if limits is not None else SharedLimits()

    def _outcome(self, row: Prediction, reply: UpstreamPrediction) -> accounting.Outcome:
        billable = reply.status == "succeeded" or row.bill_failures
        if not billable:
            return accounting.Outcome(charged=False, amount_micros=0)
        rule = pricing.find_rule(self._prices, reply.model or row.model)
        # Priced with the multiplier recorded at create time, never the group's current one.
        cost = pricing.cost_of(rule, status=reply.status, output=reply.output, metrics=reply.metrics,
                               ppm=row.price_multiplier_ppm)
        if cost.note is not None:
            # Unknown cost is charged at the estimate and flagged, never silently at zero.
            return accounting.Outcome(True, row.estimate_micros, f"charged at the estimate: {cost.note}")
        return accounting.Outcome(True, cost.micros)

    def _state_values(self, reply: UpstreamPrediction, upstream_name: str | None, now: Any) -> dict[str, Any]:
        values: dict[str, Any] = {
            "status": reply.status,
            "output": reply.output,
            "logs": reply.logs,
            "metrics": reply.metrics,
            "updated_at": now,
            "streamable": reply.streamable,
        }
        if reply.error is not None:
            values["error"] = reply.error
        if reply.started_at is not None:
            values["started_at"] = reply.started_at
        if reply.extra:
            owner = self._registry.get(upstream_name) if upstream_name else None
            values["upstream_extra"] = {
                k: (owner.client.scrub(v) if owner else "[removed]") if isinstance(v, str) else v
                for k, v in reply.extra.items()
            }
        return values

    async def apply_upstream_state(
        self, prediction_id: str, reply: UpstreamPrediction, *, first: bool = False,
        upstream_name: str | None = None, link: dict[str, Any] | None = None, known: Prediction | None = None,
    ) -> Prediction:
        """Record what the upstream says, as a compare-and-set that never moves status backwards;
        a first final status is settled or released in the same transaction (on PostgreSQL, for a
        prediction without a webhook, in the same statement).

        With `link`, the same update also links a pending create to its upstream prediction
        (and only a still pending, unlinked one); NotLinked is raised when it was not. `known` is
        the row as this process just wrote it, which spares reading it again."""
        now = utcnow()
        values = self._state_values(reply, upstream_name, now)
        if link is not None:
            values.update(link)
        terminal = reply.status in TERMINAL_STATUSES

        def planned(row: Prediction) -> tuple[Any, dict[str, Any], accounting.Outcome | None]:
            """The compare-and-set's shape and parameters for this row (`values` completed)."""
            outcome = self._outcome(row, reply) if terminal else None
            if outcome is not None:
                values.update(completed_at=reply.completed_at or now, next_poll_at=None, lease_until=None,
                              cost_micros=outcome.amount_micros if outcome.charged else 0,
                              cost_note=outcome.note)
            if row.model == UNKNOWN_MODEL and reply.model:
                values["model"] = reply.model
            if row.version is None and reply.version:
                values["version"] = reply.version
            if reply.status == row.status:
                # Left out, so its index entry is not rewritten. Statuses never move backwards,
                # so a row at least this far on that the compare-and-set lets through is at it.
                del values["status"]
            shape = (reply.status, link is not None, tuple(values))
            parameters = {"match_id": prediction_id, **{f"set_{name}": value for name, value in values.items()}}
            return shape, parameters, outcome

        def recorded(row: Prediction, outcome: accounting.Outcome | None) -> None:
            # The row now holds exactly `values`: no need to read it back. It is a session-less
            # object (`detached`), so its attributes are plain entries of its dictionary.
            row.__dict__.update(values)
            if outcome is not None:
                log.info("prediction.finished", extra={
                    "prediction_id": prediction_id, "status": reply.status,
                    "charged_micros": outcome.amount_micros if outcome.charged else 0})

        def record(connection: Connection) -> tuple[Prediction, bool]:
            row = known if known is not None else entity_by_key(connection, Prediction, prediction_id)
            if row is None:
                raise NotFound("The requested prediction could not be found")
            previous_status = row.status
            previous_output, previous_logs = row.output, row.logs
            shape, parameters, outcome = planned(row)
            changed = _state_update(*shape).execute(connection, parameters) == 1
            if link is not None and not changed:
                raise NotLinked()
            if not changed:
                # Someone else moved it on: answer with what they wrote.
                return self._reread(connection, prediction_id), False
            if outcome is not None:
                accounting.close(
                    connection, prediction_id=prediction_id, token_id=row.token_id,
                    estimate_micros=row.estimate_micros, outcome=outcome, now=now,
                )
            recorded(row, outcome)
            if row.webhook:
                outbox.record_events(connection, row, previous_status=None if first else previous_status,
                                     key=self._key, now=now, previous_output=previous_output,
                                     previous_logs=previous_logs)
            return row, outcome is not None

        async def record_alone(row: Prediction) -> tuple[Prediction, bool]:
            # One statement in no transaction: the compare-and-set, with a final state's
            # settlement or release (`accounting.close_in_one`).
            direct = self._transactions.direct
            shape, parameters, outcome = planned(row)
            if outcome is not None:
                parameters.update(accounting.closing_parameters(
                    estimate_micros=row.estimate_micros, outcome=outcome, now=now))
                changed = await direct.scalar(_final_state_in_one(*shape), parameters) == 1
            else:
                changed = await direct.rowcount(_state_update(*shape).statement, parameters) == 1
            if link is not None and not changed:
                raise NotLinked()
            if not changed:
                return await self._reread_alone(prediction_id), False
            recorded(row, outcome)
            return row, outcome is not None

        try:
            if self._transactions.groups_commits:
                row, closed = await self._transactions.run(record)
            else:
                # On PostgreSQL the row is read first, in a round trip of its own (the
                # compare-and-set guards the update as it did inside the transaction, where the
                # read took no lock either), so that it says whether anything but the update and
                # the settlement can follow: webhook events, only for a prediction with a webhook.
                # Without them the update, with the settlement of a final state, is one statement
                # in no transaction.
                if known is None:
                    known = await self._reread_alone(prediction_id)
                if known.webhook:
                    row, closed = await self._transactions.run(record)
                else:
                    row, closed = await record_alone(known)
        finally:
            self._recorded(prediction_id)
        if closed:
            crashpoints.reached("prediction.settled")
            await self._limits.release(row.token_id, prediction_id)
        return row

    async def _reread_alone(self, prediction_id: str) -> Prediction:
        row = await self._transactions.direct.entity(Prediction, prediction_id)
        if row is None:
            raise NotFound("The requested prediction could not be found")
        return row

    def _recorded(self, prediction_id: str) -> None:
        """Called once this process has written (or tried to write) a prediction's state."""

    @staticmethod
    def _reread(connection: Connection, prediction_id: str) -> Prediction:
        row = entity_by_key(connection, Prediction, prediction_id)
        if row is None:
            raise NotFound("The requested prediction could not be found")
        return row

    async def force_finish(
        self, prediction_id: str, *, status: str, reason: str, only_unlinked: bool = False
    ) -> bool:
        """End a prediction the upstream cannot account for: final `status`, charged at the
        estimate and flagged with `reason`. False when it was already final (or linked)."""
        now = utcnow()
        columns = PREDICTIONS.c
        condition = [columns.id == prediction_id, columns.status.in_(("starting", "processing"))]
        if only_unlinked:
            condition += [columns.upstream_id.is_(None),
                          columns.submission.in_((Submission.PENDING, Submission.UNKNOWN))]

        def finish(connection: Connection) -> Prediction | None:
            row = entity_by_key(connection, Prediction, prediction_id)
            if row is None:
                return None
            result = connection.execute(update(PREDICTIONS).where(*condition).values(
                status=status, error=reason, completed_at=now, updated_at=now,
                submission=Submission.UNKNOWN if row.upstream_id is None else row.submission,
                cost_micros=row.estimate_micros, cost_note=f"charged at the estimate: {reason}",
                next_poll_at=None, lease_until=None,
            ))
            if result.rowcount != 1:
                return None
            previous_status = row.status
            previous_output, previous_logs = row.output, row.logs
            accounting.close(
                connection, prediction_id=prediction_id, token_id=row.token_id,
                estimate_micros=row.estimate_micros,
                outcome=accounting.Outcome(True, row.estimate_micros, f"charged at the estimate: {reason}"),
                now=now,
            )
            row = self._reread(connection, prediction_id)
            if row.webhook:
                outbox.record_events(connection, row, previous_status=previous_status,
                                     key=self._key, now=now, previous_output=previous_output,
                                     previous_logs=previous_logs)
            return row

        try:
            finished = await self._transactions.run(finish)
        finally:
            self._recorded(prediction_id)
        if finished is None:
            return False
        await self._limits.release(finished.token_id, prediction_id)
        log.warning("prediction.force_finished", extra={"prediction_id": prediction_id, "status": status})
        return True
