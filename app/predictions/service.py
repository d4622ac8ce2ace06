"""Create, read, list and cancel predictions: short transactions around one upstream call."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from fnmatch import fnmatchcase
from functools import partial
from typing import Any, NoReturn, cast

import orjson
from sqlalchemy import Select, insert, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app import crashpoints, paging
from app.accounting import pricing
from app.accounting import service as accounting
from app.accounting.limits import SharedLimits
from app.columns import utcnow
from app.config import PriceRule, Settings
from app.db import HotReads, Prepared, Transactions, database_unavailable, detached
from app.errors import (
    Conflict,
    DatabaseUnavailable,
    Forbidden,
    GatewayError,
    NotFound,
    UpstreamCircuitOpen,
    UpstreamInvalid,
    UpstreamStatus,
    UpstreamTimeout,
    UpstreamUnavailable,
    ValidationFailed,
)
from app.expiring import ExpiringCache
from app.groups import service as groups
from app.predictions.deferred import DeferredWrites
from app.predictions.headers import cancel_after_seconds
from app.predictions.models import PREDICTIONS, TERMINAL_STATUSES, Prediction, Submission
from app.predictions.recording import UNKNOWN_MODEL, NotLinked, PredictionRecorder
from app.predictions.versions import KnownVersions
from app.tokens.models import ApiToken
from app.tokens.service import may_use_model, new_id
from app.upstream.client import UpstreamFailure
from app.upstream.registry import Registry, Upstream
from app.upstream.schemas import (
    InvalidUpstreamPrediction,
    UpstreamPrediction,
    parse_prediction,
    to_wire,
)
from app.webhooks import inbound

log = logging.getLogger(__name__)

PAGE_SIZE = 100
FINAL_CACHE_SIZE = 2000
RUNNING_CACHE_SIZE = 2000
FINAL_BASES_KEPT = 4  # public bases (hosts, prefixes) a final prediction's answer is kept for
FIRST_POLL_SECONDS = 2.0
# A client's poll waits this long at most for the upstream, then gets the last recorded state:
# clients poll every half second, and Python's gives up on an answer after 30 s.
POLL_REFRESH_SECONDS = 5.0
# Cancels an upstream answers with these have nothing to act on there (relays document no
# cancel): the prediction is answered as it stands, as Replicate answers a cancel it cannot do.
CANCEL_UNSUPPORTED = frozenset({404, 405, 501})
IN_DOUBT_MARGIN_SECONDS = 5.0
DEFERRED_WRITES_DIR = "deferred-writes"  # under the storage directory
# What an upstream declared `rejects_with_5xx` answers itself. Not 502, 504 or Cloudflare's
# 52x: a proxy in front of it answers those, also after the upstream has accepted the create
# (a 504 when the create outlives the proxy's time-out), so another upstream would run it twice.
_REFUSED_BEFORE_ACCEPTING = frozenset({500, 501, 503})
_DATA_URI = re.compile(r"^data:([^;,]{0,100})(;[^,]{0,200})?,", re.IGNORECASE)
# A table-level insert: the ORM's flush (unit of work, identity map) cost a fifth of a create.
_INSERT = Prepared(insert(PREDICTIONS))


@dataclass(frozen=True)
class CreateTarget:
    """Where a create goes upstream and what we know of it before the upstream answers."""

    upstream_path: str
    model: str | None
    version: str | None = None
    deployment: str | None = None

    def path_for(self, upstream: Upstream) -> str:
        """The path at this upstream, with the model named as that upstream names it."""
        if self.model is not None and self.upstream_path == f"v1/models/{self.model}/predictions":
            return f"v1/models/{upstream.upstream_model(self.model)}/predictions"
        return self.upstream_path


def redact_secret(value: Any, caller_secret: str) -> Any:
    """The input without the caller's own token, which one official client can put there."""
    if isinstance(value, dict):
        return {k: redact_secret(v, caller_secret) for k, v in value.items()}
    if isinstance(value, list):
        return [redact_secret(v, caller_secret) for v in value]
    if isinstance(value, str) and caller_secret and caller_secret in value:
        return value.replace(caller_secret, "[redacted]")
    return value


def reduce_data_uris(value: Any) -> Any:
    """The input as the ledger keeps it: each `data:` URI replaced by its type, digest and size."""
    if isinstance(value, dict):
        return {k: reduce_data_uris(v) for k, v in value.items()}
    if isinstance(value, list):
        return [reduce_data_uris(v) for v in value]
    if isinstance(value, str):
        match = _DATA_URI.match(value)
        if match:
            digest = hashlib.sha256(value.encode()).hexdigest()
            return f"data:{match.group(1)};sha256={digest};bytes={len(value)},"
    return value


