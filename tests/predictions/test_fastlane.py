"""The fast lane: which requests it serves itself, and that its answers are the framework's."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from app.foreground import Foreground
from app.observability import Metrics, RequestIds
from app.predictions.fastlane import FastLane
from tests.conftest import Gateway
from tests.helpers import assert_problem, create, wait_terminal

SERVED = [
    ("GET", "/v1/predictions/abc123"),
    ("GET", "/replicate/v1/predictions/abc123"),
    ("POST", "/v1/predictions"),
    ("POST", "/replicate/v1/models/owner/name/predictions"),
]
PASSED_ON = [
    ("HEAD", "/v1/predictions/abc123"),
    ("GET", "/v1/predictions"),
    ("GET", "/v1/predictions/"),
    ("GET", "/v1/predictions/abc/cancel"),
    ("POST", "/v1/predictions/abc/cancel"),
    ("POST", "/v1/deployments/owner/name/predictions"),
    ("GET", "/v1/models/owner/name/predictions"),
    ("GET", "/other/v1/predictions/abc"),
    ("GET", "/admin/v1/predictions/abc"),
]


def _drive(method: str, path: str) -> tuple[list[str], list[dict[str, Any]]]:
    """Run one request through a FastLane in front of a recorder; what passed on, what was sent."""
    passed: list[str] = []
    sent: list[dict[str, Any]] = []

    async def recorder(scope: Any, receive: Any, send: Any) -> None:
        passed.append(scope["path"])

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    # An app with no gateway state: a served request fails inside the route, as a bug would.
    scope = {"type": "http", "method": method, "path": path, "headers": [], "query_string": b"",
             "scheme": "http", "server": ("127.0.0.1", 80), "app": object()}
    lane = FastLane(recorder, metrics=Metrics(), foreground=Foreground(), request_ids=RequestIds(), max_body_bytes=1024)
    asyncio.run(lane(scope, receive, send))
    return passed, sent


@pytest.mark.parametrize(("method", "path"), PASSED_ON)
def test_every_other_request_goes_to_the_framework(method: str, path: str) -> None:
    passed, sent = _drive(method, path)
    assert passed == [path]
    assert sent == []


@pytest.mark.parametrize(("method", "path"), SERVED)
def test_an_unexpected_error_in_a_served_route_is_a_problem_500(method: str, path: str) -> None:
    passed, sent = _drive(method, path)
    assert passed == []
    start, body = sent
    assert start["status"] == 500
    assert (b"content-type", b"application/problem+json") in start["headers"]
    assert b'"An unexpected error occurred"' in body["body"]


def test_served_routes_answer_as_the_framework_would(gateway: Gateway, api: httpx.Client, token: str) -> None:
    with httpx.Client(base_url=gateway.url, timeout=30) as anonymous:
        for path in ("/v1/predictions/abc", "/replicate/v1/predictions/abc"):
            unauthenticated = anonymous.get(path)
            assert_problem(unauthenticated, 401)
            assert len(unauthenticated.headers["x-request-id"]) == 32
        assert_problem(anonymous.post("/v1/predictions", json={"version": "a" * 64, "input": {}}), 401)
    assert_problem(api.get("/predictions/NOT-AN-ID"), 404)
    assert_problem(api.get("/predictions/" + "z" * 26), 404)
    assert_problem(api.post("/predictions", content=b"{", headers={"Content-Type": "application/json"}), 400)
    missing = assert_problem(api.post("/predictions", json={"input": {}}), 422)
    assert missing["invalid_fields"][0]["field"] == "version"
    assert_problem(api.post("/models/owner/name/predictions", files={"input": b"x"}), 415)
    too_big = b'{"input": {"prompt": "' + b"x" * (gateway.settings.max_body_bytes + 1) + b'"}}'
    assert_problem(api.post("/models/owner/name/predictions", content=too_big,
                            headers={"Content-Type": "application/json"}), 413)
    created = create(api)
    assert created.status_code == 201
    prediction_id = created.json()["id"]
    assert created.json()["urls"]["get"] == f"{gateway.replicate_base}/v1/predictions/{prediction_id}"
    assert wait_terminal(api, prediction_id)["status"] == "succeeded"
    with httpx.Client(base_url=gateway.url, headers={"Authorization": f"Bearer {token}"}) as unprefixed:
        plain = unprefixed.get(f"/v1/predictions/{prediction_id}").json()
    assert plain["urls"]["get"] == f"{gateway.url}/v1/predictions/{prediction_id}"
    assert plain["status"] == "succeeded"


@pytest.mark.parametrize("final", [False, True])
def test_each_host_gets_urls_of_its_own(gateway: Gateway, api: httpx.Client, final: bool) -> None:
    # A final prediction's answer is kept once rendered: never for another host or prefix.
    prediction_id = create(api).json()["id"]
    if final:
        wait_terminal(api, prediction_id)
    hosts = ("gw.example", "other.example:8443", "gw.example", "a.example", "b.example", "c.example", "gw.example")
    for host in hosts:
        for prefix in ("/replicate", ""):
            answer = api.get(f"{gateway.url}{prefix}/v1/predictions/{prediction_id}", headers={"Host": host})
            assert answer.json()["urls"]["get"] == f"http://{host}{prefix}/v1/predictions/{prediction_id}"
            assert answer.json()["urls"]["web"] == f"http://{host}/dashboard/predictions/{prediction_id}"
            if final:
                assert answer.json()["status"] == "succeeded"
