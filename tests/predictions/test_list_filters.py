"""`GET /predictions?created_after=&created_before=&source=` as Replicate's OpenAPI describes them."""

from __future__ import annotations

from urllib.parse import quote

import httpx
import pytest

from tests.conftest import Gateway
from tests.dbtools import execute
from tests.fakes.relay import FakeRelay
from tests.helpers import assert_problem, create

DAYS = ("2025-01-01", "2025-01-02", "2025-01-03")


@pytest.fixture
def dated(gateway: Gateway, api: httpx.Client, relay: FakeRelay) -> dict[str, str]:
    """One running prediction created at 10:00 UTC on each of DAYS, by day."""
    relay.starting_seconds = 60  # unfinished: the daily rollup never counts them
    ids = {}
    # As each database keeps a UTC instant (SQLite: the text SQLAlchemy writes, to the microsecond).
    zone = ".000000" if gateway.db_url.startswith("sqlite") else "+00"
    for day in DAYS:
        prediction_id = create(api).json()["id"]
        execute(gateway.db_url, f"UPDATE prediction SET created_at = '{day} 10:00:00{zone}' "  # noqa: S608
                                f"WHERE id = '{prediction_id}'")
        ids[day] = prediction_id
    return ids


def _ids(api: httpx.Client, **params: str) -> list[str]:
    response = api.get("/predictions", params=params)
    assert response.status_code == 200, response.text
    return [p["id"] for p in response.json()["results"]]


def test_created_after_is_inclusive_and_created_before_exclusive(api: httpx.Client, dated: dict[str, str]) -> None:
    assert _ids(api) == [dated[day] for day in reversed(DAYS)]
    assert _ids(api, created_after="2025-01-02T10:00:00Z") == [dated["2025-01-03"], dated["2025-01-02"]]
    assert _ids(api, created_before="2025-01-02T10:00:00Z") == [dated["2025-01-01"]]
    assert _ids(api, created_after="2025-01-02", created_before="2025-01-03") == [dated["2025-01-02"]]
    # Another zone's time is the same instant: 11:00 in UTC+1 is 10:00 UTC.
    assert _ids(api, created_after="2025-01-03T11:00:00+01:00") == [dated["2025-01-03"]]


def test_page_links_keep_the_filters(gateway: Gateway, api: httpx.Client, relay: FakeRelay) -> None:
    for _ in range(105):
        assert create(api).status_code == 201
    after = "2000-01-01T00:00:00Z"
    first = api.get("/predictions", params={"created_after": after}).json()
    assert first["next"].endswith(f"&created_after={quote(after, safe='')}")
    second = api.get(first["next"]).json()
    assert len(first["results"]) + len(second["results"]) == 105
    assert second["previous"].endswith(f"&created_after={quote(after, safe='')}")
    assert api.get("/predictions", params={"created_after": "2999-01-01T00:00:00Z"}).json()["results"] == []


def test_source_web_finds_nothing_and_bad_values_are_400(api: httpx.Client, dated: dict[str, str]) -> None:
    assert _ids(api, source="web") == []
    for params in ({"source": "api"}, {"created_after": "yesterday"}, {"created_before": "2025-13-01"}):
        assert_problem(api.get("/predictions", params=params), 400)


@pytest.mark.parametrize("params", [{"created_before": "0001-01-01T00:00:00+14:00"},
                                    {"created_after": "9999-12-31T23:59:59-23:59"}])
def test_a_moment_beyond_the_calendar_once_in_utc_is_400(api: httpx.Client, params: dict[str, str]) -> None:
    # Valid ISO 8601 in its own zone, but a year before 1 or after 9999 in UTC.
    assert_problem(api.get("/predictions", params=params), 400)
