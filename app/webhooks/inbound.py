"""Inbound webhooks from the upstream: an unguessable URL per prediction, treated as a hint."""

from __future__ import annotations

from app.config import Settings


def inbound_url(settings: Settings, key: bytes, prediction_id: str) -> str | None:
    """The URL the upstream should call for this prediction, when the gateway has a public URL."""
    return None
