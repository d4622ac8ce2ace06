"""The webhook deliverer: claims due deliveries with a lease, POSTs them signed, retries or ends them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import httpx
from sqlalchemy import or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app import crashpoints
from app.columns import utcnow
from app.config import Settings
from app.db import HotReads, session_now
from app.outbound import outbound_client
from app.webhooks import guard
from app.webhooks.models import DeliveryStatus, WebhookDelivery
from app.webhooks.outbox import RETRY_SCHEDULE
from app.webhooks.signing import sign, team_secret

log = logging.getLogger(__name__)

BATCH_SIZE = 50
CONCURRENCY = 8
CONNECT_TIMEOUT = 5.0
TOTAL_TIMEOUT = 10.0
# A claim outlives the slowest attempt (resolve, then the whole request) with a margin.
LEASE = timedelta(seconds=guard.RESOLVE_TIMEOUT_SECONDS + TOTAL_TIMEOUT + 5)
STOP_TIMEOUT = LEASE.total_seconds()
JITTER = 0.2  # each retry waits its scheduled delay plus up to 20 %
MAX_RETRY_AFTER = 24 * 3600
REFUSED = "destination not allowed"
_random = secrets.SystemRandom()


@dataclass(frozen=True)
class Claim:
    """A delivery leased to this deliverer until `lease_until`; `attempts` counts this one."""

    id: int
    prediction_id: str
    token_id: str
    event: str
    message_id: str
    url: str
    body: str
    attempts: int
    max_attempts: int
    lease_until: datetime


@dataclass(frozen=True)
class Outcome:
    """What one attempt leaves: a final status, or pending with the seconds until the next try."""

    status: str
    last_status: int | None = None
    last_error: str | None = None
    retry_in: float | None = None


def retry_delay(attempts: int) -> float:
    """Seconds before the retry that follows failed attempt number `attempts` (1-based), jittered."""
    base = RETRY_SCHEDULE[min(attempts, len(RETRY_SCHEDULE)) - 1]
    return base * (1 + _random.uniform(0, JITTER))


def _retry_after(value: str | None) -> float | None:
    if value is None or not (value.isascii() and value.isdigit()):
        return None
    return float(min(max(int(value), 1), MAX_RETRY_AFTER))


class Deliverer:
    """Sends the webhook outbox; any number of instances may run it on one database."""

    def __init__(
        self,
        *,
        sessions: async_sessionmaker[AsyncSession],
        settings: Settings,
        key: bytes,
        resolver: guard.Resolver = guard.system_resolver,
        clock: Callable[[], datetime] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        hot_reads: HotReads | None = None,
    ) -> None:
        self._sessions = sessions
        self._hot_reads = hot_reads
        self._settings = settings
        self._key = key
        self._resolver = resolver
        self._clock = clock
        # Its own client, never the upstream's, and no pooled connection reused for another
        # webhook host.
        self._http = outbound_client(
            headers={"User-Agent": "replicate-gateway"},
            transport=transport,
            timeout=httpx.Timeout(TOTAL_TIMEOUT, connect=CONNECT_TIMEOUT),
            limits=httpx.Limits(max_connections=CONCURRENCY * 2, max_keepalive_connections=0),
        )

    async def aclose(self) -> None:
        """Close the HTTP client."""
        await self._http.aclose()

    async def run_until(self, stop: asyncio.Event) -> None:
        """Deliver every interval until `stop` is set; it stops between passes, never inside one."""
        while not stop.is_set():
            try:
                await self.run_once()
            except Exception as exc:
                log.error("webhooks.pass_failed", extra={"error": type(exc).__name__})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self._settings.webhook_interval)

    async def run_once(self) -> int:
        """One pass: claim what is due and attempt each; returns how many were attempted."""
        claims = await self._claim()
        gate = asyncio.Semaphore(CONCURRENCY)

        async def one(claim: Claim) -> None:
            async with gate:
                await self._deliver(claim)

        await asyncio.gather(*(one(claim) for claim in claims))
        return len(claims)

    async def _now(self, session: AsyncSession) -> datetime:
        if self._clock is not None:
            return self._clock()
        return await session_now(session)

    @staticmethod
    def _due(now: datetime) -> tuple[Any, ...]:
        return (
            WebhookDelivery.status == DeliveryStatus.PENDING,
            WebhookDelivery.next_attempt_at <= now,
            or_(WebhookDelivery.lease_until.is_(None), WebhookDelivery.lease_until < now),
        )

    async def _anything_due(self) -> bool:
        """Whether a claim would find anything, asked where that is cheap and takes no lock.

        On SQLite a claim is a write session: it held the process's write lock for 1.5 ms
        twice a second even with nothing to send, and requests' writes queued behind it. The
        database's own clock (PostgreSQL's) is left to the claim itself."""
        if self._hot_reads is None or not self._hot_reads.on_loop_thread:
            return True
        now = self._clock() if self._clock is not None else utcnow()
        return await self._hot_reads.first(select(WebhookDelivery.id).where(*self._due(now)).limit(1)) is not None

    async def _claim(self) -> list[Claim]:
        if not await self._anything_due():
            return []
        async with self._sessions() as session:
            now = await self._now(session)
            rows = (await session.scalars(
                select(WebhookDelivery)
                .where(*self._due(now))
                .order_by(WebhookDelivery.next_attempt_at, WebhookDelivery.id)
                .limit(BATCH_SIZE)
                .with_for_update(skip_locked=True)
            )).all()
            lease_until = now + LEASE
            claims = []
            for row in rows:
                if row.attempts >= row.max_attempts:
                    # Its last attempt died with its process: end it rather than exceed the budget.
                    await session.execute(
                        update(WebhookDelivery).where(WebhookDelivery.id == row.id)
                        .values(status=DeliveryStatus.DEAD, lease_until=None, finished_at=now,
                                last_error="the last attempt was interrupted")
                        .execution_options(synchronize_session=False)
                    )
                    continue
                # Counted when claimed, so a delivery that kills its process cannot loop forever.
                await session.execute(
                    update(WebhookDelivery).where(WebhookDelivery.id == row.id)
                    .values(lease_until=lease_until, attempts=row.attempts + 1)
                    .execution_options(synchronize_session=False)
                )
                claims.append(Claim(row.id, row.prediction_id, row.token_id, row.event, row.message_id,
                                    row.url, row.body, row.attempts + 1, row.max_attempts, lease_until))
            await session.commit()
            return claims

    async def _deliver(self, claim: Claim) -> None:
        try:
            outcome = await self._attempt(claim)
        except Exception as exc:
            log.error("webhooks.attempt_failed", extra={"delivery_id": claim.id, "error": type(exc).__name__})
            outcome = self._failed(claim, None, f"internal error ({type(exc).__name__})")
        crashpoints.reached("webhook.answered")
        await self._finish(claim, outcome)

    def _failed(self, claim: Claim, last_status: int | None, error: str,
                retry_in: float | None = None) -> Outcome:
        if claim.attempts >= claim.max_attempts:
            return Outcome(DeliveryStatus.DEAD, last_status, error)
        delay = retry_in if retry_in is not None else retry_delay(claim.attempts)
        return Outcome(DeliveryStatus.PENDING, last_status, error, delay)

    async def _attempt(self, claim: Claim) -> Outcome:
        if not self._settings.allow_http_webhooks and claim.url[:5].lower() == "http:":
            # Accepted while http was allowed; it no longer is.
            return Outcome(DeliveryStatus.DEAD, None, REFUSED)
        try:
            destination = await guard.resolve(
                claim.url, allow_private=self._settings.allow_private_webhooks, resolver=self._resolver
            )
        except guard.DestinationRefused:
            return Outcome(DeliveryStatus.DEAD, None, REFUSED)
        except guard.ResolutionFailed:
            return self._failed(claim, None, "the host name did not resolve")
        body = claim.body.encode()
        timestamp = int(time.time())
        headers = {
            "Content-Type": "application/json",
            "Host": destination.host_header,
            "webhook-id": claim.message_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(team_secret(self._key, claim.token_id), claim.message_id, timestamp, body),
        }
        # The request goes to the checked address itself, so a second lookup cannot rebind it;
        # TLS still verifies the name (SNI and certificate) the client gave.
        extensions = {"sni_hostname": destination.tls_name} if destination.url.scheme == "https" else {}
        request = self._http.build_request(
            "POST", destination.request_url, content=body, headers=headers, extensions=extensions
        )
        try:
            async with asyncio.timeout(TOTAL_TIMEOUT):
                response = await self._http.send(request, stream=True)
                await response.aclose()
        except (TimeoutError, httpx.TimeoutException):
            return self._failed(claim, None, "timed out")
        except httpx.TransportError as exc:
            return self._failed(claim, None, f"connection failed ({type(exc).__name__})")
        status = response.status_code
        if 200 <= status < 300:
            return Outcome(DeliveryStatus.DELIVERED, status)
        if status == 410:
            return Outcome(DeliveryStatus.DEAD, status, "the receiver answered 410 Gone")
        if status == 429:
            return self._failed(claim, status, "the receiver answered 429",
                                _retry_after(response.headers.get("retry-after")))
        if 300 <= status < 400:
            return self._failed(claim, status, f"the receiver answered {status} (redirects are not followed)")
        return self._failed(claim, status, f"the receiver answered {status}")

    @staticmethod
    async def _end_waiting_for(session: AsyncSession, claim: Claim, now: datetime) -> int:
        """A 410 disables the endpoint: the deliveries of the same team still waiting for that
        URL (not one being sent now) end dead too, rather than be retried for a day. An event that
        comes later is tried once."""
        result = await session.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.status == DeliveryStatus.PENDING, WebhookDelivery.token_id == claim.token_id,
                   WebhookDelivery.url == claim.url, WebhookDelivery.id != claim.id,
                   or_(WebhookDelivery.lease_until.is_(None), WebhookDelivery.lease_until < now))
            .values(status=DeliveryStatus.DEAD, lease_until=None, finished_at=now, last_status=410,
                    last_error="the receiver answered 410 Gone to another delivery")
            .execution_options(synchronize_session=False)
        )
        return int(result.rowcount)  # type: ignore[attr-defined]

    async def _finish(self, claim: Claim, outcome: Outcome) -> None:
        async with self._sessions() as session:
            now = await self._now(session)
            values: dict[str, object] = {"status": outcome.status, "last_status": outcome.last_status,
                                         "last_error": outcome.last_error, "lease_until": None}
            if outcome.status == DeliveryStatus.PENDING:
                values["next_attempt_at"] = now + timedelta(seconds=outcome.retry_in or 0)
            else:
                values["finished_at"] = now
            # Fenced: only while our lease stands, never over a claim another instance took since.
            result = await session.execute(
                update(WebhookDelivery)
                .where(WebhookDelivery.id == claim.id, WebhookDelivery.lease_until == claim.lease_until,
                       WebhookDelivery.status == DeliveryStatus.PENDING)
                .values(**values)
            )
            gone = 0
            if outcome.last_status == 410 and result.rowcount == 1:  # type: ignore[attr-defined]
                gone = await self._end_waiting_for(session, claim, now)
            await session.commit()
        if gone:
            log.warning("webhooks.endpoint_gone", extra={"delivery_id": claim.id, "ended": gone})
        fenced_out = result.rowcount != 1  # type: ignore[attr-defined]
        log.log(
            logging.WARNING if fenced_out or outcome.status != DeliveryStatus.DELIVERED else logging.INFO,
            "webhooks.lease_lost" if fenced_out else f"webhooks.{outcome.status}",
            extra={"delivery_id": claim.id, "prediction_id": claim.prediction_id, "webhook_event": claim.event,
                   "attempt": claim.attempts, "status": outcome.last_status, "error": outcome.last_error},
        )
