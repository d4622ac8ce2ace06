"""A short-lived, bounded cache of authenticated tokens, so a request need not read them again."""

from __future__ import annotations

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
