"""A ledger row to the Replicate prediction object clients receive."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

import pytest
from replicate.prediction import Prediction as ClientPrediction

from app.predictions.models import Prediction
from app.predictions.rewrite import client_status, prediction_urls, rfc3339, stream_token, to_client

KEY = b"s" * 32
BASE = "https://gateway.example.test"
CREATED = datetime(2025, 1, 15, 9, 54, 55, 566000, tzinfo=UTC)
STARTED = datetime(2025, 1, 15, 9, 54, 56, tzinfo=UTC)
COMPLETED = datetime(2025, 1, 15, 9, 54, 58, 123456, tzinfo=UTC)
RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z$")
OUTPUT_KEYS = {
    "id", "model", "version", "input", "logs", "output", "data_removed", "error", "status",
    "source", "created_at", "started_at", "completed_at", "urls",
}


def make(**overrides: Any) -> Prediction:
    fields: dict[str, Any] = {
        "id": "01jhgx8m2q0000000000000000",
        "token_id": "01jhgx8m2q0000000000000tok",
        "upstream": "default",
        "upstream_id": "relay-upstream-id-42",
        "submission": "accepted",
        "model": "black-forest-labs/flux-schnell",
        "version": "5599ed30703defd1d160a25a63321b4dec97101d98b4674bcc56e41f62f35637",
        "deployment": None,
        "status": "succeeded",
        "input": {"prompt": "a cat"},
        "output": ["https://replicate.delivery/out-0.webp"],
        "error": None,
        "logs": "step 1\nstep 2\n",
        "metrics": {"predict_time": 2.5},
        "upstream_extra": {"message": "from the relay", "relay_secret": "zzz"},
        "streamable": False,
        "created_at": CREATED,
        "started_at": STARTED,
        "completed_at": COMPLETED,
        "updated_at": COMPLETED,
        "cost_micros": 6000,
        "cost_note": "a note",
    }
    fields.update(overrides)
    return Prediction(**fields)


class TestUrls:
    @pytest.mark.parametrize("streamable", [False, True, None])
    @pytest.mark.parametrize("base", [BASE, "http://127.0.0.1:8080", "https://gw.example.test/prefix"])
    def test_every_url_is_absolute_under_the_public_base(self, base: str, streamable: bool | None) -> None:
        body = to_client(make(streamable=streamable), base, KEY)
        assert body["urls"]
        for url in body["urls"].values():
            assert url.startswith(base + "/")
            assert "relay" not in url

    @pytest.mark.parametrize("streamable", [True, False, None])
    def test_every_prediction_has_a_stream_url(self, streamable: bool | None) -> None:
        # The gateway builds streams itself, whatever the upstream offered.
        urls = to_client(make(streamable=streamable), BASE, KEY)["urls"]
        assert set(urls) == {"get", "cancel", "web", "stream"}

    def test_exact_urls(self) -> None:
        prediction = make(streamable=True)
        pid = prediction.id
        assert prediction_urls(prediction, BASE, KEY) == {
            "get": f"{BASE}/v1/predictions/{pid}",
            "cancel": f"{BASE}/v1/predictions/{pid}/cancel",
            "web": f"{BASE}/dashboard/predictions/{pid}",
            "stream": f"{BASE}/v1/streams/{pid}.{stream_token(pid, KEY)}",
        }

    @pytest.mark.parametrize("base", [BASE, BASE + "/replicate"])
    def test_web_url_is_the_dashboard_page_on_the_gateways_origin(self, base: str) -> None:
        prediction = make()
        assert prediction_urls(prediction, base, KEY)["web"] == f"{BASE}/dashboard/predictions/{prediction.id}"


class TestStreamToken:
    def test_hex_of_fixed_length(self) -> None:
        assert re.fullmatch(r"[0-9a-f]{40}", stream_token("p1", KEY))

    def test_deterministic(self) -> None:
        assert stream_token("p1", KEY) == stream_token("p1", KEY)

    @pytest.mark.parametrize(
        ("a", "b"),
        [
            pytest.param(("p1", KEY), ("p2", KEY), id="differs-per-id"),
            pytest.param(("p1", KEY), ("p1", b"t" * 32), id="differs-per-key"),
            pytest.param(("p1", KEY), ("p10", KEY), id="prefix-id"),
        ],
    )
    def test_differs(self, a: tuple[str, bytes], b: tuple[str, bytes]) -> None:
        assert stream_token(*a) != stream_token(*b)


class TestStatus:
    @pytest.mark.parametrize(
        ("status", "expected"),
        [
            pytest.param("starting", "starting"),
            pytest.param("processing", "processing"),
            pytest.param("succeeded", "succeeded"),
            pytest.param("failed", "failed"),
            pytest.param("canceled", "canceled"),
            pytest.param("aborted", "canceled", id="aborted-shown-as-canceled"),
        ],
    )
    def test_client_status(self, status: str, expected: str) -> None:
        assert client_status(status) == expected
        assert to_client(make(status=status), BASE, KEY)["status"] == expected

    @pytest.mark.parametrize(
        ("status", "override"),
        [("starting", "processing"), ("succeeded", "starting"), ("aborted", "failed"), ("processing", "canceled")],
    )
    def test_status_override_wins(self, status: str, override: str) -> None:
        assert to_client(make(status=status), BASE, KEY, status_override=override)["status"] == override


class TestTimestamps:
    @pytest.mark.parametrize(
        ("moment", "expected"),
        [
            pytest.param(CREATED, "2025-01-15T09:54:55.566000Z", id="milliseconds-padded"),
            pytest.param(STARTED, "2025-01-15T09:54:56.000000Z", id="whole-second"),
            pytest.param(COMPLETED, "2025-01-15T09:54:58.123456Z", id="microseconds"),
            pytest.param(datetime(2000, 2, 29, 0, 0, 0, 1, tzinfo=UTC), "2000-02-29T00:00:00.000001Z",
                         id="one-microsecond"),
            pytest.param(None, None, id="none"),
        ],
    )
    def test_rfc3339_six_fractional_digits_and_z(self, moment: datetime | None, expected: str | None) -> None:
        assert rfc3339(moment) == expected

    def test_timestamps_in_body(self) -> None:
        body = to_client(make(), BASE, KEY)
        for name in ("created_at", "started_at", "completed_at"):
            assert RFC3339.match(body[name]), body[name]

    def test_unstarted_prediction_has_null_times(self) -> None:
        body = to_client(make(status="starting", started_at=None, completed_at=None), BASE, KEY)
        assert body["started_at"] is None
        assert body["completed_at"] is None
        assert RFC3339.match(body["created_at"])


class TestFields:
    @pytest.mark.parametrize(
        ("overrides", "field", "expected"),
        [
            pytest.param({"version": None}, "version", "hidden", id="version-none-hidden"),
            pytest.param({"version": ""}, "version", "hidden", id="version-empty-hidden"),
            pytest.param({"version": "abc123"}, "version", "abc123", id="version-kept"),
            pytest.param({"logs": None}, "logs", "", id="logs-none-empty"),
            pytest.param({"logs": "hello"}, "logs", "hello", id="logs-kept"),
            pytest.param({"error": "boom"}, "error", "boom", id="error-kept"),
            pytest.param({"output": None}, "output", None, id="output-none"),
            pytest.param({"output": {"text": "hi"}}, "output", {"text": "hi"}, id="output-object"),
            pytest.param({}, "data_removed", False, id="data-removed-false"),
            pytest.param({}, "source", "api", id="source-api"),
            pytest.param({}, "model", "black-forest-labs/flux-schnell", id="model-kept"),
            pytest.param({}, "input", {"prompt": "a cat"}, id="input-kept"),
        ],
    )
    def test_field(self, overrides: dict[str, Any], field: str, expected: Any) -> None:
        assert to_client(make(**overrides), BASE, KEY)[field] == expected

    @pytest.mark.parametrize(
        ("overrides", "keys"),
        [
            pytest.param({}, OUTPUT_KEYS | {"metrics"}, id="with-metrics"),
            pytest.param({"metrics": None}, OUTPUT_KEYS, id="no-metrics"),
            pytest.param({"metrics": {}}, OUTPUT_KEYS | {"metrics"}, id="empty-metrics-kept"),
            pytest.param({"deployment": "acme/prod"}, OUTPUT_KEYS | {"metrics", "deployment"}, id="deployment"),
            pytest.param({"deployment": ""}, OUTPUT_KEYS | {"metrics"}, id="empty-deployment-dropped"),
        ],
    )
    def test_exact_keys(self, overrides: dict[str, Any], keys: set[str]) -> None:
        assert set(to_client(make(**overrides), BASE, KEY)) == keys

    def test_nothing_upstream_or_ledger_leaks(self) -> None:
        prediction = make(streamable=True)
        body = to_client(prediction, BASE, KEY)
        for name in ("upstream", "upstream_id", "upstream_extra", "submission", "token_id",
                     "cost_micros", "cost_note", "updated_at"):
            assert name not in body
        text = repr(body)
        for value in ("relay-upstream-id-42", "from the relay", "zzz", "a note", prediction.token_id):
            assert value not in text


def _client_cases() -> list[Any]:
    statuses = ["starting", "processing", "succeeded", "failed", "canceled", "aborted"]
    cases = [pytest.param({"status": s}, id=f"status-{s}") for s in statuses]
    cases += [
        pytest.param({"version": None, "logs": None, "metrics": None, "output": None,
                      "started_at": None, "completed_at": None, "status": "starting"}, id="minimal"),
        pytest.param({"streamable": True, "deployment": "acme/prod"}, id="stream-and-deployment"),
        pytest.param({"status": "failed", "error": "CUDA out of memory", "output": None}, id="failed-with-error"),
    ]
    return cases


class TestOfficialClientModel:
    @pytest.mark.parametrize("overrides", _client_cases())
    def test_parses_in_replicate_client(self, overrides: dict[str, Any]) -> None:
        body = to_client(make(**overrides), BASE, KEY)
        # replicate 1.0.7 builds it as `Prediction(**json)` in `_json_to_prediction`.
        parsed = ClientPrediction(**body)
        assert parsed.id == body["id"]
        assert parsed.status == body["status"]
        assert parsed.urls == body["urls"]
        assert parsed.version == body["version"]
        assert parsed.logs == body["logs"]

    def test_aborted_would_be_rejected_by_the_client(self) -> None:
        # Why the mapping exists: the client's status Literal has no "aborted".
        body = to_client(make(status="aborted"), BASE, KEY)
        body["status"] = "aborted"
        with pytest.raises(ValueError, match="status"):
            ClientPrediction(**body)
