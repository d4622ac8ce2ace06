"""Logging: one JSON line per record, with secrets scrubbed from every field."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from typing import Any

import orjson

_PATTERNS = [
    re.compile(r"(?i)\b(bearer|token)\s+[A-Za-z0-9._~+/=\-]{8,}"),
    re.compile(r"\b(?:sk|r8|gw|whsec)[-_][A-Za-z0-9_\-]{6,}"),
    re.compile(r"(?i)([?&](?:key|token|api_key|access_token|signature)=)[^&\s]+"),
    # Capability URLs (streams, archived outputs, inbound webhooks) carry their key in the path.
    re.compile(r"(/(?:streams|outputs|webhooks/inbound)/[A-Za-z0-9]+\.)[0-9a-f]{16,}"),
]
_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class SecretScrubber(logging.Filter):
    """Masks credential-looking values and the configured secrets in messages and fields."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self._secrets = sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True)

    def scrub(self, text: str) -> str:
        """The text with every known secret and credential pattern masked."""
        for secret in self._secrets:
            text = text.replace(secret, "[redacted]")
        text = _PATTERNS[0].sub(lambda m: f"{m.group(1)} [redacted]", text)
        text = _PATTERNS[1].sub("[redacted]", text)
        text = _PATTERNS[2].sub(lambda m: f"{m.group(1)}[redacted]", text)
        return _PATTERNS[3].sub(lambda m: f"{m.group(1)}[redacted]", text)

    def _scrub_value(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.scrub(value)
        if isinstance(value, dict):
            return {k: self._scrub_value(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self._scrub_value(v) for v in value]
        return value

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = self.scrub(record.getMessage())
        record.args = None
        for name, value in list(vars(record).items()):
            if name not in _STANDARD_ATTRS:
                setattr(record, name, self._scrub_value(value))
        if record.exc_info and record.exc_info[1] is not None:
            # Exception text can hold URLs with credentials (httpx puts the full URL in it).
            record.exc_text = self.scrub(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, event and the record's extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        for name, value in vars(record).items():
            if name not in _STANDARD_ATTRS:
                entry[name] = value
        if record.exc_text:
            entry["exception"] = record.exc_text
        return orjson.dumps(entry, default=str).decode()


def configure_logging(level: str, secrets: Iterable[str], *extra_filters: logging.Filter) -> None:
    """Send every record through the scrubber to standard error as JSON lines."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    handler.addFilter(SecretScrubber(secrets))
    for extra in extra_filters:
        handler.addFilter(extra)
    root = logging.getLogger()
    for existing in [h for h in root.handlers if isinstance(h.formatter, JsonFormatter)]:
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # httpx logs every request with its full upstream URL at INFO.
    for noisy in ("httpx", "httpcore", "hpack", "aiosqlite", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
