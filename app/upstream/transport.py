"""The pooled aiohttp session the gateway calls upstreams with: no cookie, proxy or redirect.

httpx's own pool costs more per request the more requests are in flight (encode/httpx#3215);
with an upstream answering in 50 ms at 64 concurrent requests it falls to about a tenth of
aiohttp's throughput, and httpx's per-call work on top of aiohttp still cost a fifth of a
poll's CPU (bench/RESULTS.md), so `UpstreamClient` calls aiohttp directly.
"""

from __future__ import annotations

import aiohttp


def cookieless_session(*, max_connections: int = 200, keepalive_seconds: float = 15.0) -> aiohttp.ClientSession:
    """A session that keeps no cookie (a shared client must never replay one caller's upstream
    cookie for another: GHSA-7vwr-g6pm-9hc8) and reads no proxy settings; callers pass
    `allow_redirects=False` on every request. Make it inside the running loop."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=max_connections, keepalive_timeout=keepalive_seconds),
        cookie_jar=aiohttp.DummyCookieJar(),
        trust_env=False,
    )