def _may_fail_over(upstream: Upstream, failure: UpstreamFailure) -> bool:
    """Whether a failed create may go to the next upstream: only when nothing can have been
    created here (never sent, throttled, our key refused or out of credit), or a 500, 501 or 503
    from an upstream declared to answer them only before accepting. A caller's own mistake (4xx)
    is answered as it is."""
    status = failure.error.status
    if not failure.maybe_sent:
        return not (400 <= status < 500) or status in (401, 403, 429)
    return (upstream.config.rejects_with_5xx and isinstance(failure.error, UpstreamStatus)
            and status in _REFUSED_BEFORE_ACCEPTING)


def _unchanged(row: Prediction, reply: UpstreamPrediction) -> bool:
    """Whether an upstream answer would change nothing a client sees in an unfinished row."""
    return (
        reply.status == row.status
        and reply.status not in TERMINAL_STATUSES
        and reply.output == row.output
        and reply.logs == row.logs
        and reply.metrics == row.metrics
        and reply.streamable == row.streamable
        and (reply.error is None or reply.error == row.error)
        and (reply.started_at is None or reply.started_at == row.started_at)
        and not (row.model == UNKNOWN_MODEL and reply.model)
        and not (row.version is None and reply.version)
    )


def _copy(row: Prediction) -> Prediction:
    """Another session-less object with a session-less row's values."""
    return detached(Prediction, **{name: value for name, value in row.__dict__.items()
                                   if not name.startswith("_sa_")})


def _note_health(upstream: Upstream, error: GatewayError) -> None:
    """Failures of the upstream itself count towards its breaker; its answers to callers do not."""
    if error.status >= 500:
        upstream.breaker.failed()
    elif error.status != 429:
        upstream.breaker.succeeded()


