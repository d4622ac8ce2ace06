"""Parsing of `Prefer: wait` and `Cancel-After`."""

from __future__ import annotations

import pytest

from app.predictions.headers import (
    MAX_WAIT_SECONDS,
    MIN_CANCEL_AFTER_SECONDS,
    cancel_after_seconds,
    valid_cancel_after,
    wait_seconds,
)


class TestWaitSeconds:
    @pytest.mark.parametrize(
        ("prefer", "expected"),
        [
            pytest.param("wait", 60, id="bare-wait-is-the-maximum"),
            pytest.param("wait=5", 5, id="explicit"),
            pytest.param("wait=1", 1, id="minimum"),
            pytest.param("wait=60", 60, id="maximum"),
            pytest.param("wait=0", 1, id="zero-clamped-up"),
            pytest.param("wait=61", 60, id="just-over-clamped-down"),
            pytest.param("wait=600", 60, id="large-clamped-down"),
            pytest.param("wait=7.2", 7, id="fraction-rounded-down"),
            pytest.param("wait=7.8", 7, id="fraction-always-rounded-down"),
            pytest.param("wait=6.5", 6, id="half-rounded-down"),
            pytest.param("wait=0.2", 1, id="small-fraction-clamped-up"),
            pytest.param("WAIT=5", 5, id="upper-case"),
            pytest.param("Wait", 60, id="mixed-case-bare"),
            pytest.param(" wait = 5 ", 5, id="spaces-around"),
            pytest.param("respond-async, wait=3", 3, id="after-another-preference"),
            pytest.param("wait=3, respond-async", 3, id="before-another-preference"),
            pytest.param("foo,wait", 60, id="bare-after-another"),
            pytest.param("wait=4, wait=9", 4, id="first-wait-wins"),
        ],
    )
    def test_seconds(self, prefer: str, expected: int) -> None:
        assert wait_seconds(prefer) == expected

    @pytest.mark.parametrize(
        "prefer",
        [
            pytest.param(None, id="none"),
            pytest.param("", id="empty"),
            pytest.param("respond-async", id="respond-async"),
            pytest.param("wait=abc", id="not-a-number"),
            pytest.param("wait=", id="no-value"),
            pytest.param("wait=-1", id="negative"),
            pytest.param("waiting", id="longer-word"),
            pytest.param("nowait", id="prefixed-word"),
            pytest.param("wait=5s", id="unit-suffix"),
            pytest.param(",", id="only-separator"),
            pytest.param("return=minimal", id="other-preference"),
        ],
    )
    def test_none_when_not_asking_to_wait(self, prefer: str | None) -> None:
        assert wait_seconds(prefer) is None

    @pytest.mark.parametrize("n", range(0, 130, 7))
    def test_always_within_bounds(self, n: int) -> None:
        result = wait_seconds(f"wait={n}")
        assert result is not None
        assert 1 <= result <= MAX_WAIT_SECONDS


class TestValidCancelAfter:
    @pytest.mark.parametrize(
        "value",
        [
            pytest.param("30s", id="seconds"),
            pytest.param("90s", id="seconds-over-a-minute"),
            pytest.param("5m", id="minutes"),
            pytest.param("1h", id="hours"),
            pytest.param("2h30m", id="hours-minutes"),
            pytest.param("1h30m45s", id="hours-minutes-seconds"),
            pytest.param("5m30s", id="minutes-seconds"),
            pytest.param("1h45s", id="hours-seconds"),
            pytest.param("300", id="bare-number-is-seconds"),
            pytest.param(" 30s ", id="surrounding-space"),
        ],
    )
    def test_valid(self, value: str) -> None:
        assert valid_cancel_after(value) is True

    @pytest.mark.parametrize(
        "value",
        [
            pytest.param("", id="empty"),
            pytest.param("   ", id="blank"),
            pytest.param("5x", id="unknown-unit"),
            pytest.param("-5", id="negative"),
            pytest.param("-5s", id="negative-with-unit"),
            # Replicate allows a bare number (seconds) *or* unit-suffixed parts; a trailing
            # unitless part after a unit is neither (Go's time.ParseDuration also rejects it).
            pytest.param("1h30", id="unitless-part-after-unit"),
            pytest.param("m", id="unit-without-number"),
            pytest.param("h", id="hours-unit-without-number"),
            pytest.param("1m1h", id="units-out-of-order"),
            pytest.param("30s5m", id="seconds-before-minutes"),
            pytest.param("5m5m", id="repeated-unit"),
            pytest.param("1.5h", id="fraction"),
            pytest.param("30 s", id="space-inside"),
            pytest.param("30ms", id="milliseconds"),
            pytest.param("5m;", id="trailing-punctuation"),
            pytest.param("s30", id="unit-first"),
        ],
    )
    def test_invalid(self, value: str) -> None:
        assert valid_cancel_after(value) is False


@pytest.mark.parametrize(("value", "seconds"), [
    ("30s", 30), ("5m", 300), ("1h", 3600), ("1h30m45s", 5445), ("1h45s", 3645), ("300", 300), (" 90s ", 90),
    ("2s", MIN_CANCEL_AFTER_SECONDS), ("0", MIN_CANCEL_AFTER_SECONDS),
])
def test_cancel_after_in_seconds_and_never_under_replicates_minimum(value: str, seconds: int) -> None:
    assert valid_cancel_after(value)
    assert cancel_after_seconds(value) == seconds
