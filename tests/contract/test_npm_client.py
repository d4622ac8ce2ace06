"""The official npm client (replicate 1.4.0), unmodified, against the gateway: create with and without
wait, poll, cancel, list and paginate, files, file inputs and webhook validation (guarantees P16)."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Gateway
from tests.dbtools import create_token, rows
from tests.fakes.receiver import Receiver
from tests.fakes.relay import FakeRelay
from tests.helpers import create, node, wait_terminal

pytestmark = pytest.mark.contract
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==")


def test_create_poll_get_and_wait(npm_client: Path, gateway: Gateway, token: str) -> None:
    seen = node("contract.mjs", gateway, token, "create")
    created = seen["created"]
    assert created["status"] == "starting"
    assert created["get"] == f"{gateway.replicate_base}/v1/predictions/{created['id']}"
    assert seen["waited"]["status"] == seen["fetched"]["status"] == "succeeded"
    assert seen["fetched"]["output"] == seen["waited"]["output"]
    assert seen["waited"]["output"][0].startswith("https://replicate.delivery/")
    # Prefer: wait=10 answered with the finished prediction.
    assert seen["synced"]["status"] == "succeeded"
    assert len(seen["synced"]["output"]) == 1
    assert seen["missing"] == 404


def test_cancel(npm_client: Path, gateway: Gateway, token: str, relay: FakeRelay) -> None:
    relay.starting_seconds = 30
    seen = node("contract.mjs", gateway, token, "cancel")
    assert seen == {"canceled": "canceled", "fetched": "canceled"}
    assert sum(1 for call in relay.calls if call.path.endswith("/cancel")) == 1


def test_list_pages_through_more_than_a_hundred(npm_client: Path, gateway: Gateway, api: httpx.Client) -> None:
    created = {create(api, n=i).json()["id"] for i in range(105)}
    token = api.headers["authorization"].removeprefix("Bearer ")
    seen = node("contract.mjs", gateway, token, "paginate")
    # An absolute next URL: npm requests it verbatim (a relative one would become /v1/v1/...).
    assert seen["next"].startswith(f"{gateway.replicate_base}/v1/predictions?cursor=")
    assert [len(page) for page in seen["pages"]] == [100, 5]
    ids = [prediction_id for page in seen["pages"] for prediction_id in page]
    assert len(ids) == len(set(ids)) == 105
    assert set(ids) == created


def test_model_versions_page_through_the_gateway(npm_client: Path, gateway: Gateway, token: str,
                                                relay: FakeRelay) -> None:
    seen = node("contract.mjs", gateway, token, "versions")
    assert len(seen["pages"]) == 2
    assert seen["pages"][1] == ["0" * 64]
    assert [call.query for call in relay.calls if call.path.endswith("/versions")] == ["", "cursor=page-2"]


def test_files_page_through_more_than_a_hundred(npm_client: Path, gateway: Gateway, api: httpx.Client) -> None:
    uploaded = {api.post("/files", files={"content": (f"f{n}.txt", b"x" * (n + 1), "text/plain")}).json()["id"]
                for n in range(101)}
    token = api.headers["authorization"].removeprefix("Bearer ")
    seen = node("contract.mjs", gateway, token, "filesPaginate")
    assert [len(page) for page in seen["pages"]] == [100, 1]
    assert {file_id for page in seen["pages"] for file_id in page} == uploaded


def test_files_create_get_list_delete(npm_client: Path, gateway: Gateway, token: str) -> None:
    seen = node("contract.mjs", gateway, token, "files")
    created = seen["created"]
    assert created["size"] == len(b"hello from node")
    assert created["metadata"] == {"who": "node"}
    assert created["get"] == f"{gateway.replicate_base}/v1/files/{created['id']}"
    assert seen["fetched"] == {"id": created["id"], "etag": True}
    assert seen["listed"] == [created["id"]]
    assert seen["afterDelete"] == 404


def test_a_buffer_input_is_uploaded_and_reaches_the_upstream_as_its_bytes(
    npm_client: Path, gateway: Gateway, token: str, relay: FakeRelay
) -> None:
    seen = node("contract.mjs", gateway, token, "fileInput", base64.b64encode(PNG).decode())
    assert len(seen["output"]) == 1
    (uploaded,) = seen["files"]
    [call] = relay.creates()
    image = call.json()["input"]["image"]
    # The client sent the file's API URL; with no public URL set, the upstream gets the bytes inline.
    assert image.startswith("data:application/octet-stream;base64,")
    assert base64.b64decode(image.partition(",")[2]) == PNG
    assert uploaded["get"] not in call.body.decode()
    assert gateway.url not in call.body.decode()


def test_a_delivered_webhook_validates_with_the_team_secret(
    npm_client: Path, gateway_factory: Any, tmp_path: Path
) -> None:
    gateway: Gateway = gateway_factory(allow_private_webhooks=True, allow_http_webhooks=True, webhook_interval=0.1, reconcile_interval=0.2)
    token = create_token(gateway.db_url, "hooks")
    receiver = Receiver().start()
    try:
        with gateway.client(token) as api:
            created = api.post("/models/black-forest-labs/flux-schnell/predictions", json={
                "input": {"prompt": "p"}, "webhook": receiver.url(), "webhook_events_filter": ["completed"]})
            assert created.status_code == 201, created.text
            wait_terminal(api, created.json()["id"])
        (request,) = receiver.wait_for(1)
    finally:
        receiver.stop()
    delivery = tmp_path / "delivery.json"
    delivery.write_text(json.dumps({"headers": request.headers, "body": request.body.decode()}))
    assert node("contract.mjs", gateway, token, "webhook", str(delivery)) == {"valid": True, "tampered": False}
    assert any(row["status"] == "delivered" for row in rows(gateway.db_url, "webhook_delivery"))
