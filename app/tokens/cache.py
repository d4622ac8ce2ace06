"""A short-lived, bounded cache of authenticated tokens, so a request need not read them again."""

from __future__ import annotations

import time
from collections import OrderedDict

from app.tokens.models import ApiToken


class TokenCache:
    """Tokens by their keyed hash for `ttl` seconds; never holds a secret.

    What a stale entry can do is bounded: a create is admitted by a guarded update that
    re-checks revocation and expiry in the database, so only reads of a token's own
    predictions can outlive a revocation, by at most `ttl` seconds (zero turns caching off).
    Changes made through this process (admin API) forget the entries at once."""

    def __init__(self, ttl: float, max_entries: int = 10_000) -> None:
        self._ttl = ttl
        self._max_entries = max_entries
        self._entries: OrderedDict[str, tuple[float, ApiToken]] = OrderedDict()

    def get(self, token_hash: str) -> ApiToken | None:
        """The cached token for a hash, unless it is older than the time-to-live."""
        entry = self._entries.get(token_hash)
        if entry is None:
            return None
        stored_at, token = entry
        if time.monotonic() - stored_at > self._ttl:
            del self._entries[token_hash]
            return None
        return token

    def put(self, token: ApiToken) -> None:
        """Remember a token just read from the database."""
        if self._ttl <= 0:
            return
        self._entries[token.token_hash] = (time.monotonic(), token)
        self._entries.move_to_end(token.token_hash)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)

    def forget(self, token_hash: str) -> None:
        """Drop a token whose row just changed."""
        self._entries.pop(token_hash, None)

    def clear(self) -> None:
        """Drop every token, when something many of them carry (a group) changed."""
        self._entries.clear()
