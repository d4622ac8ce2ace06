"""Rate and in-flight limits shared through Redis, with the database as the fallback."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import cast
from urllib.parse import parse_qs, unquote, urlsplit

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from app.accounting.service import MINUTE_MICROS, in_flight_refusal, rate_clock, rate_refusal
from app.config import Settings
from app.tokens.models import ApiToken

log = logging.getLogger(__name__)

# A hung Redis costs a create at most this long before the database takes over.
TIMEOUT_SECONDS = 0.5
# A minute's counter is read through the next minute as the previous one; one minute more
# covers gateway clocks slightly apart.
RATE_KEY_SECONDS = 180
# Past the longest a prediction can stay unfinished (its maximum life, the reconciler's grace
# for a failed cancel, 3 minutes, then its last poll), an in-flight entry can only be a slot a
# crash never gave back.
SLOT_MARGIN_SECONDS = 300
# An in-flight entry whose prediction the database does not hold may still be a create between
# its admission here and its row's commit; older than this, it is one that never got a row.
UNRECORDED_GRACE_SECONDS = 60
REDIS_ERRORS = (RedisError, OSError)

ADMITTED, RATE_REFUSED, IN_FLIGHT_REFUSED = 0, 1, 2

# Given prediction ids, which of them the database holds and whether each is final.
FinishedAmong = Callable[[list[str]], Awaitable[dict[str, bool]]]

# KEYS: this minute's create counter, the in-flight set (prediction id scored by Redis time),
# the previous minute's create counter. ARGV: rpm limit and in-flight limit (-1: none),
# prediction id, slot lifetime, counter lifetime, the previous minute's weight (`rate_clock`).
# Both limits are checked and both slots taken in one script, so no other admission interleaves.
# Answers {verdict, previous count, current count}: a rate refusal's Retry-After needs both.
# The rate rule is `rate_admits`; Lua's doubles hold its products exactly (below 2^53, so for
# fewer than 150 million creates a minute).
_ADMIT = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local lifetime = tonumber(ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - lifetime)
local rpm = tonumber(ARGV[1])
if rpm >= 0 then
  local counts = redis.call('MGET', KEYS[3], KEYS[1])
  local previous = tonumber(counts[1] or '0')
  local current = tonumber(counts[2] or '0')
  if previous * tonumber(ARGV[6]) >= (rpm - current) * MINUTE_MICROS then
    return {1, previous, current}
  end
end
local max_in_flight = tonumber(ARGV[2])
if max_in_flight >= 0 and redis.call('ZCARD', KEYS[2]) >= max_in_flight then
  return {2, 0, 0}
end
redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[5]))
redis.call('ZADD', KEYS[2], now, ARGV[3])
redis.call('EXPIRE', KEYS[2], math.ceil(lifetime))
return {0, 0, 0}
""".replace("MINUTE_MICROS", str(MINUTE_MICROS))

# KEYS: the admission's minute counter, the in-flight set. ARGV: prediction id.
# The count is given back only with the slot, so undoing twice gives back once.
_UNDO = """
if redis.call('ZREM', KEYS[2], ARGV[1]) == 1 and tonumber(redis.call('GET', KEYS[1]) or '0') > 0 then
  redis.call('DECR', KEYS[1])
end
return 0
"""


def connect(settings: Settings) -> Redis | None:
    """A Redis client for `GATEWAY_REDIS_URL` (no connection is made yet), or None without it."""
    if settings.redis_url is None:
        return None
    return Redis.from_url(
        settings.redis_url.get_secret_value(),
        socket_timeout=TIMEOUT_SECONDS,
        socket_connect_timeout=TIMEOUT_SECONDS,
        # One reconnect covers a pooled connection Redis closed; a time-out is never retried.
        retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
    )


def url_secrets(settings: Settings) -> list[str]:
    """What of `GATEWAY_REDIS_URL` the logs must never show: the URL and its password,
    as written and decoded, in the user-info or in the query."""
    if settings.redis_url is None:
        return []
    url = settings.redis_url.get_secret_value()
    parts = urlsplit(url)
    password = parts.password or ""
    found = {url, password, unquote(password), *parse_qs(parts.query).get("password", [])}
    return sorted(value for value in found if value)


def slot_lifetime(settings: Settings) -> float:
    """Seconds after which an in-flight entry is taken for one a crash left behind."""
    return settings.max_prediction_seconds + settings.poll_backoff_max + SLOT_MARGIN_SECONDS


@dataclass(frozen=True)
class Admission:
    """The slots one create holds in Redis: a count in its minute and an in-flight entry."""

    token_id: str
    prediction_id: str
    rate_key: str


