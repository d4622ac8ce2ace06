"""Pure parsing of the create headers clients send: `Prefer: wait` and `Cancel-After`."""

from __future__ import annotations

import re

MAX_WAIT_SECONDS = 60
_WAIT = re.compile(r"^\s*wait(?:\s*=\s*(\d+(?:\.\d+)?))?\s*$", re.IGNORECASE)
_CANCEL_AFTER = re.compile(r"^(?:\d+|(?=\d)(?:\d+h)?(?:\d+m)?(?:\d+s)?)$")
_CANCEL_AFTER_PARTS = re.compile(r"(\d+)([hms]?)")
_UNIT_SECONDS = {"h": 3600, "m": 60, "s": 1, "": 1}
# Replicate's shortest `Cancel-After`; a shorter one is taken as this.
MIN_CANCEL_AFTER_SECONDS = 5


def wait_seconds(prefer: str | None) -> int | None:
    """Seconds to wait from `Prefer: wait` / `wait=N`, clamped to 1..60; None when absent."""
    if not prefer:
        return None
    for preference in prefer.split(","):
        match = _WAIT.match(preference)
        if match:
            if match.group(1) is None:
                return MAX_WAIT_SECONDS
            # npm sends ceil(N) unclamped; Replicate accepts 1..60.
            # Rounded down: answering a little early is safe, a little late times the client out.
            return min(MAX_WAIT_SECONDS, max(1, int(float(match.group(1)))))
    return None


def valid_cancel_after(value: str) -> bool:
    """Whether a `Cancel-After` duration has Replicate's shape (`30s`, `5m`, `1h30m45s`, `300`)."""
    return bool(_CANCEL_AFTER.match(value.strip())) and value.strip() != ""


def cancel_after_seconds(value: str) -> int:
    """A valid `Cancel-After` duration in seconds, at least MIN_CANCEL_AFTER_SECONDS."""
    seconds = sum(int(number) * _UNIT_SECONDS[unit] for number, unit in _CANCEL_AFTER_PARTS.findall(value.strip()))
    return max(seconds, MIN_CANCEL_AFTER_SECONDS)
