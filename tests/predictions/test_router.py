"""The prediction API over HTTP: validation, forwarding rules, rewriting and the ledger."""

from __future__ import annotations

import base64
import threading
import time
from typing import Any

import httpx
import pytest

from tests.conftest import Gateway
from tests.dbtools import create_token, rows
from tests.fakes.relay import FakeRelay
from tests.helpers import assert_problem, create, wait_terminal


class TestRequestValidation:
    def test_invalid_json_is_400(self, api: httpx.Client) -> None:
        response = api.post("/models/a/b/predictions", content=b"{not json",
                            headers={"Content-Type": "application/json"})
        assert_problem(response, 400)

    @pytest.mark.parametrize(("body", "field"), [
        ({"input": "text"}, "input"),
        ({}, "input"),
        ({"input": {}, "stream": "maybe"}, "stream"),
        ([1, 2], "body"),
    ])
    def test_wrong_shapes_are_422_with_invalid_fields(self, api: httpx.Client, body: Any, field: str) -> None:
        problem = assert_problem(api.post("/models/a/b/predictions", json=body), 422)
        assert field in [f["field"] for f in problem["invalid_fields"]]

    def test_version_create_needs_a_version(self, api: httpx.Client) -> None:
        problem = assert_problem(api.post("/predictions", json={"input": {}}), 422)
        assert problem["invalid_fields"][0]["field"] == "version"

    @pytest.mark.parametrize("version", ["not a version", "a/b:c:d", "../x:1", "owner/:abc"])
    def test_malformed_versions_are_422(self, api: httpx.Client, version: str) -> None:
        assert_problem(api.post("/predictions", json={"version": version, "input": {}}), 422)

    def test_oversized_body_is_413_before_reaching_the_upstream(
        self, api: httpx.Client, relay: FakeRelay, gateway: Gateway
    ) -> None:
        big = {"input": {"prompt": "x" * (gateway.settings.max_body_bytes + 10)}}
        assert_problem(api.post("/models/a/b/predictions", json=big), 413)

        def chunks() -> Any:
            yield b'{"input": {"prompt": "'
            for _ in range(gateway.settings.max_body_bytes // 65536 + 2):
                yield b"x" * 65536
            yield b'"}}'

        response = api.post("/models/a/b/predictions", content=chunks(),
                            headers={"Content-Type": "application/json"})
        assert_problem(response, 413)
        assert relay.creates() == []
        assert rows(gateway.db_url, "prediction") == []

    def test_unknown_routes_and_methods_are_problems(self, api: httpx.Client) -> None:
        assert_problem(api.get("/trainings"), 404)
        assert_problem(api.get("/no/such/thing"), 404)
        assert_problem(api.get("/models/a/b/predictions"), 405)

    def test_multipart_is_415(self, api: httpx.Client) -> None:
        assert_problem(api.post("/models/a/b/predictions", files={"input": b"x"}), 415)


class TestForwarding:
    def test_only_allow_listed_headers_and_our_own_key_go_upstream(
        self, api: httpx.Client, relay: FakeRelay, token: str
    ) -> None:
        response = api.post(
            "/models/black-forest-labs/flux-schnell/predictions",
            json={"input": {"prompt": "x"}},
            headers={"Prefer": "wait=600", "Cancel-After": "5m", "Cookie": "session=caller-cookie",
                     "X-Forwarded-For": "10.1.2.3", "X-Api-Key": token, "Idempotency-Key": "k1"},
        )
        assert response.status_code == 201
        (call,) = relay.creates()
        assert call.had_key
        assert call.headers["authorization"] == f"Bearer {relay.key}"
        assert call.headers["prefer"] == "wait=59"  # clamped to 60, less a second for the gateway
        assert call.headers["cancel-after"] == "5m"
        for name in ("cookie", "x-forwarded-for", "x-api-key", "idempotency-key"):
            assert name not in call.headers
        assert token not in repr(call.headers) + call.body.decode()

    def test_relay_cookies_are_never_kept_or_returned(self, api: httpx.Client, relay: FakeRelay) -> None:
        relay.starting_seconds = 30
        prediction = create(api)
        assert "set-cookie" not in prediction.headers
        api.get(f"/predictions/{prediction.json()['id']}")
        assert len(relay.calls) == 2
        assert all("cookie" not in call.headers for call in relay.calls)

    def test_invalid_cancel_after_is_422(self, api: httpx.Client, relay: FakeRelay) -> None:
        response = api.post("/models/a/b/predictions", json={"input": {}}, headers={"Cancel-After": "soon"})
        assert_problem(response, 422)
        assert relay.creates() == []

    def test_the_callers_token_never_reaches_the_upstream_or_the_ledger(
        self, api: httpx.Client, relay: FakeRelay, token: str, gateway: Gateway
    ) -> None:
        # The npm client's data-uri strategy puts the serialised client, token included, in input.
        create(api, client={"auth": token, "baseUrl": "x"})
        (call,) = relay.creates()
        assert token not in call.body.decode()
        assert token not in repr(rows(gateway.db_url, "prediction"))

    def test_data_uris_go_upstream_intact_and_are_kept_only_as_a_digest(
        self, api: httpx.Client, relay: FakeRelay, gateway: Gateway
    ) -> None:
        payload = "data:image/png;base64," + base64.b64encode(b"\x89PNG" + b"\0" * 3000).decode()
        body = create(api, image=payload).json()
        (call,) = relay.creates()
        assert call.json()["input"]["image"] == payload
        (row,) = rows(gateway.db_url, "prediction")
        assert payload not in repr(row)
        assert "sha256=" in repr(row)
        assert body["input"]["image"].startswith("data:image/png;sha256=")

    @pytest.mark.parametrize(("version", "path", "sent_version"), [
        ("owner/model", "/replicate/v1/models/owner/model/predictions", None),
        ("owner/model:abc123", "/replicate/v1/predictions", "abc123"),
        ("f" * 64, "/replicate/v1/predictions", "f" * 64),
    ])
    def test_version_forms_are_routed(
        self, api: httpx.Client, relay: FakeRelay, version: str, path: str, sent_version: str | None
    ) -> None:
        assert api.post("/predictions", json={"version": version, "input": {"prompt": "x"}}).status_code == 201
        (call,) = relay.creates()
        assert call.path == path
        assert call.json().get("version") == sent_version

    def test_deployment_predictions_carry_the_deployment(self, api: httpx.Client, relay: FakeRelay) -> None:
        body = api.post("/deployments/acme/fast/predictions", json={"input": {"prompt": "x"}}).json()
        assert body["deployment"] == "acme/fast"
        assert relay.creates()[0].path == "/replicate/v1/deployments/acme/fast/predictions"


class TestResponses:
    def test_prediction_objects_are_rewritten_to_the_gateway(
        self, api: httpx.Client, relay: FakeRelay, gateway: Gateway
    ) -> None:
        response = create(api)
        body = response.json()
        assert response.status_code == 201
        assert body["status"] == "starting"
        assert body["version"] == "hidden"
        assert "message" not in body
        assert len(body["id"]) == 26
        upstream_id = relay.creates()[0].prediction_id
        assert upstream_id
        assert body["id"] != upstream_id
        base = f"{gateway.replicate_base}/v1/predictions/{body['id']}"
        assert body["urls"]["get"] == base
        assert body["urls"]["cancel"] == base + "/cancel"
        assert body["urls"]["stream"].startswith(gateway.replicate_base + "/v1/streams/")
        assert "replicate.com" not in response.text
        assert upstream_id not in response.text

    def test_bare_v1_prefix_hands_out_bare_urls(self, gateway: Gateway, token: str) -> None:
        with httpx.Client(base_url=gateway.url + "/v1", headers={"Authorization": f"Bearer {token}"}) as api:
            body = create(api).json()
        assert body["urls"]["get"] == f"{gateway.url}/v1/predictions/{body['id']}"

    def test_public_url_wins_over_the_host_header(self, gateway_factory: Any) -> None:
        gateway: Gateway = gateway_factory(public_url="https://gw.example.com/replicate/")
        with gateway.client(create_token(gateway.db_url, "t")) as api:
            body = api.post("/models/a/b/predictions", json={"input": {}}, headers={"Host": "evil.example"}).json()
        assert body["urls"]["get"] == f"https://gw.example.com/replicate/v1/predictions/{body['id']}"

    def test_sync_wait_that_runs_out_reports_starting(self, api: httpx.Client, relay: FakeRelay) -> None:
        relay.starting_seconds = 0.05
        relay.processing_seconds = 30
        response = api.post("/models/a/b/predictions", json={"input": {}}, headers={"Prefer": "wait=1"})
        assert response.json()["status"] == "starting"
        assert response.headers["location"] == response.json()["urls"]["get"]
        upstream_id = relay.creates()[0].prediction_id or ""
        assert relay.predictions[upstream_id]["status"] == "processing"


class TestLedger:
    def test_finished_predictions_are_served_from_the_ledger(
        self, api: httpx.Client, relay: FakeRelay
    ) -> None:
        prediction = create(api).json()
        final = wait_terminal(api, prediction["id"])
        relay.forget(relay.creates()[0].prediction_id or "")
        calls = len(relay.calls)
        again = api.get(f"/predictions/{prediction['id']}").json()
        assert again == final
        assert len(relay.calls) == calls
        cancel = api.post(f"/predictions/{prediction['id']}/cancel")
        assert cancel.json()["status"] == "succeeded"
        assert len(relay.calls) == calls

    def test_row_is_committed_before_the_upstream_sees_the_create(
        self, gateway: Gateway, api: httpx.Client, relay: FakeRelay
    ) -> None:
        relay.fail_next("hang", seconds=1.5)
        thread = threading.Thread(target=lambda: create(gateway.client(api.headers["authorization"][7:])))
        thread.start()
        deadline = time.monotonic() + 3
        while not relay.calls and time.monotonic() < deadline:
            time.sleep(0.02)
        (row,) = rows(gateway.db_url, "prediction")
        assert row["submission"] == "pending"
        thread.join()
        (row,) = rows(gateway.db_url, "prediction")
        assert row["submission"] == "accepted"
        assert row["upstream_id"] == relay.creates()[0].prediction_id

    def test_failed_and_succeeded_are_recorded_with_cost(self, api: httpx.Client, gateway: Gateway) -> None:
        ok = wait_terminal(api, create(api).json()["id"])
        failed = wait_terminal(api, create(api, fail=True).json()["id"])
        assert failed["status"] == "failed"
        assert failed["error"] == "something went wrong"
        costs = {r["id"]: r["cost_micros"] for r in rows(gateway.db_url, "prediction")}
        assert costs == {ok["id"]: 6000, failed["id"]: 0}


class TestModels:
    def test_model_and_versions_are_forwarded(self, api: httpx.Client) -> None:
        model = api.get("/models/black-forest-labs/flux-schnell").json()
        assert model["name"] == "flux-schnell"
        versions = api.get("/models/black-forest-labs/flux-schnell/versions").json()
        version_id = versions["results"][0]["id"]
        version = api.get(f"/models/black-forest-labs/flux-schnell/versions/{version_id}").json()
        assert isinstance(version["cog_version"], str)

    def test_versions_are_paged_through_the_gateway_only(
        self, gateway: Gateway, api: httpx.Client, relay: FakeRelay
    ) -> None:
        pages = f"{gateway.replicate_base}/v1/models/black-forest-labs/flux-schnell/versions"
        first = api.get("/models/black-forest-labs/flux-schnell/versions")
        assert (first.json()["next"], first.json()["previous"]) == (pages + "?cursor=page-2", None)
        # Clients request `next` verbatim, with their token: it must lead here, never to Replicate.
        second = api.get(first.json()["next"])
        assert second.json()["results"][0]["id"] == "0" * 64
        assert (second.json()["next"], second.json()["previous"]) == (None, pages + "?cursor=page-1")
        assert "api.replicate.com" not in first.text + second.text
        assert [call.query for call in relay.calls if call.path.endswith("/versions")] == ["", "cursor=page-2"]
        assert_problem(api.get("/models/black-forest-labs/flux-schnell/versions", params={"cursor": "x" * 1001}), 400)

    def test_missing_versions_endpoint_falls_back_to_a_usable_version(
        self, api: httpx.Client, relay: FakeRelay
    ) -> None:
        relay.versions_supported = False
        version = api.get("/models/a/b/versions/abc").json()
        assert version["id"] == "abc"
        assert version["cog_version"]
        assert version["openapi_schema"] == {}
        assert_problem(api.get("/models/a/b"), 404)


class TestWebhookFields:
    @pytest.mark.parametrize("url", ["ftp://x.example/hook", "https://user:pw@x.example/hook",
                                     "https://x.example/hook#frag", "http://2130706433/", "not a url"])
    def test_undeliverable_webhook_urls_are_422(self, api: httpx.Client, relay: FakeRelay, url: str) -> None:
        problem = assert_problem(api.post("/models/a/b/predictions", json={"input": {}, "webhook": url}), 422)
        assert problem["invalid_fields"][0]["field"] == "webhook"
        assert relay.creates() == []

    @pytest.mark.parametrize("webhook", [None, "https://hooks.example/ok"])
    @pytest.mark.parametrize("url", ["ftp://x.example/hook", "https://user:pw@x.example/hook",
                                     "https://x.example/hook#frag", "http://2130706433/",
                                     "https://x.example/" + "a" * 2031])
    def test_undeliverable_webhook_completed_urls_are_422(
        self, gateway: Gateway, api: httpx.Client, relay: FakeRelay, url: str, webhook: str | None
    ) -> None:
        body = {"input": {}, "webhook_completed": url, **({"webhook": webhook} if webhook else {})}
        problem = assert_problem(api.post("/models/a/b/predictions", json=body), 422)
        assert [f["field"] for f in problem["invalid_fields"]] == ["webhook_completed"]
        assert relay.creates() == []
        assert rows(gateway.db_url, "prediction") == []

    def test_webhook_fields_are_kept_and_never_sent_upstream(self, api: httpx.Client, relay: FakeRelay) -> None:
        body = {"input": {}, "webhook": "https://hooks.example/x?customId=1", "webhook_events_filter": ["completed"],
                "webhook_completed": "https://hooks.example/y"}
        assert api.post("/models/a/b/predictions", json=body).status_code == 201
        sent = relay.creates()[0].json()
        assert "webhook" not in sent
        assert "webhook_events_filter" not in sent
        assert "webhook_completed" not in sent

    def test_the_subscription_is_echoed_to_its_owner(self, api: httpx.Client, relay: FakeRelay) -> None:
        body = {"input": {}, "webhook": "https://hooks.example/x?customId=1", "webhook_events_filter": ["start", "completed"]}
        created = api.post("/models/a/b/predictions", json=body).json()
        read = api.get(f"/predictions/{created['id']}").json()
        listed = api.get("/predictions").json()["results"][0]
        for shown in (created, read, listed):
            assert shown["webhook"] == "https://hooks.example/x?customId=1"
            assert shown["webhook_events_filter"] == ["start", "completed"]
        plain = api.post("/models/a/b/predictions", json={"input": {}}).json()
        assert "webhook" not in plain
        assert "webhook_events_filter" not in plain

    def test_webhook_completed_alone_is_the_webhook_for_the_completed_event(
        self, gateway: Gateway, api: httpx.Client, relay: FakeRelay
    ) -> None:
        body = {"input": {}, "webhook_completed": "https://hooks.example/done"}
        assert api.post("/models/a/b/predictions", json=body).status_code == 201
        (row,) = rows(gateway.db_url, "prediction")
        assert (row["webhook"], row["webhook_completed"]) == ("https://hooks.example/done", None)
        assert row["webhook_events_filter"] in (["completed"], '["completed"]')


def test_a_client_that_disconnects_mid_body_leaves_nothing_and_logs_no_error(
    gateway: Gateway, token: str, relay: FakeRelay, log_lines: list[str]
) -> None:
    import socket

    with socket.create_connection(("127.0.0.1", gateway.server.port)) as sock:
        sock.sendall(b"POST /v1/models/a/b/predictions HTTP/1.1\r\nHost: x\r\n"
                     b"Authorization: Bearer " + token.encode() + b"\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 5000\r\n\r\n{\"input\": {")
        time.sleep(0.3)
    time.sleep(0.5)
    assert relay.creates() == []
    assert rows(gateway.db_url, "prediction") == []
    assert not [line for line in log_lines if '"level":"error"' in line]


def test_a_nul_in_the_upstreams_logs_is_recorded_and_the_prediction_settles(
    api: httpx.Client, gateway: Gateway, relay: FakeRelay
) -> None:
    # PostgreSQL's text holds no NUL, and a model may print anything: one in the logs made every
    # recording of the prediction fail, so it never finished or settled there.
    created = create(api, "budget/model", log="binary \x00 junk\n", prompt="nul \x00 in the input")
    assert created.status_code == 201, created.text
    final = wait_terminal(api, created.json()["id"])
    assert final["status"] == "succeeded"
    assert "binary \ufffd junk" in final["logs"]
    assert final["input"]["prompt"] == "nul \x00 in the input"  # JSON keeps it, escaped
    (row,) = rows(gateway.db_url, "prediction")
    assert row["cost_micros"] == 10_000
