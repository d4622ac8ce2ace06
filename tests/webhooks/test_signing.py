"""Standard Webhooks signing: the team secret, signatures that independent validators accept."""

from __future__ import annotations

import base64
import time
from datetime import UTC, datetime

import pytest
import replicate
import standardwebhooks
from replicate.webhook import InvalidSignatureError, Webhooks, WebhookSigningSecret

from app.webhooks.signing import sign, team_secret, verify

KEY = b"k" * 32
BODY = b'{"id":"abc","status":"succeeded","output":["https://gw.test/x.png"],"logs":"d\\u00e9j\\u00e0"}'


def headers_for(secret: str, message_id: str = "msg_1", timestamp: int | None = None,
                body: bytes = BODY) -> dict[str, str]:
    ts = int(time.time()) if timestamp is None else timestamp
    return {"webhook-id": message_id, "webhook-timestamp": str(ts),
            "webhook-signature": sign(secret, message_id, ts, body)}


class TestTeamSecret:
    def test_shape_is_whsec_and_padded_standard_base64_of_32_bytes(self) -> None:
        secret = team_secret(KEY, "token-1")
        assert secret.startswith("whsec_")
        encoded = secret.removeprefix("whsec_")
        assert "_" not in encoded  # the Python client splits the secret on "_"
        assert len(encoded) % 4 == 0
        assert len(base64.b64decode(encoded, validate=True)) == 32

    def test_stable_per_token_and_distinct_between_tokens_and_keys(self) -> None:
        assert team_secret(KEY, "token-1") == team_secret(KEY, "token-1")
        assert team_secret(KEY, "token-1") != team_secret(KEY, "token-2")
        assert team_secret(KEY, "token-1") != team_secret(b"j" * 32, "token-1")

    @pytest.mark.parametrize("token_id", [f"tok{i}" for i in range(40)])
    def test_never_contains_an_underscore_after_the_prefix(self, token_id: str) -> None:
        assert team_secret(KEY, token_id).count("_") == 1


class TestSign:
    def test_known_vector(self) -> None:
        # From the Standard Webhooks reference test suite.
        secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
        body = b'{"test": 2432232314}'
        expected = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        assert sign(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body) == expected

    def test_standardwebhooks_library_verifies_it(self) -> None:
        secret = team_secret(KEY, "token-1")
        payload = standardwebhooks.Webhook(secret).verify(BODY, headers_for(secret))
        assert payload["status"] == "succeeded"

    def test_standardwebhooks_library_rejects_a_changed_body(self) -> None:
        secret = team_secret(KEY, "token-1")
        with pytest.raises(standardwebhooks.webhooks.WebhookVerificationError):
            standardwebhooks.Webhook(secret).verify(BODY + b" ", headers_for(secret))

    def test_official_python_client_validates_it(self) -> None:
        secret = team_secret(KEY, "token-1")
        result = replicate.webhooks.validate(headers=headers_for(secret), body=BODY.decode(),
                                             secret=WebhookSigningSecret(key=secret), tolerance=300)
        assert result is None  # the client returns None on success and raises otherwise

    def test_official_python_client_rejects_another_teams_signature(self) -> None:
        headers = headers_for(team_secret(KEY, "token-2"))
        with pytest.raises(InvalidSignatureError):
            Webhooks.validate(headers=headers, body=BODY.decode(),
                              secret=WebhookSigningSecret(key=team_secret(KEY, "token-1")))


class TestVerify:
    secret = team_secret(KEY, "token-1")

    def test_accepts_its_own_signature(self) -> None:
        assert verify(self.secret, headers_for(self.secret), BODY)

    def test_header_names_are_case_insensitive(self) -> None:
        headers = {k.upper(): v for k, v in headers_for(self.secret).items()}
        assert verify(self.secret, headers, BODY)

    def test_accepts_one_valid_signature_among_several(self) -> None:
        headers = headers_for(self.secret)
        other = sign(team_secret(KEY, "old"), "msg_1", int(headers["webhook-timestamp"]), BODY)
        headers["webhook-signature"] = f"v1,bm90IGl0 {other} {headers['webhook-signature']}"
        assert verify(self.secret, headers, BODY)

    def test_accepts_a_library_signature(self) -> None:
        hook = standardwebhooks.Webhook(self.secret)
        now = datetime.now(UTC)
        signature = hook.sign("msg_lib", now, BODY.decode())
        headers = {"webhook-id": "msg_lib", "webhook-timestamp": str(int(now.timestamp())),
                   "webhook-signature": signature}
        assert verify(self.secret, headers, BODY)

    @pytest.mark.parametrize("change", [
        "body", "id", "timestamp", "secret", "version", "missing-id", "missing-signature",
        "garbage-signature", "empty-signature", "non-numeric-timestamp",
    ])
    def test_rejects(self, change: str) -> None:
        headers = headers_for(self.secret)
        body, secret = BODY, self.secret
        if change == "body":
            body = BODY.replace(b"succeeded", b"failed")
        elif change == "id":
            headers["webhook-id"] = "msg_2"
        elif change == "timestamp":
            headers["webhook-timestamp"] = str(int(headers["webhook-timestamp"]) + 1)
        elif change == "secret":
            secret = team_secret(KEY, "token-2")
        elif change == "version":
            headers["webhook-signature"] = headers["webhook-signature"].replace("v1,", "v2,")
        elif change == "missing-id":
            del headers["webhook-id"]
        elif change == "missing-signature":
            del headers["webhook-signature"]
        elif change == "garbage-signature":
            headers["webhook-signature"] = "v1,!!!not base64!!!"
        elif change == "empty-signature":
            headers["webhook-signature"] = "v1,"
        elif change == "non-numeric-timestamp":
            headers["webhook-timestamp"] = "1e9"
        assert not verify(secret, headers, body)

    @pytest.mark.parametrize(("offset", "valid"), [(-301, False), (-299, True), (299, True), (301, False)])
    def test_timestamp_tolerance_is_five_minutes_both_ways(self, offset: int, valid: bool) -> None:
        now = 1_800_000_000
        headers = headers_for(self.secret, timestamp=now + offset)
        assert verify(self.secret, headers, BODY, now=now) is valid
