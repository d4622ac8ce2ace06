"""The token cache: concurrent misses for one token share one read, and a change wins over a read in flight."""

from __future__ import annotations

import asyncio

import pytest

from app.tokens.cache import TokenCache
from app.tokens.models import ApiToken


def _token(name: str = "team") -> ApiToken:
    return ApiToken(id=f"id-{name}", name=name, token_hash=f"hash-{name}")


class SlowRead:
    """A token read that takes a while and counts how often it ran."""

    def __init__(self, token: ApiToken | None, delay: float = 0.05, error: Exception | None = None) -> None:
        self.token, self.delay, self.error, self.calls = token, delay, error, 0

    async def __call__(self) -> ApiToken | None:
        self.calls += 1
        await asyncio.sleep(self.delay)
        if self.error is not None:
            raise self.error
        return self.token


def test_concurrent_misses_share_one_read_and_then_the_cache_answers() -> None:
    cache, read = TokenCache(ttl=60), SlowRead(_token())

    async def scenario() -> list[ApiToken | None]:
        found = await asyncio.gather(*(cache.get_or_load("hash-team", read) for _ in range(40)))
        found.append(await cache.get_or_load("hash-team", read))
        return found

    found = asyncio.run(scenario())
    assert read.calls == 1
    assert {token.id if token else None for token in found} == {"id-team"}


def test_a_failed_read_fails_every_waiter_and_the_next_miss_reads_again() -> None:
    cache, failing = TokenCache(ttl=60), SlowRead(None, error=ConnectionError("database down"))

    async def scenario() -> list[BaseException | ApiToken | None]:
        return await asyncio.gather(*(cache.get_or_load("hash-team", failing) for _ in range(5)),
                                    return_exceptions=True)

    outcomes = asyncio.run(scenario())
    assert failing.calls == 1
    assert all(isinstance(outcome, ConnectionError) for outcome in outcomes)
    working = SlowRead(_token(), delay=0)
    assert asyncio.run(cache.get_or_load("hash-team", working)) is working.token
    assert working.calls == 1


def test_an_unknown_token_is_not_cached() -> None:
    cache, read = TokenCache(ttl=60), SlowRead(None, delay=0)
    assert asyncio.run(cache.get_or_load("hash-nobody", read)) is None
    assert asyncio.run(cache.get_or_load("hash-nobody", read)) is None
    assert read.calls == 2


def test_a_token_forgotten_during_its_read_is_not_cached_and_is_read_anew() -> None:
    cache, before = TokenCache(ttl=60), SlowRead(_token("before"))
    after = SlowRead(_token("after"), delay=0)

    async def scenario() -> tuple[ApiToken | None, ApiToken | None, ApiToken | None]:
        reading = asyncio.ensure_future(cache.get_or_load("hash-team", before))
        await asyncio.sleep(0.01)
        cache.forget("hash-team")  # revoked meanwhile, say
        anew = await cache.get_or_load("hash-team", after)
        return await reading, anew, cache.get("hash-team")

    old, anew, cached = asyncio.run(scenario())
    assert old is before.token  # the request that began before the change still gets its read
    assert anew is after.token
    assert cached is after.token  # never the stale one
    assert (before.calls, after.calls) == (1, 1)


def test_a_waiter_that_goes_away_does_not_cancel_the_read_of_the_others() -> None:
    cache, read = TokenCache(ttl=60), SlowRead(_token())

    async def scenario() -> ApiToken | None:
        leaving = asyncio.ensure_future(cache.get_or_load("hash-team", read))
        staying = asyncio.ensure_future(cache.get_or_load("hash-team", read))
        await asyncio.sleep(0.01)
        leaving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await leaving
        return await staying

    assert asyncio.run(scenario()) is read.token
    assert read.calls == 1
