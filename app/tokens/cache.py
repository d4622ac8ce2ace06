"""A short-lived, bounded cache of authenticated tokens, so a request need not read them again."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from app.expiring import ExpiringCache
from app.tokens.models import ApiToken


class TokenCache(ExpiringCache[str, ApiToken]):
    """Tokens by their keyed hash for `ttl` seconds; never holds a secret.

    What a stale entry can do is bounded: a create is admitted by a guarded update that
    re-checks revocation and expiry in the database, so only reads of a token's own
    predictions can outlive a revocation, by at most `ttl` seconds (zero turns caching off).
    Changes made through this process (admin API) forget the entries at once."""

    def __init__(self, ttl: float, max_entries: int = 10_000) -> None:
        super().__init__(ttl, max_entries)
        self._loading: dict[str, asyncio.Future[ApiToken | None]] = {}

    async def get_or_load(self, digest: str, load: Callable[[], Awaitable[ApiToken | None]]) -> ApiToken | None:
        """The token cached for `digest`, or the one `load` reads (then cached).

        When an entry expires under load, every request of that token misses it at once: each
        reading the token itself took a database connection apiece, and on PostgreSQL a busy
        pool then held them all up. Misses for one digest meanwhile share one read."""
        token = self.get(digest)
        if token is not None:
            return token
        loading = self._loading.get(digest)
        if loading is None:
            loading = self._loading[digest] = asyncio.ensure_future(self._load(digest, load))
        # Shielded: a caller that goes away must not cancel the read the others wait for.
        return await asyncio.shield(loading)

    async def _load(self, digest: str, load: Callable[[], Awaitable[ApiToken | None]]) -> ApiToken | None:
        this = asyncio.current_task()
        try:
            token = await load()
        finally:
            # Forgotten meanwhile (the token changed): what was read may predate the change.
            current = self._loading.get(digest) is this
            if current:
                del self._loading[digest]
        if token is not None and current:
            self.put(digest, token)
        return token

    def forget(self, key: str) -> None:
        """Drop a token that just changed, and let the next request read it anew."""
        super().forget(key)
        self._loading.pop(key, None)

    def clear(self) -> None:
        """Drop every token, and let the next requests read them anew."""
        super().clear()
        self._loading.clear()