class PredictionService(PredictionRecorder):
    """The prediction operations, bound to one database and its upstreams."""

    def __init__(
        self,
        *,
        transactions: Transactions,
        registry: Registry,
        settings: Settings,
        key: bytes,
        hot_reads: HotReads,
        read_sessions: async_sessionmaker[AsyncSession],
        limits: SharedLimits | None = None,
    ) -> None:
        super().__init__(transactions=transactions, registry=registry, settings=settings, key=key,
                         limits=limits)
        self._read_sessions = read_sessions
        self._hot_reads = hot_reads
        # A create's own writes that met the database away, kept on disk and retried until they land.
        self.deferred = DeferredWrites(journal=settings.storage_dir / DEFERRED_WRITES_DIR)
        self.versions = KnownVersions(transactions, read_sessions)
        # Creates whose callers were answered before the upstream was (a sync wait that ran out).
        self._continuing: set[asyncio.Task[Any]] = set()
        # Final predictions, which clients poll again and again, served without a database read,
        # each with its answer as already rendered for the public bases it was asked through.
        self._finals: OrderedDict[str, Prediction] = OrderedDict()
        self._final_bodies: dict[str, dict[str, bytes]] = {}
        # Unfinished predictions, which clients poll as often: each GET asks the upstream and
        # compares its answer with this row, read again only after `running_cache_seconds` or
        # once this process has written the prediction: reading it each time nearly doubled a
        # poll's CPU (210 µs against 118 at c64).
        self._running = ExpiringCache[str, Prediction](settings.running_cache_seconds, RUNNING_CACHE_SIZE)
        # A running row's answer as last rendered, by id: kept while the poll finds the row
        # unchanged (the same object), dropped when this process writes the prediction.
        self._running_bodies: OrderedDict[str, tuple[Prediction, str, bytes]] = OrderedDict()
        # Writes this process has recorded, counted: a row read while one landed may predate it
        # and is not kept (it would show a finished prediction unfinished again for a while).
        self._writes_recorded = 0
        # How far the database's clock is ahead of this process's (PostgreSQL's; nil on SQLite),
        # as the reconciler last read it: a create's in-doubt and Cancel-After deadlines are
        # compared with the database's clock, so a process running behind it must not set them
        # already past (nor one running ahead set them late).
        self._database_ahead = timedelta(0)
        # The upstream reads in flight, by prediction id, each with the polls waiting on it:
        # clients, streams and sync waits polling one prediction at once share one read (and
        # its recording) instead of each asking the upstream and writing what it says.
        self._reads: dict[str, list[asyncio.Future[Prediction | None]]] = {}

    def note_database_time(self, moment: datetime) -> None:
        """Learn how far the database's clock is from this process's, from `moment`, its time now."""
        self._database_ahead = moment - utcnow()

    async def create(
        self,
        *,
        token: ApiToken,
        caller_secret: str,
        target: CreateTarget,
        body: dict[str, Any],
        prefer: str | None,
        wait: int | None,
        cancel_after: str | None,
        idempotency_key: str | None = None,
        webhook: str | None = None,
        webhook_events_filter: list[str] | None = None,
        webhook_completed: str | None = None,
        public_base: str | None = None,
        caller_input: dict[str, Any] | None = None,
        recorded_as: asyncio.Future[Prediction] | None = None,
    ) -> tuple[Prediction, bool]:
        """Admit, record, forward, record the outcome; returns the prediction and whether it is
        an idempotent replay. The row and its reservation exist before any byte leaves, and
        `recorded_as`, if given, is resolved with it then."""
        if target.version is not None and target.upstream_path == "v1/predictions":
            target = await self._with_known_model(token, target)
        if target.model is not None and not may_use_model(token, target.model):
            raise Forbidden(f"This token may not run {target.model}")
        if target.model is None and token.model_globs:
            raise Forbidden(
                "This token is limited to some models; give the version as owner/name:version_id"
            )
        # The group was loaded with the token: its limits and multiplier as of this request.
        group = token.group
        groups.check_model(group, target.model)
        forwarded = {**body, "input": redact_secret(body["input"], caller_secret)}
        # What the caller sent (before its file URLs were resolved) is what we keep and compare.
        recorded = redact_secret(caller_input if caller_input is not None else body["input"], caller_secret)
        request_hash = None
        if idempotency_key is not None:
            # Where the events go is part of the request: the same key with another webhook is
            # another request (422), not a replay that would leave the new receiver unaware.
            # Only when set, so that a key used before webhooks were hashed still replays.
            subscription = {name: value for name, value in (
                ("webhook", webhook), ("webhook_events_filter", webhook_events_filter),
                ("webhook_completed", webhook_completed)) if value is not None}
            request_hash = hashlib.sha256(orjson.dumps(
                {"path": target.upstream_path, "body": {**forwarded, "input": recorded}, **subscription},
                option=orjson.OPT_SORT_KEYS,
            )).hexdigest()
            replayed = await self._replay(token, idempotency_key, request_hash)
            if replayed is not None:
                return replayed, True
        candidates = self._registry.candidates(target.model)
        if not candidates:
            raise NotFound(f"No upstream serves {target.model}")
        # Failover walks this list only, so it never leaves the group's upstreams.
        candidates = groups.allowed_upstreams(group, candidates, target.model)
        ppm = groups.multiplier_of(group)
        rule = pricing.find_rule(self._prices, target.model) if target.model else None
        now = utcnow()
        # Each upstream's own time-outs: the reconciler must not resolve a create still on its way.
        in_doubt_after = candidates[0].client.longest_create_seconds(wait) + IN_DOUBT_MARGIN_SECONDS
        # Each key is a column: the same values make the object and the inserted row.
        values: dict[str, Any] = {
            "id": new_id(),
            "token_id": token.id,
            "upstream": candidates[0].name,
            "submission": Submission.PENDING,
            "model": target.model or UNKNOWN_MODEL,
            "version": target.version,
            "deployment": target.deployment,
            "status": "starting",
            "input": reduce_data_uris(recorded),
            "created_at": now,
            "updated_at": now,
            "estimate_micros": pricing.estimate_of(rule, self._settings.default_estimate, ppm,
                                                   prediction_input=body["input"],
                                                   metered_default=self._settings.metered_estimate),
            "price_multiplier_ppm": ppm,
            "bill_failures": (rule is not None and rule.bill_failures) or candidates[0].config.bill_failures,
            "submit_deadline": now + self._database_ahead + timedelta(seconds=in_doubt_after),
            "cancel_deadline": (now + self._database_ahead + timedelta(seconds=cancel_after_seconds(cancel_after))
                                if cancel_after else None),
            "idempotency_key": idempotency_key,
            "request_hash": request_hash,
            "webhook": webhook,
            "webhook_events_filter": webhook_events_filter,
            "webhook_completed": webhook_completed,
            "public_base": public_base,
            # What a flush would have filled in: the row is written by a plain insert below.
            "streamable": False, "poll_attempts": 0, "webhook_sequence": 0, "outputs_archived": False,
            "missing_polls": 0,
        }
        prediction = detached(Prediction, **values)
        # Unset columns are left to the database (SQL NULL).
        row_values = {name: value for name, value in values.items() if value is not None}
        # Rate and in-flight slots come from Redis when it answers; the database then checks
        # only the budget, and slots it refuses (or never records) are given back.
        held = await self._limits.take(token=token, prediction_id=prediction.id, now=now,
                                       finished_among=self._finished_among)
        # Admission, the row and its reservation commit together, before the upstream call:
        # a crash after sending leaves a row for the reconciler, never an unrecorded prediction.
        def admit_and_record(connection: Connection) -> None:
            accounting.admit(connection, token_id=token.id, estimate_micros=prediction.estimate_micros,
                             now=now, limits_taken=held is not None)
            _INSERT.execute(connection, row_values)
            accounting.reserve(connection, prediction_id=prediction.id, token_id=token.id,
                               estimate_micros=prediction.estimate_micros)

        async def admit_and_record_in_one() -> None:
            statement = accounting.create_in_one(limits_taken=held is not None, names=tuple(row_values))
            parameters = accounting.admission_parameters(
                token_id=token.id, estimate_micros=prediction.estimate_micros, now=now)
            parameters.update({f"row_{name}": value for name, value in row_values.items()}, reserved_at=utcnow())
            if await self._transactions.direct.scalar(statement, parameters) == 0:
                await self._transactions.run(lambda connection: accounting.refuse(
                    connection, token_id=token.id, estimate_micros=prediction.estimate_micros, now=now,
                    limits_taken=held is not None), one_write=True)

        try:
            if self._transactions.groups_commits:
                await self._transactions.run(admit_and_record)
            else:
                await admit_and_record_in_one()
        except IntegrityError:
            await self._limits.undo(held)
            if idempotency_key is None or request_hash is None:
                raise
            replayed = await self._replay(token, idempotency_key, request_hash)
            if replayed is None:
                raise Conflict("A request with this Idempotency-Key is in progress") from None
            return replayed, True
        except BaseException as error:
            await self._limits.undo(held)
            if isinstance(error, Exception) and database_unavailable(error):
                # The admission may have committed without its answer reaching us.
                raise self._database_away(prediction) from None
            raise

        if recorded_as is not None and not recorded_as.done():
            recorded_as.set_result(_copy(prediction))
        crashpoints.reached("create.recorded")
        # The client's webhook stays with us; the upstream may get our own inbound URL instead.
        hook = inbound.inbound_url(self._settings, self._key, prediction.id)
        if hook is not None:
            forwarded = {**forwarded, "webhook": hook, "webhook_events_filter": ["completed"]}
        refusal: GatewayError = UpstreamUnavailable("No upstream can take this prediction now")
        for upstream in candidates:
            breaker = upstream.breaker
            if not breaker.allow():
                refusal = UpstreamCircuitOpen(int(breaker.cooldown))
                continue
            # Allowed through a breaker that is not closed: this create is its one probe.
            probe = breaker.opened_at is not None
            try:
                if upstream.name != prediction.upstream:
                    # Recorded before forwarded, again: the row names the upstream about to get it.
                    try:
                        await self._move(prediction, upstream, rule, wait)
                    except Exception as error:
                        if not database_unavailable(error):
                            raise
                        raise self._database_away(prediction) from None
                try:
                    data = await upstream.client.create_prediction(
                        target.path_for(upstream), forwarded, prefer=prefer, cancel_after=cancel_after,
                        wait_seconds=wait,
                    )
                    reply = upstream.client.prediction(data, ours=prediction.id)
                except UpstreamFailure as failure:
                    _note_health(upstream, failure.error)
                    if _may_fail_over(upstream, failure):
                        log.warning("upstream.failover",
                                    extra={"prediction_id": prediction.id, "upstream": upstream.name})
                        refusal = failure.error
                        continue
                    await self._record_failed_create(prediction, failure.error.detail, failure.maybe_sent)
                    raise failure.error from None
                except InvalidUpstreamPrediction as exc:
                    breaker.failed()
                    upstream.client.answer_was_invalid("create")
                    log.warning("upstream.invalid_prediction",
                                extra={"prediction_id": prediction.id, "reason": str(exc)})
                    await self._record_failed_create(prediction, "invalid upstream response", maybe_sent=True)
                    raise UpstreamInvalid() from None
                breaker.succeeded()
                crashpoints.reached("create.accepted")
                accepted = await self._record_accepted(prediction, reply)
                crashpoints.reached("create.linked")
                return accepted, False
            finally:
                if probe:
                    breaker.probe_ended()
        await self._record_failed_create(prediction, refusal.detail, maybe_sent=False)
        raise refusal

    async def _finished_among(self, prediction_ids: list[str]) -> dict[str, bool]:
        """Which of these predictions the database holds, and whether each is final."""
        async with self._read_sessions() as session:
            found = await session.execute(
                select(Prediction.id, Prediction.status).where(Prediction.id.in_(prediction_ids)))
        return {prediction_id: status in TERMINAL_STATUSES for prediction_id, status in found}

    async def _move(self, prediction: Prediction, upstream: Upstream, rule: PriceRule | None,
                    wait: int | None) -> None:
        now = utcnow()
        prediction.upstream = upstream.name
        prediction.bill_failures = (rule is not None and rule.bill_failures) or upstream.config.bill_failures
        # The time taken on the upstreams before does not count against this one's deadline.
        prediction.submit_deadline = now + self._database_ahead + timedelta(
            seconds=upstream.client.longest_create_seconds(wait) + IN_DOUBT_MARGIN_SECONDS)
        statement = (
            update(PREDICTIONS)
            .where(PREDICTIONS.c.id == prediction.id, PREDICTIONS.c.submission == Submission.PENDING)
            .values(upstream=upstream.name, bill_failures=prediction.bill_failures,
                    submit_deadline=prediction.submit_deadline, updated_at=now)
        )
        await self._transactions.run(lambda connection: connection.execute(statement))

    async def _replay(self, token: ApiToken, key: str, request_hash: str) -> Prediction | None:
        async with self._read_sessions() as session:
            row = (await session.scalars(select(Prediction).where(
                Prediction.token_id == token.id, Prediction.idempotency_key == key
            ))).first()
        if row is None:
            return None
        if not hmac.compare_digest(row.request_hash or "", request_hash):
            raise ValidationFailed([{
                "type": "idempotency", "field": "Idempotency-Key",
                "description": "was already used with a different request",
            }])
        if row.submission == Submission.PENDING:
            raise Conflict("A request with this Idempotency-Key is in progress")
        return await self.get(token, row.id)

    def _database_away(self, prediction: Prediction) -> DatabaseUnavailable:
        """The answer to a create that met the database away before it was sent. Its row, if one
        was written, is released once the database is back, not left for the reconciler to charge."""
        self._reject_later(prediction, "The gateway's database was unavailable")
        return DatabaseUnavailable()

    def _reject_later(self, prediction: Prediction, reason: str) -> None:
        self.deferred.add("rejection", prediction.id,
                          lambda: self._write_failed_create(prediction, reason, maybe_sent=False),
                          record={"reason": reason})

    def resume_deferred(self) -> int:
        """Retry the writes an earlier process kept on disk and did not land (it stopped while
        the database was away); before the reconciler's first pass, so that it leaves their
        predictions to them. The number resumed."""
        resumed = 0
        for what, prediction_id, record in self.deferred.kept():
            try:
                if what == "link":
                    write = partial(self._link_kept, prediction_id, parse_prediction(record["reply"]))
                elif what == "rejection":
                    write = partial(self._reject_kept, prediction_id, str(record["reason"]))
                else:
                    raise ValueError(what)
            except (KeyError, ValueError):
                # Left on disk for someone to look at; it must not keep the gateway from starting.
                log.error("database.deferred_write_unreadable", extra={"what": what, "prediction_id": prediction_id})
                continue
            self.deferred.resume(what, prediction_id, write)
            resumed += 1
        if resumed:
            log.warning("database.deferred_writes_resumed", extra={"count": resumed})
        return resumed

    async def _link_kept(self, prediction_id: str, reply: UpstreamPrediction) -> None:
        row = await self._hot_reads.get(Prediction, prediction_id)
        if row is None or row.upstream_id == reply.id:
            return
        link = {"upstream_id": reply.id, "submission": Submission.ACCEPTED,
                "next_poll_at": utcnow() + timedelta(seconds=FIRST_POLL_SECONDS)}
        await self._link(row, reply, link)

    async def _reject_kept(self, prediction_id: str, reason: str) -> None:
        row = await self._hot_reads.get(Prediction, prediction_id)
        if row is not None and row.submission == Submission.PENDING:
            await self._write_failed_create(row, reason, maybe_sent=False)

    async def _record_failed_create(self, prediction: Prediction, reason: str, maybe_sent: bool) -> None:
        """Record that a create did not go through; with the database away, a create that was
        certainly not sent is released later, and one that may have been is left pending, which
        the reconciler treats as it would have treated it marked unknown."""
        try:
            await self._write_failed_create(prediction, reason, maybe_sent)
        except Exception as error:
            if not database_unavailable(error):
                raise
            if not maybe_sent:
                self._reject_later(prediction, reason)

    async def _write_failed_create(self, prediction: Prediction, reason: str, maybe_sent: bool) -> None:
        pending = (PREDICTIONS.c.id == prediction.id, PREDICTIONS.c.submission == Submission.PENDING)
        if maybe_sent:
            # In doubt: the reservation stays until the reconciler resolves it.
            statement = update(PREDICTIONS).where(*pending).values(
                submission=Submission.UNKNOWN, updated_at=utcnow())
            await self._transactions.run(lambda connection: connection.execute(statement))
        else:
            now = utcnow()

            def reject(connection: Connection) -> bool:
                result = connection.execute(update(PREDICTIONS).where(*pending).values(
                    submission=Submission.REJECTED, status="failed", error=reason, completed_at=now,
                    updated_at=now, cost_micros=0, idempotency_key=None, next_poll_at=None))
                if result.rowcount != 1:
                    return False
                accounting.close(
                    connection, prediction_id=prediction.id, token_id=prediction.token_id,
                    estimate_micros=prediction.estimate_micros,
                    outcome=accounting.Outcome(charged=False, amount_micros=0), now=now,
                )
                return True

            if await self._transactions.run(reject):
                await self._limits.release(prediction.token_id, prediction.id)
        log.info("prediction.create_failed", extra={
            "prediction_id": prediction.id, "maybe_sent": maybe_sent})

    async def _with_known_model(self, token: ApiToken, target: CreateTarget) -> CreateTarget:
        """A version create's target with the version's model, if an upstream has shown it.

        A bare id then runs as its model (limits, routing, pricing). A model the caller named
        with the id that is not the version's own does not get a limited token past its limits:
        the version's own model must be allowed too."""
        version = cast(str, target.version)
        group = token.group
        limited = bool(token.model_globs) or (group is not None and group.model_globs is not None)
        # Only a limited token reads the ledger for it: for the others it decides nothing.
        model = await self.versions.model_of(version) if limited else self.versions.cached(version)
        if model is None:
            return target
        if target.model is None:
            return replace(target, model=model)
        if limited and model != target.model:
            if not may_use_model(token, model):
                raise Forbidden(f"Version {version} is of {model}, which this token may not run")
            groups.check_model(group, model)
        return target

    async def _learn_version(self, prediction: Prediction, reply: UpstreamPrediction) -> None:
        upstream = self._registry.get(prediction.upstream or "")
        if prediction.version is not None and reply.model and upstream is not None:
            model = upstream.our_model(reply.model)
            if self.versions.cached(prediction.version) != model:
                await self.versions.learn(model, [prediction.version])

    async def _record_accepted(self, prediction: Prediction, reply: UpstreamPrediction) -> Prediction:
        if prediction.version is not None:
            await self._learn_version(prediction, reply)
        now = utcnow()
        link = {"upstream_id": reply.id, "submission": Submission.ACCEPTED,
                "next_poll_at": now + timedelta(seconds=FIRST_POLL_SECONDS)}
        try:
            return await self._link(prediction, reply, link)
        except Exception as error:
            if not database_unavailable(error):
                raise
        # The upstream has the prediction: answer with it, as the upstream described it, and
        # link it once the database is back. Answering an error instead would invite a second
        # create, and leave the caller without the id of a prediction that runs. (A failed
        # attempt leaves `prediction` as it was: only a recorded state is copied onto it.)
        self.deferred.add("link", prediction.id, lambda: self._link(prediction, reply, link),
                          record={"reply": to_wire(reply)})
        answer = _copy(prediction)
        answer.__dict__.update(self._state_values(reply, prediction.upstream, now))
        if reply.status in TERMINAL_STATUSES:
            answer.completed_at = reply.completed_at or now
        return answer

    async def _link(self, prediction: Prediction, reply: UpstreamPrediction, link: dict[str, Any]) -> Prediction:
        try:
            # Linking and the first state are one transaction: a create costs two, not three.
            row = await self.apply_upstream_state(prediction.id, reply, first=True, known=prediction,
                                                  upstream_name=prediction.upstream, link=link)
        except NotLinked:
            # An earlier attempt may have committed without its answer reaching us.
            current = await self._hot_reads.get(Prediction, prediction.id)
            if current is not None and current.upstream_id == reply.id:
                return current
            await self._unlinkable(prediction)
        except IntegrityError:
            await self._unlinkable(prediction)
        log.info("prediction.created", extra={"prediction_id": prediction.id, "upstream": prediction.upstream})
        return row

    async def _unlinkable(self, prediction: Prediction) -> NoReturn:
        # The upstream handed out an id we already hold for another prediction, or the row was
        # resolved without it meanwhile: never link two of our rows to one upstream prediction.
        log.error("upstream.unlinkable_create", extra={"prediction_id": prediction.id})
        await self._record_failed_create(prediction, "invalid upstream response", maybe_sent=True)
        raise UpstreamInvalid() from None

    async def by_stream_capability(self, prediction_id: str) -> Prediction | None:
        """A prediction for its stream URL (the capability was checked by the caller)."""
        async with self._read_sessions() as session:
            row = await session.get(Prediction, prediction_id)
        if row is None or row.submission == Submission.REJECTED:
            return None
        return row

    async def owned(self, token: ApiToken, prediction_id: str) -> Prediction:
        """The caller's prediction, or NotFound (the same answer for another token's)."""
        row = self._finals.get(prediction_id) or self._running.get(prediction_id)
        if row is None:
            writes_before = self._writes_recorded
            row = await self._hot_reads.get(Prediction, prediction_id)
            if row is not None and not row.is_terminal and self._writes_recorded == writes_before:
                self._running.put(prediction_id, row)
        if row is None or row.token_id != token.id or row.submission == Submission.REJECTED:
            raise NotFound("The requested prediction could not be found")
        return row

    def _recorded(self, prediction_id: str) -> None:
        self._writes_recorded += 1
        self._running.forget(prediction_id)
        self._running_bodies.pop(prediction_id, None)

    async def get(self, token: ApiToken, prediction_id: str) -> Prediction:
        """The caller's prediction, refreshed from the upstream unless it is already final."""
        row = await self.refreshed(await self.owned(token, prediction_id), within=POLL_REFRESH_SECONDS)
        if self._finals.get(row.id) is row:
            self._finals.move_to_end(row.id)
        elif self._never_changes(row):
            self._finals[row.id] = row
            self._final_bodies.pop(row.id, None)
            while len(self._finals) > FINAL_CACHE_SIZE:
                evicted, _ = self._finals.popitem(last=False)
                self._final_bodies.pop(evicted, None)
        return row

    def rendered(self, row: Prediction, public_base: str, render: Callable[[Prediction], bytes]) -> bytes:
        """`render(row)`, kept for a final prediction: it is the same bytes every time it is asked."""
        if self._finals.get(row.id) is not row:
            return self._rendered_running(row, public_base, render)
        bodies = self._final_bodies.setdefault(row.id, {})
        body = bodies.get(public_base)
        if body is None:
            if len(bodies) >= FINAL_BASES_KEPT:
                bodies.clear()
            body = bodies[public_base] = render(row)
        return body

    def _rendered_running(self, row: Prediction, public_base: str, render: Callable[[Prediction], bytes]) -> bytes:
        # Rows in the running cache are replaced, never changed, once written (`_recorded`), so
        # the same object renders the same bytes; rendering them anew on every poll cost 4.5% of
        # the running polls a second at c64 (interleaved runs).
        if self._running.get(row.id) is not row:
            return render(row)
        kept = self._running_bodies.get(row.id)
        if kept is not None and kept[0] is row and kept[1] == public_base:
            return kept[2]
        body = render(row)
        self._running_bodies[row.id] = (row, public_base, body)
        self._running_bodies.move_to_end(row.id)
        while len(self._running_bodies) > RUNNING_CACHE_SIZE:
            self._running_bodies.popitem(last=False)
        return body

    def _never_changes(self, row: Prediction) -> bool:
        # A final row is fixed, except that the archiver may still swap a succeeded one's outputs.
        if not row.is_terminal or row.submission == Submission.REJECTED:
            return False
        return row.status != "succeeded" or not any(
            fnmatchcase(row.model, glob) for glob in self._settings.durable_outputs)

    def continue_in_background(self, create: asyncio.Task[Any]) -> None:
        """Let a create go on after its caller was answered: it records its own outcome, and a
        failure it raises is only logged, the caller having gone."""
        self._continuing.add(create)
        create.add_done_callback(self._continued)

    async def finish_continuing(self, longest_seconds: float) -> None:
        """Let the creates still going on record their outcome (each is bounded by its own
        time-outs), for at most `longest_seconds`; cancel the rest, which the reconciler then
        treats as creates in doubt."""
        if not self._continuing:
            return
        _, late = await asyncio.wait(list(self._continuing), timeout=longest_seconds)
        for create in late:
            create.cancel()
        await asyncio.gather(*late, return_exceptions=True)

    def _continued(self, create: asyncio.Task[Any]) -> None:
        self._continuing.discard(create)
        if not create.cancelled() and create.exception() is not None:
            log.info("prediction.create_ended_after_answer", extra={"error": type(create.exception()).__name__})

    async def wait_until_final(self, prediction: Prediction, *, deadline: float) -> Prediction:
        """Poll the upstream until the prediction is final or the loop clock reaches `deadline`,
        for upstreams that ignore `Prefer: wait`."""
        loop = asyncio.get_running_loop()
        row = prediction
        # An unlinked one (its link still waiting for the database) has nothing to refresh from.
        while not row.is_terminal and row.upstream_id is not None:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            await asyncio.sleep(min(self._settings.stream_poll_interval, remaining))
            if loop.time() < deadline:
                try:
                    # Within what is left: a slow upstream GET must not hold the answer past N s.
                    row = await self.refreshed(row, within=deadline - loop.time())
                except Exception as error:
                    if not database_unavailable(error):
                        raise
                    # The create is recorded and linked: its last state, not an error that
                    # would invite a second create.
                    break
        return row

    async def refreshed(self, row: Prediction, *, within: float | None = None) -> Prediction:
        """The prediction brought up to date from the upstream, unless it is final or unlinked;
        as it was, if the upstream has not answered within `within` seconds (when given). A read
        of it already in flight is joined rather than sent again."""
        upstream = self._registry.get(row.upstream)
        upstream_id = row.upstream_id
        if row.is_terminal or upstream_id is None or upstream is None:
            return row
        waiting = self._reads.get(row.id)
        if waiting is not None:
            return await self._join_read(row, waiting, within)
        self._reads[row.id] = waiting = []
        fresh: Prediction | None = None
        try:
            fresh = await self._read_upstream(row, upstream_id, upstream, within)
        finally:
            del self._reads[row.id]
            for joined in waiting:
                if not joined.done():
                    joined.set_result(fresh)
        return row if fresh is None else fresh

    async def _join_read(self, row: Prediction, waiting: list[asyncio.Future[Prediction | None]],
                         within: float | None) -> Prediction:
        joined: asyncio.Future[Prediction | None] = asyncio.get_running_loop().create_future()
        waiting.append(joined)
        try:
            fresh = await (joined if within is None else asyncio.wait_for(joined, within))
        except TimeoutError:
            return row
        return row if fresh is None else fresh

    async def _read_upstream(self, row: Prediction, upstream_id: str, upstream: Upstream,
                             within: float | None) -> Prediction | None:
        """The prediction as the upstream now says it is, recorded if it changed; None if the
        upstream did not answer usefully (the last known state stands)."""
        try:
            reply = upstream.client.prediction(
                await upstream.client.get_prediction(upstream_id, within=within), ours=row.id)
        except UpstreamFailure as failure:
            # The last known state is still true; a relay blip must not break a client's poll.
            # Under the caller's bound a time-out may be the bound's own doing, which says
            # nothing of the upstream's health: only other failures count then.
            if within is None or not isinstance(failure.error, UpstreamTimeout):
                _note_health(upstream, failure.error)
            log.warning("prediction.refresh_failed", extra={"prediction_id": row.id, "status": failure.error.status})
            return None
        except InvalidUpstreamPrediction:
            upstream.client.answer_was_invalid("get")
            log.warning("prediction.refresh_failed", extra={"prediction_id": row.id, "status": 502})
            return None
        if reply.id != upstream_id:
            upstream.client.answer_was_invalid("get")
            log.error("upstream.mismatched_id", extra={"prediction_id": row.id})
            return None
        upstream.breaker.succeeded()
        if _unchanged(row, reply):
            return row  # most polls of a running prediction: nothing to write
        return await self.apply_upstream_state(row.id, reply, upstream_name=row.upstream)

    async def cancel(self, token: ApiToken, prediction_id: str) -> Prediction:
        """Cancel upstream (never retried); a final prediction is returned as it is."""
        row = await self.owned(token, prediction_id)
        if row.is_terminal or row.upstream_id is None:
            return row
        upstream = self._registry.get(row.upstream)
        if upstream is None:
            raise UpstreamUnavailable("The upstream that runs this prediction is no longer configured")
        try:
            reply = upstream.client.prediction(await upstream.client.cancel_prediction(row.upstream_id), ours=row.id)
        except UpstreamFailure as failure:
            if failure.error.status in CANCEL_UNSUPPORTED:
                log.warning("prediction.cancel_unsupported",
                            extra={"prediction_id": row.id, "status": failure.error.status})
                return await self.refreshed(row, within=POLL_REFRESH_SECONDS)
            raise failure.error from None
        except InvalidUpstreamPrediction:
            upstream.client.answer_was_invalid("cancel")
            raise UpstreamInvalid() from None
        if reply.id != row.upstream_id:
            upstream.client.answer_was_invalid("cancel")
            raise UpstreamInvalid()
        crashpoints.reached("cancel.accepted")
        log.info("prediction.cancel_requested", extra={"prediction_id": row.id})
        return await self.apply_upstream_state(row.id, reply, upstream_name=row.upstream)

    async def page(
        self, token: ApiToken, *, key: bytes, cursor_text: str | None,
        created_after: datetime | None = None, created_before: datetime | None = None,
    ) -> tuple[list[Prediction], str | None, str | None]:
        """A newest-first page of the caller's predictions with `next` and `previous` cursors,
        optionally only those created at or after `created_after` and before `created_before`."""
        query = select(Prediction).where(
            Prediction.token_id == token.id, Prediction.submission != Submission.REJECTED
        )
        if created_after is not None:
            query = query.where(Prediction.created_at >= created_after)
        if created_before is not None:
            query = query.where(Prediction.created_at < created_before)

        async def fetch(statement: Select[Any]) -> list[Prediction]:
            async with self._read_sessions() as session:
                return list((await session.scalars(statement)).all())

        page = await paging.newest_first(
            query, Prediction.created_at, Prediction.id, cursor_text=cursor_text, token_id=token.id, key=key,
            size=PAGE_SIZE, fetch=fetch, position_of=lambda row: (row.created_at, row.id),
        )
        return page.rows, page.next_cursor, page.previous_cursor

    async def refresh(self, prediction_id: str) -> Prediction | None:
        """Refresh any token's unfinished prediction from the upstream (an inbound webhook's hint);
        the state recorded is the upstream's answer, never what the hint said."""
        async with self._read_sessions() as session:
            row = await session.get(Prediction, prediction_id)
        return None if row is None else await self.refreshed(row)
