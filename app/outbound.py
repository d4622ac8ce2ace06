"""The one way the gateway makes an outgoing HTTP client: no redirects, proxies or cookies."""

from __future__ import annotations

from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import Any

import httpx


def outbound_client(**options: Any) -> httpx.AsyncClient:
    """An `httpx.AsyncClient` that never follows a redirect, never reads proxy or netrc settings
    from the environment, and keeps no cookie: a shared client must never replay one caller's
    cookies for another (GHSA-7vwr-g6pm-9hc8). Other options are passed through."""
    return httpx.AsyncClient(
        follow_redirects=False,
        trust_env=False,
        cookies=CookieJar(policy=DefaultCookiePolicy(allowed_domains=[])),
        **options,
    )
