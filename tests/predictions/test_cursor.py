"""Signed list cursors, bound to the token that asked for the list."""

from __future__ import annotations

import base64
import random
from datetime import UTC, datetime, timedelta, timezone

import orjson
import pytest

from app.errors import BadRequest
from app.predictions.cursor import Cursor, _signature, decode, encode

KEY = b"k" * 32
OTHER_KEY = b"K" * 32
TOKEN = "01hqtoken00000000000000000"
OTHER_TOKEN = "01hqtoken00000000000000001"
MOMENT = datetime(2025, 1, 15, 9, 54, 55, 566000, tzinfo=UTC)


def b64(payload: bytes) -> str:
    return base64.urlsafe_b64encode(payload).decode().rstrip("=")


def split(text: str) -> tuple[str, str]:
    body, signature = text.split(".", 1)
    return body, signature


class TestRoundTrip:
    @pytest.mark.parametrize(
        "cursor",
        [
            pytest.param(Cursor(MOMENT, "p1", backwards=False), id="forwards"),
            pytest.param(Cursor(MOMENT, "p1", backwards=True), id="backwards"),
            pytest.param(Cursor(datetime(2025, 1, 1, tzinfo=UTC), "x" * 26, False), id="no-microseconds"),
            pytest.param(Cursor(datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC), "a.b-c_d", True),
                         id="max-microseconds-and-odd-id"),
            pytest.param(Cursor(MOMENT, "ünïcode", False), id="unicode-id"),
            pytest.param(Cursor(MOMENT.astimezone(timezone(timedelta(hours=2))), "p", False),
                         id="non-utc-offset-same-instant"),
        ],
    )
    def test_decode_gives_back_the_cursor(self, cursor: Cursor) -> None:
        text = encode(cursor, TOKEN, KEY)
        decoded = decode(text, TOKEN, KEY)
        assert decoded == cursor
        assert decoded.created_at.utcoffset() == cursor.created_at.utcoffset()

    def test_is_url_safe_and_unpadded(self) -> None:
        text = encode(Cursor(MOMENT, "p1", True), TOKEN, KEY)
        assert "=" not in text
        assert set(text) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.")

    def test_deterministic(self) -> None:
        cursor = Cursor(MOMENT, "p1", False)
        assert encode(cursor, TOKEN, KEY) == encode(cursor, TOKEN, KEY)

    def test_direction_changes_the_cursor(self) -> None:
        assert encode(Cursor(MOMENT, "p1", False), TOKEN, KEY) != encode(Cursor(MOMENT, "p1", True), TOKEN, KEY)


class TestRejectsForeignCursors:
    @pytest.mark.parametrize(
        ("token_id", "key"),
        [
            pytest.param(OTHER_TOKEN, KEY, id="other-token"),
            pytest.param("", KEY, id="empty-token-id"),
            pytest.param(TOKEN, OTHER_KEY, id="other-key"),
            pytest.param(TOKEN + "x", KEY, id="token-id-extended"),
        ],
    )
    def test_bad_request(self, token_id: str, key: bytes) -> None:
        text = encode(Cursor(MOMENT, "p1", False), TOKEN, KEY)
        with pytest.raises(BadRequest) as caught:
            decode(text, token_id, key)
        assert caught.value.status == 400
        assert caught.value.detail == "The cursor is invalid"


