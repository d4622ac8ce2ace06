"""Bare version ids run as the model an upstream showed them to be: model limits hold for them,
and the official clients' `run("owner/name:id")` works for a token limited to some models."""

from __future__ import annotations

import httpx
import pytest
import replicate

from tests.conftest import Gateway
from tests.dbtools import create_token, execute, rows
from tests.fakes.relay import FakeRelay
from tests.helpers import assert_problem, wait_terminal

FLUX = "black-forest-labs/flux-schnell"
SDXL = "stability-ai/sdxl"
FLUX_VERSION = "f" * 64
SDXL_VERSION = "5" * 64


@pytest.fixture
def relay_versions(relay: FakeRelay) -> FakeRelay:
    relay.versions.update({FLUX_VERSION: FLUX, SDXL_VERSION: SDXL})
    return relay


def _bare(api: httpx.Client, version: str) -> httpx.Response:
    return api.post("/predictions", json={"version": version, "input": {"prompt": "p"}})


def _limited(gateway: Gateway) -> httpx.Client:
    return gateway.client(create_token(gateway.db_url, "flux-only", model_globs=["black-forest-labs/*"]))


def test_a_version_run_once_is_known_by_its_model_to_limited_tokens(
    gateway: Gateway, api: httpx.Client, relay_versions: FakeRelay,
) -> None:
    with _limited(gateway) as limited:
        # Never seen: the gateway cannot tell its model, so a limited token may not run it.
        assert_problem(_bare(limited, FLUX_VERSION), 403)
        assert relay_versions.creates() == []
        for version in (FLUX_VERSION, SDXL_VERSION):
            assert _bare(api, version).status_code == 201  # an unlimited token runs both
        assert {(r["version"], r["model"]) for r in rows(gateway.db_url, "model_version")} == {
            (FLUX_VERSION, FLUX), (SDXL_VERSION, SDXL)}

        allowed = _bare(limited, FLUX_VERSION)
        assert allowed.status_code == 201, allowed.text
        assert allowed.json()["model"] == FLUX
        assert wait_terminal(limited, allowed.json()["id"])["status"] == "succeeded"
        # Known, and of a model the token may not run.
        assert_problem(_bare(limited, SDXL_VERSION), 403)
    assert len(relay_versions.creates()) == 3


def test_naming_an_allowed_model_does_not_run_another_models_version(
    gateway: Gateway, api: httpx.Client, relay_versions: FakeRelay,
) -> None:
    assert _bare(api, SDXL_VERSION).status_code == 201
    with _limited(gateway) as limited:
        problem = assert_problem(
            limited.post("/predictions", json={"version": f"{FLUX}:{SDXL_VERSION}", "input": {}}), 403)
        assert SDXL in problem["detail"]
        assert limited.post("/predictions", json={"version": f"{FLUX}:{FLUX_VERSION}", "input": {}}).status_code == 201
    assert len(relay_versions.creates()) == 2


def test_a_version_kept_in_the_ledger_is_known_to_every_process(
    gateway: Gateway, relay_versions: FakeRelay,
) -> None:
    # As another gateway process (or this one before a restart) would have left it.
    kept = f"VALUES ('{FLUX_VERSION}', '{FLUX}', '2026-12-01 00:00:00.000000')"
    execute(gateway.db_url, f"INSERT INTO model_version (version, model, learned_at) {kept}")
    with _limited(gateway) as limited:
        created = _bare(limited, FLUX_VERSION)
    assert created.status_code == 201, created.text
    assert created.json()["model"] == FLUX
    assert len(relay_versions.creates()) == 1


def test_versions_a_model_lists_are_known(gateway: Gateway, relay_versions: FakeRelay) -> None:
    with _limited(gateway) as limited:
        listed = limited.get(f"/models/{FLUX}/versions").json()
        assert [v["id"] for v in listed["results"]] == [FLUX_VERSION]
        assert _bare(limited, FLUX_VERSION).status_code == 201
        # A single version's lookup teaches nothing: its id is the caller's own.
        assert limited.get(f"/models/{FLUX}/versions/{SDXL_VERSION}").status_code == 200
        assert_problem(_bare(limited, SDXL_VERSION), 403)


def test_the_python_clients_versioned_run_works_for_a_limited_token(
    gateway: Gateway, api: httpx.Client, relay_versions: FakeRelay,
) -> None:
    assert _bare(api, FLUX_VERSION).status_code == 201
    secret = create_token(gateway.db_url, "flux-only", model_globs=["black-forest-labs/*"])
    client = replicate.Client(api_token=secret, base_url=gateway.replicate_base)
    output = client.run(f"{FLUX}:{FLUX_VERSION}", input={"prompt": "a cat"})
    assert len(list(output)) == 1
    assert relay_versions.creates()[-1].path == "/replicate/v1/predictions"
