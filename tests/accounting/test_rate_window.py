"""The sliding-window rate limit, in the database's admission update and in Redis alike."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis
from redis.crc import key_slot

from app.accounting import service as accounting
from app.accounting.limits import SharedLimits, connect
from app.config import Settings
from app.db import Transactions, make_engine, make_sessionmaker
from app.errors import Throttled
from app.tokens.models import ApiToken
from tests.dbtools import create_token, token_row

# Creates are timed in seconds from the start of a minute (12:00:00 UTC), on a clock the tests
# set: the admission takes `now` as an argument, in the database and in Redis.
START = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
MINUTE = int(START.timestamp()) // 60


def at(seconds: float) -> datetime:
    """The instant `seconds` after 12:00:00, to the microsecond."""
    return START + timedelta(microseconds=round(seconds * 1_000_000))


class Limiter:
    """One token's creates against one store of rate counts."""

    def __init__(self, create: Callable[[datetime], None]) -> None:
        self._create = create

    def create(self, now: datetime) -> int | None:
        """Try a create at `now`: None when admitted, else the 429's Retry-After in seconds."""
        try:
            self._create(now)
        except Throttled as refused:
            return int(refused.headers["Retry-After"])
        return None


MakeLimiter = Callable[[int], Limiter]


@pytest.fixture
def runner() -> Iterator[asyncio.Runner]:
    """One event loop for a test's engine or Redis client and every create it makes."""
    with asyncio.Runner() as loop:
        yield loop


@pytest.fixture
def database_limiter(db_url: str, runner: asyncio.Runner) -> Iterator[MakeLimiter]:
    """Limiters whose creates run the admission update, each for a new token."""
    engine = make_engine(db_url)
    transactions = Transactions(engine, make_sessionmaker(engine))

    def make(rpm_limit: int) -> Limiter:
        name = f"t{uuid.uuid4().hex[:12]}"
        create_token(db_url, name, rpm_limit=rpm_limit)
        token_id = token_row(db_url, name)["id"]

        def create(now: datetime) -> None:
            runner.run(transactions.run(lambda connection: accounting.admit(
                connection, token_id=token_id, estimate_micros=0, now=now)))

        return Limiter(create)

    yield make
    transactions.dispose()
    runner.run(engine.dispose())


@pytest.fixture
def shared_limits(redis_url: str, redis_prefix: str, runner: asyncio.Runner) -> Iterator[SharedLimits]:
    """The gateway's Redis limits under this test's own prefix."""
    settings = Settings(_env_file=None, redis_url=redis_url, redis_prefix=redis_prefix)  # type: ignore[call-arg]
    client = connect(settings)
    assert client is not None
    yield SharedLimits.from_settings(settings, client)
    runner.run(client.aclose())


@pytest.fixture
def redis_limiter(shared_limits: SharedLimits, runner: asyncio.Runner) -> MakeLimiter:
    """Limiters whose creates run the Redis admission script, each for a new token."""

    def make(rpm_limit: int) -> Limiter:
        token = ApiToken(id=f"tok_{uuid.uuid4().hex[:12]}", rpm_limit=rpm_limit)

        def create(now: datetime) -> None:
            taken = runner.run(shared_limits.take(token=token, prediction_id=uuid.uuid4().hex, now=now))
            assert taken is not None, "Redis failed: the database would have decided"

        return Limiter(create)

    return make


RETRY_CASES = {
    # name: (limit, creates admitted first, the refused create, its Retry-After)
    # 10 at the previous minute's end, one at once in this one: the next needs 1 < 10 * e / 60 s.
    "previous minute weighed": (10, [59 + i * 0.05 for i in range(10)] + [60.5], 61.0, 6),
    # This minute full: in the next, its 10 weigh 10 until its first microsecond has passed.
    "this minute full": (10, [60 + i for i in range(10)], 70.0, 51),
    # 3 spread over the previous minute and one now: 3 * (1 - e / 60 s) + 1 < 3 from e > 20 s.
    "previous minute spread": (3, [10, 20, 30, 65], 65.0, 16),
    # At a minute's first microsecond the previous minute weighs in whole; a microsecond later
    # it does not quite, but Retry-After is never below a second.
    "first microsecond": (10, [59 + i * 0.05 for i in range(10)], 60.0, 1),
}


