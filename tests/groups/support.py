"""Helpers for the group tests: the admin API client and creating groups and tokens through it."""

from __future__ import annotations

from typing import Any

import httpx

from tests.conftest import Gateway

ADMIN = "admin-groups-canary-41d7"


def admin_client(gateway: Gateway) -> httpx.Client:
    """A client for the admin API of a gateway started with `admin_token=ADMIN`."""
    return httpx.Client(base_url=gateway.url + "/admin/v1", headers={"Authorization": f"Bearer {ADMIN}"},
                        timeout=30)


def add_group(admin: httpx.Client, name: str, **fields: Any) -> dict[str, Any]:
    """Create a group through the admin API and return its view."""
    response = admin.post("/groups", json={"name": name, **fields})
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def add_token(admin: httpx.Client, name: str, **fields: Any) -> str:
    """Create a token through the admin API and return its secret."""
    response = admin.post("/tokens", json={"name": name, **fields})
    assert response.status_code == 201, response.text
    secret: str = response.json()["token"]
    return secret
