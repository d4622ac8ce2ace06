"""Pure functions: signed list cursors bound to the token that asked for the list."""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass
from datetime import datetime

import orjson

from app.errors import BadRequest


@dataclass(frozen=True)
class Cursor:
    """A position in a newest-first list, and which way to read from it."""

    created_at: datetime
    id: str
    backwards: bool


def _signature(payload: bytes, token_id: str, key: bytes) -> str:
    digest = hmac.new(key, b"cursor:" + token_id.encode() + b":" + payload, hashlib.sha256)
    return base64.urlsafe_b64encode(digest.digest()[:16]).decode().rstrip("=")


def encode(cursor: Cursor, token_id: str, key: bytes) -> str:
    """An opaque cursor that only `token_id` can use."""
    payload = orjson.dumps([cursor.created_at.isoformat(), cursor.id, int(cursor.backwards)])
    body = base64.urlsafe_b64encode(payload).decode().rstrip("=")
    return f"{body}.{_signature(payload, token_id, key)}"


def decode(text: str, token_id: str, key: bytes) -> Cursor:
    """The cursor, or BadRequest when it is malformed, tampered with, or another token's."""
    try:
        body, signature = text.split(".", 1)
        payload = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        if not hmac.compare_digest(signature, _signature(payload, token_id, key)):
            raise ValueError("bad signature")
        created_at, prediction_id, backwards = orjson.loads(payload)
        return Cursor(datetime.fromisoformat(created_at), str(prediction_id), bool(backwards))
    except (ValueError, TypeError, orjson.JSONDecodeError):
        raise BadRequest("The cursor is invalid") from None