class SharedLimits:
    """Every process's creates counted in one Redis; without Redis, or while it fails, `take`
    answers None and the database's guarded update enforces the limits instead."""

    def __init__(
        self,
        redis: Redis | None = None,
        *,
        prefix: str = "",
        slot_seconds: float = 0.0,
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        self._redis = redis
        self._prefix = prefix
        self._slot_seconds = slot_seconds
        self._on_error = on_error
        self._admit = redis.register_script(_ADMIT) if redis is not None else None
        self._undo = redis.register_script(_UNDO) if redis is not None else None

    @classmethod
    def from_settings(
        cls, settings: Settings, redis: Redis | None, on_error: Callable[[str], None] | None = None
    ) -> SharedLimits:
        """Limits kept under `GATEWAY_REDIS_PREFIX` in `redis` (None: in the database only)."""
        return cls(redis, prefix=settings.redis_prefix, slot_seconds=slot_lifetime(settings),
                   on_error=on_error)

    def rate_key(self, token_id: str, minute: int) -> str:
        """The key counting a token's creates in one minute (minutes since the epoch)."""
        # The braces keep a token's keys in one Redis Cluster slot, as one script needs.
        return f"{self._prefix}{{{token_id}}}:rate:{minute}"

    def in_flight_key(self, token_id: str) -> str:
        """The sorted set of a token's unfinished predictions, scored by admission time."""
        return f"{self._prefix}{{{token_id}}}:in_flight"

    async def take(self, *, token: ApiToken, prediction_id: str, now: datetime,
                   finished_among: FinishedAmong | None = None) -> Admission | None:
        """Take a rate and an in-flight slot for this create, or raise 429 with nothing taken;
        None when the database has to check the limits (no Redis, or Redis failed).

        Refused for its in-flight limit, the token's entries are first checked against the
        database with `finished_among`: those a crash never gave back (between a settlement's
        commit and its release here, or between an admission here and its row) are dropped, and
        the admission is tried once more."""
        if self._admit is None:
            return None
        # Tokens without limits are counted too, so a limit set later sees what already runs.
        minute, weight = rate_clock(now)
        rate_key = self.rate_key(token.id, minute)
        try:
            answer = await self._admit(
                keys=[rate_key, self.in_flight_key(token.id), self.rate_key(token.id, minute - 1)],
                args=[_limit(token.rpm_limit), _limit(token.max_in_flight), prediction_id,
                      self._slot_seconds, RATE_KEY_SECONDS, weight],
            )
        except REDIS_ERRORS as exc:
            self._failed("admit", exc)
            return None
        verdict, previous, current = (int(value) for value in cast("list[int]", answer))
        if verdict == RATE_REFUSED and token.rpm_limit is not None:
            raise rate_refusal(token.rpm_limit, now, previous=previous, current=current)
        if verdict == IN_FLIGHT_REFUSED and token.max_in_flight is not None:
            if finished_among is not None and await self._drop_stale(token.id, finished_among):
                return await self.take(token=token, prediction_id=prediction_id, now=now)
            raise in_flight_refusal(token.max_in_flight)
        return Admission(token_id=token.id, prediction_id=prediction_id, rate_key=rate_key)

    async def _drop_stale(self, token_id: str, finished_among: FinishedAmong) -> bool:
        """Drop the token's in-flight entries that hold no running prediction; whether any were."""
        redis = self._redis
        if redis is None:
            return False
        key = self.in_flight_key(token_id)
        try:
            entries = await redis.zrange(key, 0, -1, withscores=True)
            clock = await redis.time()  # (seconds, microseconds)
        except REDIS_ERRORS as exc:
            self._failed("prune", exc)
            return False
        # withscores: (member, score) pairs, which redis-py's annotations do not say.
        pairs = cast("list[tuple[bytes | str, float]]", entries)
        admitted = {(member.decode() if isinstance(member, bytes) else member): float(score)
                    for member, score in pairs}
        known = await finished_among(list(admitted))
        now = float(clock[0]) + float(clock[1]) / 1_000_000
        stale = [prediction_id for prediction_id, at in admitted.items()
                 if known.get(prediction_id, now - at > UNRECORDED_GRACE_SECONDS)]
        if not stale:
            return False
        try:
            await redis.zrem(key, *stale)
        except REDIS_ERRORS as exc:
            self._failed("prune", exc)
            return False
        log.warning("limits.stale_slots_dropped", extra={"token_id": token_id, "count": len(stale)})
        return True

    async def undo(self, admission: Admission | None) -> None:
        """Give back both slots of a create the database refused or never recorded."""
        if admission is None or self._undo is None:
            return
        undo = self._undo
        keys = [admission.rate_key, self.in_flight_key(admission.token_id)]
        await self._finish("undo", lambda: undo(keys=keys, args=[admission.prediction_id]))

    async def release(self, token_id: str, prediction_id: str) -> None:
        """Give back a final prediction's in-flight slot; call it after that transaction
        commits. Idempotent, and a no-op for a prediction the database admitted."""
        redis = self._redis
        if redis is None:
            return
        key = self.in_flight_key(token_id)
        await self._finish("release", lambda: redis.zrem(key, prediction_id))

    async def _finish(self, operation: str, call: Callable[[], Awaitable[object]]) -> None:
        async def run() -> None:
            try:
                await call()
            except REDIS_ERRORS as exc:
                # The entry is pruned once it is older than a prediction can live.
                self._failed(operation, exc)

        # Shielded: a caller cancelled after its commit must still give the slot back.
        await asyncio.shield(run())

    def _failed(self, operation: str, exc: BaseException) -> None:
        if self._on_error is not None:
            self._on_error(operation)
        log.warning("limits.redis_failed", extra={
            "operation": operation, "error": type(exc).__name__, "reason": str(exc)[:200],
            "fallback": "database" if operation == "admit" else "pruned later",
        })


def _limit(value: int | None) -> int:
    return -1 if value is None else value
