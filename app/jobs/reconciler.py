"""The reconciler: finishes what clients abandon, so every prediction ends settled exactly once."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Select, Update, func, literal, or_, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.columns import UTCDateTime, utcnow
from app.config import Settings
from app.db import Transactions, database_now, session_now
from app.errors import Throttled
from app.foreground import Foreground
from app.outputs.archiver import OutputArchiver
from app.predictions.models import TERMINAL_STATUSES, Prediction, Submission
from app.predictions.service import CANCEL_UNSUPPORTED, IN_DOUBT_MARGIN_SECONDS, PredictionService
from app.upstream.client import UpstreamFailure
from app.upstream.registry import Registry, Upstream
from app.upstream.schemas import InvalidUpstreamPrediction, UpstreamPrediction

log = logging.getLogger(__name__)

BATCH_SIZE = 128
CONCURRENCY = 64
RECORDING = 2
# An upstream 404 ends a prediction as forgotten only once this many polls in a row, over at
# least this long, were answered 404. A relay's load balancer or a lagging replica answers one
# now and then (right after a create above all), and a final status never moves back, so one
# 404 must not end a prediction that runs; a relay keeps what it forgets gone (its retention is
# about an hour), so a minute of 404s costs a forgotten prediction nothing but that minute.
FORGOTTEN_AFTER_POLLS = 3
FORGOTTEN_AFTER = timedelta(minutes=1)
# How long past its deadline an unfinished prediction whose cancel failed is still polled for
# the upstream's own final state before it is ended at the estimate: a 5xx or time-out says
# nothing of whether the cancel (or the prediction) went through. Shorter than the margin after
# which a Redis in-flight slot is taken for a crash's (accounting.limits.SLOT_MARGIN_SECONDS).
EXPIRY_GRACE = timedelta(minutes=3)
IDEMPOTENCY_KEY_HOURS = 24
KEY_SWEEP_EVERY = timedelta(minutes=10)
IN_DOUBT_REASON = "The gateway could not confirm this prediction with the upstream"
EXPIRED_REASON = "The prediction ran longer than the gateway's maximum lifetime"
CANCEL_AFTER_REASON = "The prediction passed the deadline its Cancel-After set"
FORGOTTEN_REASON = "The upstream no longer knows this prediction"


@dataclass(frozen=True)
class Claim:
    """A prediction leased to this reconciler until `lease_until`."""

    id: str
    upstream: str
    upstream_id: str
    created_at: datetime
    poll_attempts: int
    lease_until: datetime
    # Its Cancel-After deadline, if the create gave one.
    cancel_deadline: datetime | None = None
    # Its run of polls answered 404, and whether a cancel was sent at its deadline.
    missing_polls: int = 0
    cancel_sent_at: datetime | None = None


def due_for_polling(
    now: datetime,
) -> Select[str, str, str | None, datetime, int, datetime | None, int, datetime | None]:
    """The next batch of linked, unfinished predictions whose poll is due, soonest first."""
    return (
        select(Prediction.id, Prediction.upstream, Prediction.upstream_id, Prediction.created_at,
               Prediction.poll_attempts, Prediction.cancel_deadline, Prediction.missing_polls,
               Prediction.cancel_sent_at)
        .where(
            # "Not final" rather than "starting or processing": the same rows, but SQLite then
            # walks the next_poll_at index in order instead of sorting every unfinished
            # prediction on each pass.
            Prediction.status.not_in(TERMINAL_STATUSES),
            Prediction.submission == Submission.ACCEPTED,
            Prediction.upstream_id.is_not(None),
            Prediction.next_poll_at <= now,
            or_(Prediction.lease_until.is_(None), Prediction.lease_until < now),
        )
        .order_by(Prediction.next_poll_at)
        .limit(BATCH_SIZE)
    )


def expired_idempotency_keys(cutoff: datetime) -> Update:
    """Forget the idempotency keys of predictions created before `cutoff`."""
    return (update(Prediction)
            .where(Prediction.idempotency_key.is_not(None), Prediction.created_at < cutoff)
            .values(idempotency_key=None))


class Reconciler:
    """Polls unfinished predictions on a back-off schedule; any number of instances may run it."""

    def __init__(
        self,
        *,
        sessions: async_sessionmaker[AsyncSession],
        transactions: Transactions,
        read_sessions: async_sessionmaker[AsyncSession],
        registry: Registry,
        service: PredictionService,
        settings: Settings,
        archiver: OutputArchiver | None = None,
        foreground: Foreground | None = None,
    ) -> None:
        self._sessions = sessions
        # Claims, releases and reschedules are short writes of the kind requests make, so they
        # join the requests' group commits. A write session held SQLite's write lock for 1.5 to
        # 2 ms a pass (a hop to its thread for every statement), and each create arriving
        # meanwhile waited that long for its admission.
        self._transactions = transactions
        self._read_sessions = read_sessions
        self._registry = registry
        self._service = service
        self._settings = settings
        self._archiver = archiver
        # Each step (a claim, a poll sent, an answer recorded) first gives way to the requests
        # in progress: a request arriving during a burst of them would wait for all of it.
        self._foreground = foreground if foreground is not None else Foreground()
        # Polls run CONCURRENCY at a time, but their results are recorded RECORDING at a time:
        # a request's write transaction then waits behind a few settlements, not a whole batch.
        self._recording = asyncio.Semaphore(RECORDING)
        # Long enough for the slowest upstream's poll: a lease lapsing mid-poll lets another
        # instance poll the same prediction.
        longest_poll = max((u.client.longest_call_seconds() for u in registry.all),
                           default=settings.request_timeout + settings.connect_timeout)
        self._lease = timedelta(seconds=longest_poll + 5)
        self._keys_expired_at: datetime | None = None
        self._backlog = False

    async def run_until(self, stop: asyncio.Event) -> None:
        """Reconcile every interval until `stop` is set; a failed pass is logged and retried.

        It stops between passes, never inside one: a pass cancelled mid-transaction could
        leave a connection holding SQLite's write lock."""
        while not stop.is_set():
            try:
                await self.run_once()
            except Exception as exc:
                log.error("reconciler.pass_failed", extra={"error": type(exc).__name__})
            if self._backlog:
                continue  # a full batch: more is due now, so the interval would only add lag
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self._settings.reconcile_interval)

    async def run_once(self) -> int:
        """One pass: poll what is due, resolve creates in doubt, expire old idempotency keys."""
        self._backlog = False
        await self._foreground.give_way()
        claims = await self._claim()
        self._backlog = len(claims) == BATCH_SIZE
        gate = asyncio.Semaphore(CONCURRENCY)

        async def poll(claim: Claim) -> None:
            async with gate:
                await self._foreground.give_way()
                await self._poll_once(claim)

        try:
            outcomes = await asyncio.gather(*(poll(claim) for claim in claims), return_exceptions=True)
        finally:
            await self._release(claims)
        for outcome in outcomes:
            if isinstance(outcome, Exception):
                log.error("reconciler.poll_failed", extra={"error": type(outcome).__name__})
        resolved = await self._resolve_in_doubt()
        await self._expire_idempotency_keys()
        if self._archiver is not None:
            await self._archiver.run_once()
        return len(claims) + resolved

    def _backoff(self, attempts: int) -> timedelta:
        return timedelta(seconds=min(self._settings.poll_backoff_max, 2.0 * 2 ** min(attempts, 10)))

    async def _claim(self) -> list[Claim]:
        def claim(connection: Connection) -> list[Claim]:
            now = database_now(connection)
            self._service.note_database_time(now)
            rows = connection.execute(due_for_polling(now).with_for_update(skip_locked=True)).all()
            lease_until = now + self._lease
            # One update per back-off step rather than one per row; a Cancel-After deadline
            # sooner than the step is polled then instead (one already past keeps the back-off:
            # this pass cancels at it).
            by_next_poll: dict[tuple[int, datetime], list[str]] = {}
            for row in rows:
                next_poll_at = now + self._backoff(row.poll_attempts)
                if row.cancel_deadline is not None and row.cancel_deadline > now:
                    next_poll_at = min(next_poll_at, row.cancel_deadline)
                by_next_poll.setdefault((row.poll_attempts, next_poll_at), []).append(row.id)
            for (attempts, next_poll_at), ids in by_next_poll.items():
                connection.execute(
                    update(Prediction).where(Prediction.id.in_(ids)).values(
                        lease_until=lease_until,
                        next_poll_at=next_poll_at,
                        poll_attempts=attempts + 1,
                    )
                )
            return [Claim(row.id, row.upstream, row.upstream_id, row.created_at, row.poll_attempts + 1, lease_until,
                          row.cancel_deadline, row.missing_polls, row.cancel_sent_at)
                    for row in rows]

        return await self._transactions.run(claim)

    async def _poll_once(self, claim: Claim) -> None:
        now = utcnow()
        deadline, expiry = self._deadline(claim)
        upstream = self._registry.get(claim.upstream)
        if upstream is None:
            log.error("reconciler.unknown_upstream", extra={"prediction_id": claim.id, "upstream": claim.upstream})
            return
        if now >= deadline:
            await self._expire(claim, upstream, expiry, past_grace=now >= deadline + EXPIRY_GRACE)
            return
        try:
            reply = await self._fetch(upstream, claim, cancel=False)
        except UpstreamFailure as failure:
            await self._after_failure(claim, failure)
            return
        except InvalidUpstreamPrediction:
            upstream.client.answer_was_invalid("get")
            log.warning("reconciler.invalid_reply", extra={"prediction_id": claim.id})
            return
        if claim.missing_polls:
            await self._found(claim)
        await self._record(claim, reply)

    def _deadline(self, claim: Claim) -> tuple[datetime, str]:
        """When the prediction is to be canceled, and why then."""
        lifetime = claim.created_at + timedelta(seconds=self._settings.max_prediction_seconds)
        if claim.cancel_deadline is not None and claim.cancel_deadline <= lifetime:
            return claim.cancel_deadline, CANCEL_AFTER_REASON
        return lifetime, EXPIRED_REASON

    async def _fetch(self, upstream: Upstream, claim: Claim, *, cancel: bool) -> UpstreamPrediction:
        if cancel:
            data = await upstream.client.cancel_prediction(claim.upstream_id)
        else:
            data = await upstream.client.get_prediction(claim.upstream_id)
        await self._foreground.give_way()
        reply = upstream.client.prediction(data, ours=claim.id)
        if reply.id != claim.upstream_id:
            raise InvalidUpstreamPrediction("mismatched id")
        return reply

    async def _record(self, claim: Claim, reply: UpstreamPrediction) -> bool:
        """Record the upstream's answer; whether the prediction is final now."""
        async with self._recording:
            row = await self._service.apply_upstream_state(claim.id, reply, upstream_name=claim.upstream)
        return row.is_terminal

    async def _expire(self, claim: Claim, upstream: Upstream, reason: str, *, past_grace: bool) -> None:
        """Cancel a prediction past its deadline (once), and end it as the upstream then shows it.

        A cancel that may have reached the upstream is never sent again, as the README promises
        of every cancel; later passes only read the prediction until it is final upstream or
        EXPIRY_GRACE has passed. One that provably never left (refused connection, 429) is
        sent on a later pass."""
        accepted = unsupported = False
        if claim.cancel_sent_at is None:
            sent_at = utcnow()
            await self._write(update(Prediction).where(Prediction.id == claim.id).values(cancel_sent_at=sent_at))
            try:
                if await self._record(claim, await self._fetch(upstream, claim, cancel=True)):
                    return
                accepted = True
            except UpstreamFailure as failure:
                unsupported = failure.error.status in CANCEL_UNSUPPORTED
                if not failure.maybe_sent:
                    await self._write(update(Prediction).where(
                        Prediction.id == claim.id, Prediction.cancel_sent_at == sent_at).values(cancel_sent_at=None))
                if isinstance(failure.error, Throttled):
                    await self._retry_after(claim, failure.error)
                log.warning("reconciler.cancel_failed", extra={"prediction_id": claim.id,
                                                                "status": failure.error.status})
            except InvalidUpstreamPrediction:
                upstream.client.answer_was_invalid("cancel")
                log.warning("reconciler.invalid_reply", extra={"prediction_id": claim.id})
        # The upstream may have finished it (or the cancel may have gone through) whatever the
        # cancel's answer: its own final state is charged as it is, never at the estimate.
        try:
            if await self._record(claim, await self._fetch(upstream, claim, cancel=False)):
                return
        except UpstreamFailure as failure:
            log.warning("reconciler.poll_failed", extra={"prediction_id": claim.id, "status": failure.error.status})
        except InvalidUpstreamPrediction:
            upstream.client.answer_was_invalid("get")
            log.warning("reconciler.invalid_reply", extra={"prediction_id": claim.id})
        if accepted:
            await self._service.force_finish(claim.id, status="canceled", reason=reason)
        elif unsupported or past_grace:
            await self._service.force_finish(claim.id, status="failed", reason=reason)

    async def _after_failure(self, claim: Claim, failure: UpstreamFailure) -> None:
        error = failure.error
        if error.status == 404:
            await self._missing(claim)
        elif isinstance(error, Throttled):
            await self._retry_after(claim, error)
        log.warning("reconciler.poll_failed", extra={"prediction_id": claim.id, "status": error.status})

    async def _missing(self, claim: Claim) -> None:
        """Count a poll answered 404; end the prediction once such answers have persisted."""
        now = utcnow()

        def count(connection: Connection) -> tuple[int, datetime]:
            connection.execute(update(Prediction).where(Prediction.id == claim.id).values(
                missing_polls=Prediction.missing_polls + 1,
                missing_since=func.coalesce(Prediction.missing_since, literal(now, UTCDateTime())),
            ))
            polls, since = connection.execute(
                select(Prediction.missing_polls, Prediction.missing_since).where(Prediction.id == claim.id)).one()
            return polls, since or now

        polls, since = await self._transactions.run(count)
        if polls >= FORGOTTEN_AFTER_POLLS and now - since >= FORGOTTEN_AFTER:
            await self._service.force_finish(claim.id, status="failed", reason=FORGOTTEN_REASON)

    async def _found(self, claim: Claim) -> None:
        """An answer ends a run of 404s: the upstream knows the prediction after all."""
        await self._write(update(Prediction).where(Prediction.id == claim.id)
                          .values(missing_polls=0, missing_since=None))

    async def _retry_after(self, claim: Claim, error: Throttled) -> None:
        retry_after = int(error.headers.get("Retry-After", "5"))
        await self._write(update(Prediction).where(Prediction.id == claim.id).values(
            next_poll_at=utcnow() + timedelta(seconds=retry_after)))

    async def _write(self, statement: Update) -> None:
        await self._transactions.run(lambda connection: connection.execute(statement))

    async def _release(self, claims: list[Claim]) -> None:
        if not claims:
            return
        # Fenced: only our own leases are released, never one another instance took since.
        # Every claim of a batch shares one lease moment.
        statement = (
            update(Prediction)
            .where(Prediction.id.in_([c.id for c in claims]), Prediction.lease_until == claims[0].lease_until)
            .values(lease_until=None)
        )
        await self._transactions.run(lambda connection: connection.execute(statement))

    async def _resolve_in_doubt(self) -> int:
        # A read alone: it neither takes nor waits for the write lock.
        async with self._read_sessions() as session:
            now = await session_now(session)
            ids = list((await session.scalars(
                select(Prediction.id).where(
                    Prediction.status.in_(("starting", "processing")),
                    Prediction.submission.in_((Submission.PENDING, Submission.UNKNOWN)),
                    Prediction.upstream_id.is_(None),
                    Prediction.submit_deadline < now,
                    # Implied by the deadline (it is at least the margin after creation), and it
                    # keeps the index scan to unfinished predictions older than the margin.
                    Prediction.created_at < now - timedelta(seconds=IN_DOUBT_MARGIN_SECONDS),
                ).limit(BATCH_SIZE)
            )).all())
        resolved = 0
        for prediction_id in ids:
            if self._service.deferred.holds(prediction_id):
                continue  # its own create is still writing its outcome, waiting for the database
            await self._foreground.give_way()
            if await self._service.force_finish(
                prediction_id, status="failed", reason=IN_DOUBT_REASON, only_unlinked=True
            ):
                resolved += 1
        return resolved

    async def _expire_idempotency_keys(self) -> None:
        now = utcnow()
        if self._keys_expired_at is not None and now - self._keys_expired_at < KEY_SWEEP_EVERY:
            return
        self._keys_expired_at = now
        async with self._sessions() as session:
            await session.execute(expired_idempotency_keys(now - timedelta(hours=IDEMPOTENCY_KEY_HOURS)))
            await session.commit()
