"""Inbound webhooks from the upstream: an unguessable URL per prediction, treated as a hint."""

from __future__ import annotations

import hashlib
import hmac
import re

from app.config import Settings

_PREDICTION_ID = re.compile(r"^[a-z0-9]{1,64}$")


def inbound_token(key: bytes, prediction_id: str) -> str:
    """The capability part of a prediction's inbound URL."""
    return hmac.new(key, b"inbound:" + prediction_id.encode(), hashlib.sha256).hexdigest()[:40]


def inbound_url(settings: Settings, key: bytes, prediction_id: str) -> str | None:
    """The URL the upstream should call for this prediction, when the gateway has a public URL."""
    if settings.public_url is None:
        return None
    return f"{settings.public_url}/v1/webhooks/inbound/{prediction_id}.{inbound_token(key, prediction_id)}"


def prediction_for(key: bytes, ref: str) -> str | None:
    """The prediction id an inbound `{id}.{token}` reference names, or None if the token is wrong."""
    prediction_id, _, token = ref.partition(".")
    if not _PREDICTION_ID.match(prediction_id):
        return None
    # Constant time: the token is the only credential an inbound call carries.
    if not hmac.compare_digest(token.encode(), inbound_token(key, prediction_id).encode()):
        return None
    return prediction_id
