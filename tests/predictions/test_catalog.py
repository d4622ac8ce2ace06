"""Model and version objects keep Replicate's fields only, and nothing of the upstream in them."""

from __future__ import annotations

import httpx
import pytest

from app.errors import UpstreamInvalid
from app.predictions import catalog
from app.upstream.client import UpstreamClient

BASE = "https://relay.example/replicate"
PUBLIC = "https://gw.example/replicate"
VERSION = {"id": "v1", "created_at": "2025-01-15T10:00:00Z", "cog_version": "0.9.4",
           "openapi_schema": {"info": {"description": f"see {BASE}/v1/files/x"}}}


def clean() -> catalog.Clean:
    client = UpstreamClient(
        name="comet", base_url=BASE, token="sk-canary-123456789", connect_timeout=1, request_timeout=1,
        create_timeout=1, max_body_bytes=1000, transport=httpx.MockTransport(lambda _: httpx.Response(500)),
        brand_names=["CometAPI"],
    )
    return catalog.cleaner(client, PUBLIC)


def test_a_model_keeps_replicates_fields_and_a_clean_latest_version() -> None:
    model = catalog.model_object({
        "url": "https://replicate.com/a/b", "owner": "a", "name": "b", "description": "b, by CometAPI",
        "visibility": "public", "run_count": 3, "cover_image_url": "https://relay.example/c.png",
        "latest_version": {**VERSION, "message": "CometAPI"}, "default_example": {"id": "theirs"},
        "message": "CometAPI - Replicate",
    }, clean())
    assert model == {
        "url": "https://replicate.com/a/b", "owner": "a", "name": "b", "description": "b, by [upstream]",
        "visibility": "public", "run_count": 3, "cover_image_url": "[upstream]/c.png",
        "latest_version": {**VERSION, "openapi_schema": {"info": {"description": f"see {PUBLIC}/v1/files/x"}}},
        "default_example": None,
    }


def test_a_page_keeps_its_links_and_version_fields_only() -> None:
    page = catalog.versions_page({"results": [{**VERSION, "relay": "x"}, "junk"], "message": "hi", "next": BASE},
                                 clean(), next_link=f"{PUBLIC}/next", previous_link=None)
    assert page == {"next": f"{PUBLIC}/next", "previous": None, "results": [
        {**VERSION, "openapi_schema": {"info": {"description": f"see {PUBLIC}/v1/files/x"}}}]}


@pytest.mark.parametrize("data", [None, [], "model"])
def test_anything_but_an_object_is_an_invalid_answer(data: object) -> None:
    with pytest.raises(UpstreamInvalid):
        catalog.model_object(data, clean())
    with pytest.raises(UpstreamInvalid):
        catalog.versions_page(data, clean(), next_link=None, previous_link=None)
    assert catalog.version_object(data, clean()) is None
