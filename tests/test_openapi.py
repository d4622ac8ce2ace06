"""The served OpenAPI document describes the answers the gateway really gives."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from app.main import create_app
from tests.conftest import Gateway, make_settings
from tests.helpers import assert_problem

ADMIN_SECRET = "admin-canary-40c7e2a9b1"


def test_validation_errors_are_documented_as_problems(tmp_path: Path) -> None:
    settings = make_settings(f"sqlite:///{tmp_path / 'unused.db'}", "http://127.0.0.1:9", None,
                             admin_token=ADMIN_SECRET)
    document = create_app(settings).openapi()
    answers = [operation["responses"]["422"] for operations in document["paths"].values()
               for operation in operations.values() if "422" in operation["responses"]]
    assert answers
    for answer in answers:
        assert answer["content"] == {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
    problem = document["components"]["schemas"]["Problem"]
    assert set(problem["required"]) == {"title", "detail", "status"}
    assert "HTTPValidationError" not in document["components"]["schemas"]


def test_a_validation_error_is_the_problem_the_document_describes(gateway_factory: Any) -> None:
    gateway: Gateway = gateway_factory(admin_token=ADMIN_SECRET)
    problem = httpx.get(gateway.url + "/openapi.json").json()["components"]["schemas"]["Problem"]
    answer = httpx.post(gateway.url + "/admin/v1/tokens", json={"name": 1},
                        headers={"Authorization": f"Bearer {ADMIN_SECRET}"})
    body = assert_problem(answer, 422)
    assert set(problem["required"]) <= body.keys() <= problem["properties"].keys()
    field_schema = problem["properties"]["invalid_fields"]["items"]
    for invalid in body["invalid_fields"]:
        assert set(field_schema["required"]) == invalid.keys()
