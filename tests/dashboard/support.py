"""Helpers for the dashboard tests: a cookie-keeping client, sign-in, form tokens."""

from __future__ import annotations

import html
import re
from collections.abc import Iterator
from contextlib import contextmanager

import httpx

from tests.conftest import Gateway

ADMIN_SECRET = "admin-canary-7c2d19e4b8"
_CSRF = re.compile(r'name="csrf" value="([^"]+)"')


def browser(gateway: Gateway) -> httpx.Client:
    """A client that keeps cookies and does not follow redirects, like a careful browser."""
    return httpx.Client(base_url=gateway.url, timeout=30, follow_redirects=False)


def csrf_of(page: httpx.Response) -> str:
    """The CSRF token a page's forms carry."""
    match = _CSRF.search(page.text)
    assert match, page.text[:500]
    return html.unescape(match.group(1))


def sign_in(client: httpx.Client, secret: str) -> httpx.Response:
    """Fill in and send the sign-in form; returns the answer to the POST."""
    form = client.get("/dashboard/login")
    assert form.status_code == 200, form.text
    return client.post("/dashboard/login", data={"token": secret, "csrf": csrf_of(form)})


@contextmanager
def signed_in(gateway: Gateway, secret: str) -> Iterator[httpx.Client]:
    """A client with a live dashboard session for `secret`."""
    with browser(gateway) as client:
        answer = sign_in(client, secret)
        assert answer.status_code == 303, answer.text
        yield client


def text_of(page: httpx.Response) -> str:
    """A page's visible text, roughly: tags removed, entities decoded, spaces collapsed."""
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", page.text)).split())
