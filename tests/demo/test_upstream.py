"""Tests for the simulated demo relay."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import httpx
import pytest

from app.demo.upstream import create_demo_upstream, version_id

BASE = "http://127.0.0.1:8000/demo"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


@pytest.fixture
async def client() -> Any:
    app = create_demo_upstream(output_base_url=BASE, speed=20)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://demo-upstream") as http:
        yield http


async def poll(client: httpx.AsyncClient, prediction_id: str) -> dict[str, Any]:
    seen = []
    for _ in range(200):
        body = (await client.get(f"/replicate/v1/predictions/{prediction_id}")).json()
        seen.append(body["status"])
        if body["status"] in {"succeeded", "failed", "canceled"}:
            body["seen"] = seen
            return body
        await asyncio.sleep(0.01)
    raise AssertionError("prediction never settled")


async def test_image_lifecycle_reaches_succeeded_with_png_urls(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/replicate/v1/models/acme/painter/predictions",
        json={"input": {"prompt": "a cat", "num_outputs": 2}},
        headers={"Authorization": "Bearer ignored"},
    )
    assert response.status_code == 201
    created = response.json()
    assert re.fullmatch(r"[a-z2-7]{26}", created["id"])
    assert created["status"] == "starting"
    assert created["version"] == version_id("acme/painter")
    assert created["urls"]["get"] == f"https://api.replicate.com/v1/predictions/{created['id']}"
    assert created["urls"]["stream"].startswith("https://stream.replicate.com/v1/streams/")
    done = await poll(client, created["id"])
    assert "processing" in done["seen"]
    assert done["status"] == "succeeded"
    assert done["output"] == [f"{BASE}/outputs/{created['id']}/{i}.png" for i in range(2)]
    assert done["metrics"]["image_count"] == 2
    assert "100%|██████████| 10/10" in done["logs"]
    for key in ("created_at", "started_at", "completed_at"):
        assert TIMESTAMP.match(done[key])


async def test_png_route_serves_an_image(client: httpx.AsyncClient) -> None:
    first = await client.get("/outputs/abc234/0.png")
    second = await client.get("/outputs/abc234/1.png")
    assert first.status_code == 200
    assert first.headers["content-type"] == "image/png"
    assert first.content.startswith(PNG_SIGNATURE)
    assert first.content != second.content
    assert (await client.get("/outputs/abc234/9.png")).status_code == 404


async def test_text_model_output_is_a_word_list(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/replicate/v1/models/demo/echo/predictions", json={"input": {"prompt": "hello big world"}}
    )
    done = await poll(client, response.json()["id"])
    assert done["output"] == ["hello ", "big ", "world"]
    assert done["metrics"]["output_token_count"] == 3
    assert set(done["metrics"]) == {
        "predict_time", "total_time", "input_token_count", "output_token_count", "tokens_per_second",
    }


async def test_prefer_wait_returns_a_terminal_prediction(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/replicate/v1/predictions",
        json={"version": version_id("demo/echo"), "input": {"prompt": "hi"}},
        headers={"Prefer": "wait=5"},
    )
    assert response.status_code == 201
    body = response.json()
    assert body["status"] == "succeeded"
    assert body["model"] == "demo/echo"
    assert body["output"] == ["hi"]


async def test_fail_input_ends_failed(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/replicate/v1/deployments/acme/prod/predictions",
        json={"input": {"prompt": "x", "fail": True}},
        headers={"Prefer": "wait"},
    )
    body = response.json()
    assert body["status"] == "failed"
    assert body["error"]
    assert body["deployment"] == "acme/prod"


async def test_cancel_stops_a_running_prediction(client: httpx.AsyncClient) -> None:
    created = (
        await client.post("/replicate/v1/models/acme/painter/predictions", json={"input": {}})
    ).json()
    canceled = (await client.post(f"/replicate/v1/predictions/{created['id']}/cancel")).json()
    assert canceled["status"] == "canceled"
    assert canceled["completed_at"] is not None
    await asyncio.sleep(0.1)
    again = (await client.get(f"/replicate/v1/predictions/{created['id']}")).json()
    assert again["status"] == "canceled"
    assert again["output"] is None


async def test_model_and_versions_routes(client: httpx.AsyncClient) -> None:
    model = (await client.get("/replicate/v1/models/demo/echo")).json()
    assert model["visibility"] == "public"
    assert model["cover_image_url"] is None
    listing = (await client.get("/replicate/v1/models/demo/echo/versions")).json()
    assert listing["next"] is None
    [version] = listing["results"]
    assert version == model["latest_version"]
    assert version["cog_version"] is not None
    assert version["openapi_schema"] is not None
    output = version["openapi_schema"]["components"]["schemas"]["Output"]
    assert output["x-cog-array-type"] == "iterator"
    single = await client.get(f"/replicate/v1/models/demo/echo/versions/{version['id']}")
    assert single.json() == version


@pytest.mark.parametrize(
    "path",
    ["/replicate/v1/predictions/nope", "/replicate/v1/models/demo/echo/versions/deadbeef"],
)
async def test_unknown_id_is_problem_json(client: httpx.AsyncClient, path: str) -> None:
    response = await client.get(path)
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["title"] == "Not found"
    assert response.json()["status"] == 404
