"""The lenient, validating parse of relay prediction JSON."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from app.upstream.schemas import (
    InvalidUpstreamPrediction,
    parse_prediction,
    parse_timestamp,
    to_wire,
)


def relay_object(**overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "id": "ufawqhfynnddngldkgtslldrkq",
        "model": "black-forest-labs/flux-schnell",
        "version": "5599ed30703defd1d160a25a63321b4dec97101d98b4674bcc56e41f62f35637",
        "input": {"prompt": "a cat"},
        "logs": "",
        "output": ["https://replicate.delivery/out-0.webp"],
        "data_removed": False,
        "error": None,
        "status": "succeeded",
        "source": "api",
        "created_at": "2025-01-15T09:54:55.566Z",
        "started_at": "2025-01-15T09:54:56.000123Z",
        "completed_at": "2025-01-15T10:03:40.584470194Z",
        "urls": {
            "get": "https://relay.example/v1/predictions/ufawqhfynnddngldkgtslldrkq",
            "cancel": "https://relay.example/v1/predictions/ufawqhfynnddngldkgtslldrkq/cancel",
        },
        "metrics": {"predict_time": 2.5},
        "message": "relay says hi",
    }
    data.update(overrides)
    return data


class TestParseTimestamp:
    @pytest.mark.parametrize(
        ("value", "expected"),
        [
            pytest.param("2025-01-15T09:54:55.566Z", datetime(2025, 1, 15, 9, 54, 55, 566000, tzinfo=UTC),
                         id="milliseconds"),
            pytest.param("2025-01-15T10:03:40.584470194Z",
                         datetime(2025, 1, 15, 10, 3, 40, 584470, tzinfo=UTC), id="nanoseconds-truncated"),
            pytest.param("2025-01-15T10:03:40.999999999Z",
                         datetime(2025, 1, 15, 10, 3, 40, 999999, tzinfo=UTC), id="nanoseconds-not-rounded-up"),
            pytest.param("2025-01-15T10:03:40.5Z", datetime(2025, 1, 15, 10, 3, 40, 500000, tzinfo=UTC),
                         id="one-digit"),
            pytest.param("2025-01-15T10:03:40.123456Z", datetime(2025, 1, 15, 10, 3, 40, 123456, tzinfo=UTC),
                         id="microseconds"),
            pytest.param("2025-01-15T10:03:40Z", datetime(2025, 1, 15, 10, 3, 40, tzinfo=UTC), id="no-fraction"),
            pytest.param("2025-01-15T10:03:40.5z", datetime(2025, 1, 15, 10, 3, 40, 500000, tzinfo=UTC),
                         id="lower-z"),
            pytest.param("2025-01-15T09:54:55.566+00:00", datetime(2025, 1, 15, 9, 54, 55, 566000, tzinfo=UTC),
                         id="utc-offset"),
            pytest.param("2025-01-15T11:54:55.566+02:00", datetime(2025, 1, 15, 9, 54, 55, 566000, tzinfo=UTC),
                         id="positive-offset-converted"),
            pytest.param("2025-01-15T04:24:55.584470194-05:30",
                         datetime(2025, 1, 15, 9, 54, 55, 584470, tzinfo=UTC), id="nanoseconds-negative-offset"),
            pytest.param("2025-01-15T09:54:55.566", datetime(2025, 1, 15, 9, 54, 55, 566000, tzinfo=UTC),
                         id="naive-taken-as-utc"),
            pytest.param("2025-01-15 09:54:55", datetime(2025, 1, 15, 9, 54, 55, tzinfo=UTC), id="space-separator"),
            pytest.param("  2025-01-15T09:54:55Z  ", datetime(2025, 1, 15, 9, 54, 55, tzinfo=UTC), id="whitespace"),
        ],
    )
    def test_parses_to_aware_utc(self, value: str, expected: datetime) -> None:
        parsed = parse_timestamp(value)
        assert parsed == expected
        assert parsed is not None
        assert parsed.utcoffset() is not None
        assert parsed.utcoffset().total_seconds() == 0  # type: ignore[union-attr]

    @pytest.mark.parametrize(
        "value",
        [
            pytest.param("", id="empty"),
            pytest.param("garbage", id="garbage"),
            pytest.param("2025-13-45T99:99:99Z", id="out-of-range"),
            pytest.param("yesterday at noon", id="words"),
            pytest.param(None, id="none"),
            pytest.param(1736934895, id="int-epoch"),
            pytest.param(1736934895.5, id="float-epoch"),
            pytest.param(True, id="bool"),
            pytest.param(["2025-01-15T09:54:55Z"], id="list"),
            pytest.param({"t": "2025-01-15T09:54:55Z"}, id="dict"),
        ],
    )
    def test_none_for_unusable(self, value: Any) -> None:
        assert parse_timestamp(value) is None


class TestParsePrediction:
    def test_valid_relay_object(self) -> None:
        parsed = parse_prediction(relay_object())
        assert parsed.id == "ufawqhfynnddngldkgtslldrkq"
        assert parsed.status == "succeeded"
        assert parsed.model == "black-forest-labs/flux-schnell"
        assert parsed.version == "5599ed30703defd1d160a25a63321b4dec97101d98b4674bcc56e41f62f35637"
        assert parsed.output == ["https://replicate.delivery/out-0.webp"]
        assert parsed.error is None
        assert parsed.logs == ""
        assert parsed.metrics == {"predict_time": 2.5}
        assert parsed.started_at == datetime(2025, 1, 15, 9, 54, 56, 123, tzinfo=UTC)
        assert parsed.completed_at == datetime(2025, 1, 15, 10, 3, 40, 584470, tzinfo=UTC)
        assert parsed.streamable is False

    def test_extra_keeps_unknown_fields_only(self) -> None:
        parsed = parse_prediction(relay_object(webhook="https://hook.example", relay_cost=0.1))
        assert parsed.extra == {"message": "relay says hi", "relay_cost": 0.1}
        for known in ("urls", "id", "status", "webhook", "input", "created_at", "metrics"):
            assert known not in parsed.extra

    @pytest.mark.parametrize(
        ("field", "value", "expected"),
        [
            pytest.param("error", {"code": "E1", "detail": "oops"}, orjson.dumps({"code": "E1", "detail": "oops"}).decode(),
                         id="error-object-as-json"),
            pytest.param("error", ["a", 1], '["a",1]', id="error-list-as-json"),
            pytest.param("error", 42, "42", id="error-number-as-json"),
            pytest.param("error", "plain", "plain", id="error-text-kept"),
            pytest.param("error", None, None, id="error-null"),
            pytest.param("logs", {"lines": ["a"]}, '{"lines":["a"]}', id="logs-object-as-json"),
            pytest.param("logs", None, None, id="logs-null"),
        ],
    )
    def test_text_fields(self, field: str, value: Any, expected: str | None) -> None:
        parsed = parse_prediction(relay_object(**{field: value}))
        assert getattr(parsed, field) == expected

    def test_error_object_round_trips_as_json(self) -> None:
        error = {"message": "bad", "nested": {"x": [1, 2]}}
        parsed = parse_prediction(relay_object(error=error))
        assert isinstance(parsed.error, str)
        assert orjson.loads(parsed.error) == error

    @pytest.mark.parametrize(
        ("overrides", "field", "expected"),
        [
            pytest.param({"model": ""}, "model", None, id="empty-model-none"),
            pytest.param({"model": 5}, "model", None, id="non-text-model-none"),
            pytest.param({"version": ""}, "version", None, id="empty-version-none"),
            pytest.param({"version": None}, "version", None, id="null-version"),
            pytest.param({"metrics": [1]}, "metrics", None, id="non-dict-metrics-none"),
            pytest.param({"metrics": None}, "metrics", None, id="null-metrics"),
            pytest.param({"started_at": "nonsense"}, "started_at", None, id="bad-time-none"),
            pytest.param({"completed_at": None}, "completed_at", None, id="null-time"),
        ],
    )
    def test_lenient_on_optional_fields(self, overrides: dict[str, Any], field: str, expected: Any) -> None:
        assert getattr(parse_prediction(relay_object(**overrides)), field) == expected

    @pytest.mark.parametrize(
        ("urls", "expected"),
        [
            pytest.param({"get": "g", "stream": "https://relay.example/stream/x"}, True, id="stream-url"),
            pytest.param({"get": "g"}, False, id="no-stream"),
            pytest.param({"stream": None}, False, id="stream-null"),
            pytest.param({"stream": 1}, False, id="stream-not-text"),
            pytest.param(None, False, id="urls-null"),
            pytest.param(["stream"], False, id="urls-list"),
            pytest.param("https://relay.example/stream", False, id="urls-text"),
        ],
    )
    def test_streamable_from_urls_stream(self, urls: Any, expected: bool) -> None:
        assert parse_prediction(relay_object(urls=urls)).streamable is expected

    def test_missing_urls_not_streamable(self) -> None:
        data = relay_object()
        del data["urls"]
        assert parse_prediction(data).streamable is False

    @pytest.mark.parametrize("status", ["starting", "processing", "succeeded", "failed", "canceled", "aborted"])
    def test_known_statuses(self, status: str) -> None:
        assert parse_prediction(relay_object(status=status)).status == status

    @pytest.mark.parametrize(
        "id_",
        ["a", "abc-DEF_123.4:5", "x" * 128],
    )
    def test_id_shapes_accepted(self, id_: str) -> None:
        assert parse_prediction(relay_object(id=id_)).id == id_


def _without(field: str) -> dict[str, Any]:
    data = relay_object()
    del data[field]
    return data


class TestInvalidPrediction:
    @pytest.mark.parametrize(
        "data",
        [
            pytest.param(None, id="null"),
            pytest.param([relay_object()], id="list"),
            pytest.param("prediction", id="text"),
            pytest.param(42, id="number"),
            pytest.param(_without("id"), id="missing-id"),
            pytest.param(relay_object(id=None), id="null-id"),
            pytest.param(relay_object(id=""), id="empty-id"),
            pytest.param(relay_object(id=123), id="numeric-id"),
            pytest.param(relay_object(id="a/b"), id="slash-in-id"),
            pytest.param(relay_object(id="../etc"), id="path-traversal-id"),
            pytest.param(relay_object(id="a b"), id="space-in-id"),
            pytest.param(relay_object(id="x" * 129), id="id-too-long"),
            pytest.param(relay_object(id="abc\n"), id="trailing-newline-id"),
            pytest.param(relay_object(id="x" * 128 + "\n"), id="129-chars-with-newline"),
            pytest.param(_without("status"), id="missing-status"),
            pytest.param(relay_object(status="queued"), id="unknown-status"),
            pytest.param(relay_object(status="Succeeded"), id="status-wrong-case"),
            pytest.param(relay_object(status=None), id="null-status"),
            pytest.param(relay_object(status=["succeeded"]), id="list-status"),
            pytest.param(relay_object(status={}), id="object-status"),
            pytest.param(relay_object(status=0), id="numeric-status"),
        ],
    )
    def test_raises(self, data: Any) -> None:
        with pytest.raises(InvalidUpstreamPrediction):
            parse_prediction(data)

    def test_is_a_value_error(self) -> None:
        assert issubclass(InvalidUpstreamPrediction, ValueError)


@pytest.mark.parametrize("data", [
    {"id": "abc123", "status": "starting"},
    {"id": "abc123", "status": "succeeded", "model": "a/b", "version": "v1", "output": ["https://x/y.png"],
     "error": None, "logs": "done", "metrics": {"predict_time": 1.5},
     "started_at": "2026-12-07T10:00:00.123456789Z", "completed_at": "2026-12-07T10:00:02Z",
     "urls": {"stream": "https://relay.example/s"}, "message": "a relay extra"},
    {"id": "abc123", "status": "failed", "error": {"code": 1}, "logs": ["a", "b"]},
])
def test_to_wire_reads_back_as_it_was(data: dict[str, Any]) -> None:
    parsed = parse_prediction(data)
    assert parse_prediction(orjson.loads(orjson.dumps(to_wire(parsed)))) == parsed