class Scenarios:
    """The rate limit's behaviour, run against each store by the classes below."""

    @pytest.fixture
    def make(self) -> MakeLimiter:
        raise NotImplementedError

    def test_a_full_minute_leaves_one_create_per_sixtieth_of_a_minute_per_limit_in_the_next(
        self, make: MakeLimiter
    ) -> None:
        limiter = make(10)
        assert [limiter.create(at(59 + i * 0.05)) for i in range(10)] == [None] * 10
        tried = [60 + k * 0.5 for k in range(61)]
        admitted = [t for t in tried if limiter.create(at(t)) is None]
        # A fixed window let 10 more through in the next minute's first 5 seconds. The previous
        # minute's 10 now weigh 10 * (1 - e / 60 s): one create at once, then one every 6 s.
        assert admitted == [60.5, 66.5, 72.5, 78.5, 84.5]

    @pytest.mark.parametrize(("limit", "every", "start"), [
        pytest.param(10, 6.1, 0.0, id="10-on-the-minute"),
        pytest.param(10, 6.1, 0.05, id="10-just-after"),
        pytest.param(10, 6.1, 5.95, id="10-late"),
        pytest.param(10, 6.0, 0.05, id="10-exactly-at-the-limit"),
        pytest.param(1, 60.5, 30.0, id="1"),
        pytest.param(60, 1.01, 0.5, id="60"),
    ])
    def test_a_client_creating_evenly_under_the_limit_is_never_refused(
        self, make: MakeLimiter, limit: int, every: float, start: float
    ) -> None:
        limiter = make(limit)
        tried = [start + k * every for k in range(int(180 // every))]
        refused = [t for t in tried if limiter.create(at(t)) is not None]
        assert refused == []

    @pytest.mark.parametrize("case", list(RETRY_CASES))
    def test_retry_after_is_the_first_whole_second_a_create_is_admitted(
        self, make: MakeLimiter, case: str
    ) -> None:
        limit, before, refused_at, expected = RETRY_CASES[case]

        def replayed() -> Limiter:
            limiter = make(limit)
            assert [limiter.create(at(t)) for t in before] == [None] * len(before)
            return limiter

        retry_after = replayed().create(at(refused_at))
        assert retry_after == expected
        assert replayed().create(at(refused_at + retry_after)) is None
        if retry_after > 1:
            assert replayed().create(at(refused_at + retry_after - 1)) is not None


class TestInTheDatabase(Scenarios):
    @pytest.fixture
    def make(self, database_limiter: MakeLimiter) -> MakeLimiter:
        return database_limiter


class TestInRedis(Scenarios):
    @pytest.fixture
    def make(self, redis_limiter: MakeLimiter) -> MakeLimiter:
        return redis_limiter


@pytest.mark.parametrize("limits_taken", [False, True], ids=["checked", "taken-in-redis"])
def test_the_database_counts_move_with_the_minute(db_url: str, runner: asyncio.Runner, limits_taken: bool) -> None:
    create_token(db_url, "counted", rpm_limit=100)
    token_id = token_row(db_url, "counted")["id"]
    engine = make_engine(db_url)
    transactions = Transactions(engine, make_sessionmaker(engine))

    def create(seconds: float) -> tuple[int, int, int]:
        runner.run(transactions.run(lambda connection: accounting.admit(
            connection, token_id=token_id, estimate_micros=0, now=at(seconds), limits_taken=limits_taken)))
        row = token_row(db_url, "counted")
        return row["rate_window"] - MINUTE, row["rate_previous_count"], row["rate_count"]

    try:
        assert [create(30) for _ in range(3)][-1] == (0, 0, 3)
        # One minute on, this minute's count becomes the previous one.
        assert create(70) == (1, 3, 1)
        assert create(80) == (1, 3, 2)
        # More than a minute on, neither counts any more.
        assert create(180) == (3, 0, 1)
        # A gateway whose clock is behind counts in the later minute rather than move it back.
        assert create(179) == (3, 0, 2)
    finally:
        transactions.dispose()
        runner.run(engine.dispose())


def test_undo_gives_back_the_count_in_the_minute_it_was_taken(
    shared_limits: SharedLimits, runner: asyncio.Runner, redis_url: str
) -> None:
    token = ApiToken(id="tok_undo_window", rpm_limit=2)

    def take(seconds: float, prediction_id: str) -> Any:
        return runner.run(shared_limits.take(token=token, prediction_id=prediction_id, now=at(seconds)))

    first = take(59.0, "p1")
    take(59.5, "p2")
    take(60.5, "p3")
    # The previous minute's 2 weigh nearly 2, with 1 in this one: refused.
    with pytest.raises(Throttled):
        take(61.0, "p4")
    runner.run(shared_limits.undo(first))
    runner.run(shared_limits.undo(first))
    with redis.Redis.from_url(redis_url) as store:
        assert int(store.get(shared_limits.rate_key(token.id, MINUTE)) or 0) == 1
        assert int(store.get(shared_limits.rate_key(token.id, MINUTE + 1)) or 0) == 1
    # Given back once: 1 * 59/60 + 1 < 2 admits one more, and then 2 in this minute refuse.
    take(61.0, "p4")
    with pytest.raises(Throttled):
        take(61.5, "p5")


def test_the_rate_keys_share_the_tokens_slot_and_outlive_the_next_minute(
    shared_limits: SharedLimits, runner: asyncio.Runner, redis_url: str
) -> None:
    token = ApiToken(id="tok_keys", rpm_limit=5)
    now = datetime.now(UTC)
    minute = int(now.timestamp()) // 60
    runner.run(shared_limits.take(token=token, prediction_id="p1", now=now))
    keys = [shared_limits.rate_key(token.id, minute - 1), shared_limits.rate_key(token.id, minute),
            shared_limits.in_flight_key(token.id)]
    # One script reads them all: in a Redis Cluster they must hang on one slot.
    assert len({key_slot(key.encode()) for key in keys}) == 1
    with redis.Redis.from_url(redis_url) as store:
        # Read as the previous minute's until the next minute ends, with a margin for clocks apart.
        assert store.ttl(keys[1]) > 120


def test_retry_after_matches_the_rule_for_any_counts() -> None:
    # Retry-After's formula against the rule itself, to the microsecond: refused one
    # microsecond before the wait ends, admitted when it does, across the minute's end too.
    minute_micros = accounting.MINUTE_MICROS
    rng = random.Random(20261207)

    def admits(limit: int, previous: int, current: int, elapsed: int) -> bool:
        if elapsed >= minute_micros:  # the minute moved on: its count became the previous one
            previous, current, elapsed = current, 0, elapsed - minute_micros
        return accounting.rate_admits(limit, previous=previous, current=current,
                                      weight=minute_micros - elapsed)

    checked = 0
    while checked < 2000:
        limit = rng.choice([1, 2, 3, 7, 10, 60, 1000])
        previous, current = rng.randint(0, limit), rng.randint(0, limit)
        elapsed = rng.randrange(minute_micros)
        weight = minute_micros - elapsed
        if accounting.rate_admits(limit, previous=previous, current=current, weight=weight):
            assert accounting.rate_wait_micros(limit, previous=previous, current=current, weight=weight) == 0
            continue
        wait = accounting.rate_wait_micros(limit, previous=previous, current=current, weight=weight)
        assert wait >= 1
        assert admits(limit, previous, current, elapsed + wait)
        assert not admits(limit, previous, current, elapsed + wait - 1)
        checked += 1