class TestRejectsTampering:
    @pytest.mark.parametrize(
        "payload",
        [
            pytest.param([MOMENT.isoformat(), "p2", 0], id="other-id"),
            pytest.param([MOMENT.isoformat(), "p1", 1], id="flipped-direction"),
            pytest.param([(MOMENT - timedelta(days=1)).isoformat(), "p1", 0], id="other-time"),
        ],
    )
    def test_payload_replaced_keeping_signature(self, payload: list[object]) -> None:
        _, signature = split(encode(Cursor(MOMENT, "p1", False), TOKEN, KEY))
        with pytest.raises(BadRequest):
            decode(f"{b64(orjson.dumps(payload))}.{signature}", TOKEN, KEY)

    def test_payload_of_another_cursor_with_this_signature(self) -> None:
        body_a, _ = split(encode(Cursor(MOMENT, "a", False), TOKEN, KEY))
        _, signature_b = split(encode(Cursor(MOMENT, "b", False), TOKEN, KEY))
        with pytest.raises(BadRequest):
            decode(f"{body_a}.{signature_b}", TOKEN, KEY)

    @pytest.mark.parametrize("position", [0, 5, 11, -2])
    def test_payload_character_changed(self, position: int) -> None:
        body, signature = split(encode(Cursor(MOMENT, "p1", False), TOKEN, KEY))
        chars = list(body)
        chars[position] = "A" if chars[position] != "A" else "B"
        with pytest.raises(BadRequest):
            decode("".join(chars) + "." + signature, TOKEN, KEY)

    @pytest.mark.parametrize(
        "mutate",
        [
            pytest.param(lambda s: s[:-1], id="truncated"),
            pytest.param(lambda s: s + "A", id="extended"),
            pytest.param(lambda s: ("A" if s[0] != "A" else "B") + s[1:], id="first-char-changed"),
            pytest.param(lambda s: "", id="empty"),
            pytest.param(lambda s: s.upper(), id="upper-cased"),
            pytest.param(lambda s: s + ".x", id="extra-dot-part"),
        ],
    )
    def test_signature_changed(self, mutate: object) -> None:
        body, signature = split(encode(Cursor(MOMENT, "p1", False), TOKEN, KEY))
        assert callable(mutate)
        with pytest.raises(BadRequest):
            decode(f"{body}.{mutate(signature)}", TOKEN, KEY)


GARBAGE = [
    "",
    ".",
    "..",
    "abc",
    "abc.",
    ".abc",
    "not base64!.sig",
    "%%%.%%%",
    "é.é",
    "\x00.\x00",
    "a" * 10_000,
    "a.b.c.d",
    "W10.sig",  # base64 of "[]"
    "bnVsbA.sig",  # base64 of "null"
    " " * 3,
    "\n.\n",
    "💥.💥",
]


class TestGarbage:
    @pytest.mark.parametrize("text", GARBAGE)
    def test_bad_request_only(self, text: str) -> None:
        with pytest.raises(BadRequest):
            decode(text, TOKEN, KEY)

    @pytest.mark.parametrize(
        "payload",
        [
            pytest.param(b"not json", id="not-json"),
            pytest.param(b"[]", id="empty-list"),
            pytest.param(b"null", id="null"),
            pytest.param(b"{}", id="object"),
            pytest.param(b'["x", "p1", 0]', id="bad-date"),
            pytest.param(b'[1, "p1", 0]', id="date-not-text"),
            pytest.param(b'["2025-01-01T00:00:00+00:00", "p1"]', id="two-items"),
            pytest.param(b'["2025-01-01T00:00:00+00:00", "p1", 0, 1]', id="four-items"),
            pytest.param(b"[" * 2000 + b"]" * 2000, id="deeply-nested"),
            pytest.param(b"\xff\xfe", id="not-utf8"),
        ],
    )
    def test_validly_signed_nonsense_is_bad_request(self, payload: bytes) -> None:
        # Even with a correct signature (a leaked key), a malformed payload is a 400, not a 500.
        text = f"{b64(payload)}.{_signature(payload, TOKEN, KEY)}"
        with pytest.raises(BadRequest):
            decode(text, TOKEN, KEY)

    def test_random_mutations_never_raise_anything_else(self) -> None:
        rng = random.Random(1234)
        valid = encode(Cursor(MOMENT, "p1", True), TOKEN, KEY)
        alphabet = "ABCxyz019-_.=+/ é\x00"
        for _ in range(2000):
            chars = list(valid)
            for _ in range(rng.randint(1, 4)):
                op = rng.choice(("replace", "insert", "delete"))
                at = rng.randrange(len(chars) or 1)
                if op == "replace" and chars:
                    chars[at] = rng.choice(alphabet)
                elif op == "insert":
                    chars.insert(at, rng.choice(alphabet))
                elif chars:
                    del chars[at]
            text = "".join(chars)
            try:
                decoded = decode(text, TOKEN, KEY)
            except BadRequest:
                continue
            # Only base64's ignored padding bits can change and still verify: same cursor.
            assert decoded == Cursor(MOMENT, "p1", True)
