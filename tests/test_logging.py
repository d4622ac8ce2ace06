"""JSON log lines with secrets scrubbed from the message, its arguments, fields and exceptions."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from app.logging import JsonFormatter, SecretScrubber

CONFIGURED = "configured-secret-Value-42"


@dataclass(frozen=True)
class Case:
    text: str
    secrets: tuple[str, ...]
    kept: tuple[str, ...] = ()


CASES = {
    "configured-secret": Case(f"db password {CONFIGURED} end", (CONFIGURED,), ("db password", "end")),
    "bearer": Case("Authorization: Bearer abcdefgh12345678", ("abcdefgh12345678",), ("Authorization: Bearer",)),
    "bearer-lower": Case("header bearer Zz9.Yy8-Xx7_Ww6~", ("Zz9.Yy8-Xx7_Ww6~",), ("header bearer",)),
    "token-scheme": Case("Authorization: Token q1w2e3r4t5y6u7", ("q1w2e3r4t5y6u7",), ("Token",)),
    "sk-key": Case("upstream key sk-live-abcdef123456 rejected", ("sk-live-abcdef123456",), ("rejected",)),
    "sk-underscore": Case("key=sk_abcdef123456", ("sk_abcdef123456",)),
    "r8-key": Case("using r8_AbCdEf1234567890xyz now", ("r8_AbCdEf1234567890xyz",), ("using", "now")),
    "gw-key": Case("client sent gw_0123456789abcdef", ("gw_0123456789abcdef",), ("client sent",)),
    "whsec": Case("signing with whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", ("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",)),
    "query-key-and-token": Case(
        "GET https://relay.example/v1/x?key=qsecret111&token=qsecret222&page=3",
        ("qsecret111", "qsecret222"), ("https://relay.example/v1/x?key=", "&token=", "&page=3"),
    ),
    "query-api-key": Case("/cb?api_key=qsecret333 done", ("qsecret333",), ("done",)),
    "query-access-token": Case("/cb?a=1&access_token=qsecret444", ("qsecret444",), ("a=1",)),
    "query-signature": Case("/file?Signature=qsecret555&x=y", ("qsecret555",), ("x=y",)),
    "several-at-once": Case(
        f"Bearer abcdefgh12345678 and r8_AbCdEf1234567890xyz and {CONFIGURED}",
        ("abcdefgh12345678", "r8_AbCdEf1234567890xyz", CONFIGURED),
    ),
}


@pytest.fixture
def capture(request: pytest.FixtureRequest) -> Iterator[tuple[logging.Logger, io.StringIO]]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(SecretScrubber([CONFIGURED]))
    logger = logging.getLogger(f"tests.logging.{request.node.name}")
    logger.handlers = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    yield logger, stream
    logger.handlers = []
    logger.propagate = True


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    text = stream.getvalue()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def check(output: str, case: Case) -> None:
    for secret in case.secrets:
        assert secret not in output
    assert "[redacted]" in output
    for kept in case.kept:
        assert kept in output


class TestScrub:
    @pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
    def test_masks(self, case: Case) -> None:
        check(SecretScrubber([CONFIGURED]).scrub(case.text), case)

    @pytest.mark.parametrize(
        "text",
        [
            pytest.param("nothing to see here", id="plain"),
            pytest.param("Bearer short", id="bearer-value-too-short"),
            pytest.param("sk-abc", id="key-too-short"),
            pytest.param("task-abcdefghijk", id="not-a-key-prefix"),
            pytest.param("?page=2&limit=50", id="harmless-query"),
            pytest.param("the token was rejected", id="word-token"),
        ],
    )
    def test_leaves_harmless_text(self, text: str) -> None:
        assert SecretScrubber([CONFIGURED]).scrub(text) == text

    def test_short_configured_secrets_are_ignored(self) -> None:
        assert SecretScrubber(["abc", ""]).scrub("abc is fine") == "abc is fine"

    def test_longest_configured_secret_first(self) -> None:
        assert SecretScrubber(["abcd", "abcdefgh"]).scrub("x abcdefgh y") == "x [redacted] y"


class TestThroughAHandler:
    @pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
    def test_in_the_message(self, capture: tuple[logging.Logger, io.StringIO], case: Case) -> None:
        logger, stream = capture
        logger.warning(case.text)
        [entry] = lines(stream)
        check(str(entry["event"]), case)
        check(stream.getvalue(), case)

    @pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
    def test_in_percent_args(self, capture: tuple[logging.Logger, io.StringIO], case: Case) -> None:
        logger, stream = capture
        logger.info("upstream said %s (%d%%)", case.text, 50)
        [entry] = lines(stream)
        assert str(entry["event"]).startswith("upstream said ")
        assert str(entry["event"]).endswith("(50%)")
        check(stream.getvalue(), case)

    @pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
    def test_in_string_extra_fields(self, capture: tuple[logging.Logger, io.StringIO], case: Case) -> None:
        logger, stream = capture
        logger.info("request.done", extra={"detail": case.text, "status": 401, "path": "/v1/x"})
        [entry] = lines(stream)
        assert entry["event"] == "request.done"
        assert entry["status"] == 401
        assert entry["path"] == "/v1/x"
        check(str(entry["detail"]), case)
        check(stream.getvalue(), case)

    @pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
    def test_in_exception_text(self, capture: tuple[logging.Logger, io.StringIO], case: Case) -> None:
        logger, stream = capture
        try:
            raise RuntimeError(f"connect failed: {case.text}")
        except RuntimeError:
            logger.exception("upstream.failed")
        output = stream.getvalue()
        assert output.count("\n") == 1
        [entry] = lines(stream)
        assert entry["event"] == "upstream.failed"
        assert entry["level"] == "error"
        exception = str(entry["exception"])
        assert "Traceback" in exception
        assert "RuntimeError: connect failed:" in exception
        check(exception, case)
        check(output, case)

    def test_exception_given_as_exc_info_object(self, capture: tuple[logging.Logger, io.StringIO]) -> None:
        logger, stream = capture
        error = ValueError(f"bad url https://relay.example/x?token=qsecret999 with {CONFIGURED}")
        logger.error("request.failed", exc_info=error)
        [entry] = lines(stream)
        assert "qsecret999" not in stream.getvalue()
        assert CONFIGURED not in stream.getvalue()
        assert "ValueError" in str(entry["exception"])

    def test_chained_exception_is_scrubbed(self, capture: tuple[logging.Logger, io.StringIO]) -> None:
        logger, stream = capture
        try:
            try:
                raise KeyError("r8_AbCdEf1234567890xyz")
            except KeyError as inner:
                raise RuntimeError("outer Bearer abcdefgh12345678") from inner
        except RuntimeError:
            logger.exception("boom")
        output = stream.getvalue()
        lines(stream)
        assert "r8_AbCdEf1234567890xyz" not in output
        assert "abcdefgh12345678" not in output
        assert "KeyError" in output

    def test_line_shape(self, capture: tuple[logging.Logger, io.StringIO]) -> None:
        logger, stream = capture
        logger.info("prediction.created", extra={"prediction_id": "p1"})
        [entry] = lines(stream)
        assert set(entry) == {"ts", "level", "logger", "event", "prediction_id"}
        assert entry["level"] == "info"
        assert entry["logger"] == logger.name


@pytest.mark.parametrize("path", [
    "/replicate/v1/streams/abcdefghijklmnopqrstuvwxyz.0123456789abcdef0123456789abcdef01234567",
    "/v1/outputs/abcdefghijklmnopqrstuvwxyz.0123456789abcdef0123456789abcdef01234567/out-0.webp",
    "/v1/webhooks/inbound/abcdefghijklmnopqrstuvwxyz.0123456789abcdef0123456789abcdef01234567",
])
def test_capability_keys_in_paths_are_masked(path: str) -> None:
    scrubbed = SecretScrubber().scrub(f'127.0.0.1:5000 - "GET {path} HTTP/1.1" 200')
    assert "0123456789abcdef0123456789abcdef01234567" not in scrubbed
    assert "abcdefghijklmnopqrstuvwxyz.[redacted]" in scrubbed
