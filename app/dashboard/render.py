"""Dashboard rendering: the template environment, the server-drawn SVG chart, output previews."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

import orjson
from jinja2 import Environment, PackageLoader, select_autoescape

from app.accounting.pricing import usd_text
from app.dashboard.queries import Totals

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".gif", ".webp", ".avif", ".bmp")
_DATA_IMAGE = re.compile(r"^data:image/(png|jpeg|gif|webp|avif|bmp)(;base64)?,", re.IGNORECASE)
MAX_PREVIEWS = 50
MAX_TEXT = 20_000
CHART_HEIGHT = 160
CHART_BAR = 18

SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; img-src 'self' https: http: data:; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
}


def usd(micros: int | None) -> str:
    """Micro-dollars as the usage report prints them, with a dollar sign."""
    return "$" + usd_text(micros or 0)


def moment(value: datetime | None) -> str:
    """A timestamp in UTC, to the second."""
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if value else "—"


def seconds_between(start: datetime | None, end: datetime | None) -> str:
    """An elapsed time such as "2.5 s", or a dash."""
    if start is None or end is None:
        return "—"
    return f"{(end - start).total_seconds():.1f} s"


def pretty_json(value: Any) -> str:
    """JSON indented for reading (escaped by the template, never marked safe)."""
    text = orjson.dumps(value, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS).decode()
    return text if len(text) <= MAX_TEXT else text[:MAX_TEXT] + "\n… (cut)"


def clip(text: str | None) -> str:
    """Text cut to a readable length."""
    value = text or ""
    return value if len(value) <= MAX_TEXT else value[:MAX_TEXT] + "\n… (cut)"


@lru_cache
def environment() -> Environment:
    """Templates from the package, every value escaped unless a template says otherwise."""
    env = Environment(loader=PackageLoader("app.dashboard", "templates"),
                      autoescape=select_autoescape(default=True), trim_blocks=True, lstrip_blocks=True)
    env.filters.update(usd=usd, moment=moment, pretty_json=pretty_json, clip=clip)
    env.globals.update(seconds_between=seconds_between)
    return env


def render(name: str, context: dict[str, Any]) -> str:
    """A page from its template."""
    return environment().get_template(name).render(context)


@lru_cache
def stylesheet() -> bytes:
    """The dashboard's one CSS file, read once from the package."""
    return resources.files("app.dashboard").joinpath("static/dashboard.css").read_bytes()


@dataclass(frozen=True)
class Bar:
    """One day's bar, in SVG user units."""

    x: int
    y: float
    height: float
    low_y: float  # the stacked lower part (failures), from here to the axis
    low_height: float
    label: str


@dataclass(frozen=True)
class Chart:
    """A bar chart of one measure per day."""

    title: str
    description: str
    width: int
    height: int
    bars: list[Bar]
    maximum: str
    first: str
    last: str


def chart(days: list[Totals], *, money: bool) -> Chart:
    """Bars per day: cost, or predictions with the failed ones stacked at the bottom."""
    values = [d.cost_micros if money else d.predictions for d in days]
    peak = max(values, default=0) or 1
    bars = []
    for i, (day, value) in enumerate(zip(days, values, strict=True)):
        height = CHART_HEIGHT * value / peak
        low = 0.0 if money else CHART_HEIGHT * day.failed / peak
        label = (f"{day.key}: {usd(day.cost_micros)}" if money
                 else f"{day.key}: {day.predictions} predictions, {day.failed} failed")
        bars.append(Bar(x=i * CHART_BAR, y=round(CHART_HEIGHT - height, 2), height=round(height, 2),
                        low_y=round(CHART_HEIGHT - low, 2), low_height=round(low, 2), label=label))
    total = sum(values)
    if money:
        title, description = "Spend per day", f"Cost per day in USD; {usd(total)} in all, peak {usd(max(values, default=0))}."
    else:
        failed = sum(d.failed for d in days)
        title = "Predictions per day"
        description = f"{total} predictions, {failed} failed (darker part of each bar); peak {max(values, default=0)} a day."
    return Chart(title=title, description=description, width=max(len(days), 1) * CHART_BAR, height=CHART_HEIGHT,
                 bars=bars, maximum=usd(peak) if money else str(max(values, default=0)),
                 first=days[0].key if days else "", last=days[-1].key if days else "")


@dataclass(frozen=True)
class Preview:
    """How one output item is shown: an image, a link, or text."""

    kind: str  # "image", "link" or "text"
    value: str
    label: str


def _safe_url(value: str) -> bool:
    parts = urlsplit(value)
    return parts.scheme in ("http", "https") and bool(parts.netloc)


def _one(value: Any, label: str) -> Preview:
    if isinstance(value, str):
        if _DATA_IMAGE.match(value):
            return Preview("image", value, label)
        if _safe_url(value):
            path = urlsplit(value).path.lower()
            return Preview("image" if path.endswith(IMAGE_EXTENSIONS) else "link", value, label)
        return Preview("text", clip(value), label)
    return Preview("text", pretty_json(value), label)


def previews(output: Any) -> list[Preview]:
    """Output items to show: images inline, other http(s) URLs as links, anything else as text.
    Only http(s) and raster `data:image` values become links or images."""
    if output is None:
        return []
    if isinstance(output, list):
        if output and all(isinstance(v, str) and not _safe_url(v) and not _DATA_IMAGE.match(v) for v in output):
            # A language model's output: text fragments to read as one.
            return [Preview("text", clip("".join(output)), "Output")]
        items = [_one(v, f"Output {i + 1}") for i, v in enumerate(output[:MAX_PREVIEWS])]
        if len(output) > MAX_PREVIEWS:
            items.append(Preview("text", f"… and {len(output) - MAX_PREVIEWS} more", "More"))
        return items
    if isinstance(output, dict):
        return [_one(v, str(k)[:100]) for k, v in list(output.items())[:MAX_PREVIEWS]]
    return [_one(output, "Output")]
