"""Pure Standard Webhooks signing: the team's `whsec_` secret, signatures and verification."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from collections.abc import Mapping

SECRET_PREFIX = "whsec_"  # noqa: S105  (a prefix, not a secret)
TOLERANCE_SECONDS = 300


def team_secret(key: bytes, token_id: str) -> str:
    """The `whsec_` secret of a token's team, derived from the instance key (never stored)."""
    raw = hmac.new(key, b"webhook-secret:" + token_id.encode(), hashlib.sha256).digest()
    # Standard base64 has no "_", which the Python client's validator requires (wire spec §14.3).
    return SECRET_PREFIX + base64.b64encode(raw).decode("ascii")


def secret_bytes(secret: str) -> bytes:
    """The HMAC key inside a `whsec_<base64>` secret (a bare base64 secret is accepted too)."""
    encoded = secret.removeprefix(SECRET_PREFIX)
    return base64.b64decode(encoded + "=" * (-len(encoded) % 4))


def sign(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` value for one message: `v1,<base64 HMAC-SHA256>`."""
    signed = f"{message_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret_bytes(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


def verify(
    secret: str,
    headers: Mapping[str, str],
    body: bytes,
    tolerance_seconds: int = TOLERANCE_SECONDS,
    now: float | None = None,
) -> bool:
    """Whether Standard Webhooks headers sign these exact body bytes, within the time tolerance."""
    lowered = {k.lower(): v for k, v in headers.items()}
    message_id = lowered.get("webhook-id", "")
    timestamp = lowered.get("webhook-timestamp", "")
    signatures = lowered.get("webhook-signature", "")
    if not (message_id and timestamp and signatures):
        return False
    if not (timestamp.isascii() and timestamp.isdigit()) or len(timestamp) > 12:
        return False
    current = time.time() if now is None else now
    if abs(current - int(timestamp)) > tolerance_seconds:
        return False
    try:
        expected = base64.b64decode(sign(secret, message_id, int(timestamp), body)[3:])
    except (binascii.Error, ValueError):
        return False
    valid = False
    # Several signatures are allowed (secret rotation); compare each in constant time.
    for entry in signatures.split():
        version, _, encoded = entry.partition(",")
        if version != "v1" or not encoded:
            continue
        try:
            candidate = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            continue
        if hmac.compare_digest(candidate, expected):
            valid = True
    return valid
