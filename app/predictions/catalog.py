"""Model and version objects cut to Replicate's documented fields, with nothing of the upstream's left in them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from app.errors import UpstreamInvalid
from app.upstream.client import UpstreamClient

Clean = Callable[[Any], Any]

# Replicate's OpenAPI `schemas_model_response` and `schemas_version_response`: relays add their
# own keys (a top-level "message" naming the relay, wire spec §16), which never reach clients.
MODEL_FIELDS = ("url", "owner", "name", "description", "visibility", "github_url", "paper_url",
                "license_url", "run_count", "cover_image_url")
VERSION_FIELDS = ("id", "created_at", "cog_version", "openapi_schema")


def cleaner(client: UpstreamClient, public: str) -> Clean:
    """A deep copy of a value with the upstream's base URL made ours and its host, key and brand
    names hidden in every string (an `openapi_schema` is kept as it is otherwise)."""
    base = client.base_url

    def clean(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list):
            return [clean(v) for v in value]
        if isinstance(value, str):
            return client.hide(value.replace(base, public) if base in value else value)
        return value

    return clean


def version_object(data: Any, clean: Clean) -> dict[str, Any] | None:
    """A version with Replicate's fields only; None for anything that is not an object."""
    if not isinstance(data, dict):
        return None
    return {k: clean(data[k]) for k in VERSION_FIELDS if k in data}


def model_object(data: Any, clean: Clean) -> dict[str, Any]:
    """A model with Replicate's fields only."""
    if not isinstance(data, dict):
        raise UpstreamInvalid()
    body = {k: clean(data[k]) for k in MODEL_FIELDS if k in data}
    if "latest_version" in data:
        body["latest_version"] = version_object(data["latest_version"], clean)
    if "default_example" in data:
        # A prediction of the upstream's own account (its id, its api.replicate.com URLs), not
        # one of ours: no gateway URL could fetch it, so it is not shown.
        body["default_example"] = None
    return body


def versions_page(data: Any, clean: Clean, *, next_link: str | None, previous_link: str | None) -> dict[str, Any]:
    """A page of versions, its links already made the gateway's."""
    if not isinstance(data, dict):
        raise UpstreamInvalid()
    found = data.get("results")
    results = [version_object(v, clean) for v in found if isinstance(v, dict)] if isinstance(found, list) else []
    return {"next": next_link, "previous": previous_link, "results": results}
