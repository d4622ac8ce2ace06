"""A token group limits models and upstreams: refused creates leave nothing, failover stays inside."""

from __future__ import annotations

from typing import Any

import httpx

from app.config import UpstreamConfig
from tests.conftest import Gateway
from tests.dbtools import rows
from tests.fakes.relay import FakeRelay
from tests.groups.support import ADMIN, add_group, add_token, admin_client
from tests.helpers import assert_problem, create, wait_terminal

VERSION = "a" * 64


def test_a_groups_models_limit_its_tokens_before_anything_is_recorded_or_sent(
    admin_gateway: Gateway, admin: httpx.Client, relay: FakeRelay
) -> None:
    add_group(admin, "flux", models=["black-forest-labs/*"])
    member = add_token(admin, "member", group="flux")
    with admin_gateway.client(member) as api:
        refused = assert_problem(create(api, "stability-ai/sdxl"), 403)
        assert refused["detail"] == "This token's group flux may not run stability-ai/sdxl"
        assert_problem(api.post("/predictions", json={"version": f"stability-ai/sdxl:{VERSION}", "input": {}}), 403)
        bare = assert_problem(api.post("/predictions", json={"version": VERSION, "input": {}}), 403)
        assert "group flux" in bare["detail"]
        assert api.get("/account").json()["reserved_usd"] == "0.000000"
        assert relay.calls == []
        assert rows(admin_gateway.db_url, "prediction") == []
        assert rows(admin_gateway.db_url, "ledger_entry") == []

        allowed = create(api, "black-forest-labs/flux-schnell")
        assert allowed.status_code == 201, allowed.text
        wait_terminal(api, allowed.json()["id"])
    assert len(relay.creates()) == 1


def test_a_group_changed_through_the_admin_api_applies_to_the_next_create_at_once(
    admin_gateway: Gateway, admin: httpx.Client, relay: FakeRelay
) -> None:
    add_group(admin, "open")
    member = add_token(admin, "member", group="open")
    with admin_gateway.client(member) as api:
        first = create(api, "stability-ai/sdxl")  # the token is now in the authentication cache
        assert first.status_code == 201, first.text
        assert admin.patch("/groups/open", json={"models": ["black-forest-labs/*"]}).status_code == 200
        assert_problem(create(api, "stability-ai/sdxl"), 403)
        wait_terminal(api, first.json()["id"])
    assert len(relay.creates()) == 1


def test_a_token_runs_only_what_both_its_own_and_its_groups_globs_allow(
    admin_gateway: Gateway, admin: httpx.Client, relay: FakeRelay
) -> None:
    add_group(admin, "flux", models=["black-forest-labs/*"])
    narrow = add_token(admin, "narrow", group="flux", models=["stability-ai/*", "black-forest-labs/flux-dev"])
    with admin_gateway.client(narrow) as api:
        by_group = assert_problem(create(api, "stability-ai/sdxl"), 403)
        by_token = assert_problem(create(api, "black-forest-labs/flux-schnell"), 403)
        assert "group" in by_group["detail"]
        assert by_token["detail"] == "This token may not run black-forest-labs/flux-schnell"
        allowed = create(api, "black-forest-labs/flux-dev")
        assert allowed.status_code == 201, allowed.text
        wait_terminal(api, allowed.json()["id"])
    assert [call.path for call in relay.creates()] == ["/replicate/v1/models/black-forest-labs/flux-dev/predictions"]


def _routed(gateway_factory: Any, *configs: UpstreamConfig) -> tuple[Gateway, httpx.Client]:
    gateway: Gateway = gateway_factory(upstreams=list(configs), admin_token=ADMIN)
    return gateway, admin_client(gateway)


def test_a_groups_creates_go_only_to_its_upstreams_even_past_a_higher_priority(
    gateway_factory: Any, relay: FakeRelay, second: FakeRelay
) -> None:
    gateway, admin = _routed(
        gateway_factory,
        UpstreamConfig(name="primary", url=relay.upstream_url, token=relay.key, priority=10),
        UpstreamConfig(name="secondary", url=second.upstream_url, token=second.key, priority=1),
    )
    with admin:
        add_group(admin, "cheap", upstreams=["secondary"])
        member = add_token(admin, "member", group="cheap")
        outsider = add_token(admin, "outsider")
    with gateway.client(member) as api:
        ids = [create(api, i=i).json()["id"] for i in range(3)]
        for prediction_id in ids:
            assert wait_terminal(api, prediction_id)["status"] == "succeeded"
        assert api.get("/models/black-forest-labs/flux-schnell").status_code == 200
        assert api.get("/models/black-forest-labs/flux-schnell/versions").status_code == 200
    assert relay.calls == [], "nothing of the group's reaches an upstream outside it, reads included"
    assert len(second.creates()) == 3
    with gateway.client(outsider) as api:
        wait_terminal(api, create(api).json()["id"])
    assert len(relay.creates()) == 1
    owners = {row["id"]: row["upstream"] for row in rows(gateway.db_url, "prediction")}
    assert [owners[i] for i in ids] == ["secondary"] * 3


def test_failover_never_leaves_the_groups_upstreams(
    gateway_factory: Any, relay: FakeRelay, second: FakeRelay, third: FakeRelay
) -> None:
    gateway, admin = _routed(
        gateway_factory,
        UpstreamConfig(name="primary", url=relay.upstream_url, token=relay.key, priority=10),
        UpstreamConfig(name="secondary", url=second.upstream_url, token=second.key, priority=5),
        UpstreamConfig(name="tertiary", url=third.upstream_url, token=third.key, priority=1),
    )
    with admin:
        add_group(admin, "pair", upstreams=["secondary", "tertiary"])
        add_group(admin, "single", upstreams=["secondary"])
        pair = add_token(admin, "pair-member", group="pair")
        single = add_token(admin, "single-member", group="single")
    with gateway.client(pair) as api:
        second.fail_next("throttle", retry_after=30)
        moved = create(api)
        assert moved.status_code == 201, moved.text
        wait_terminal(api, moved.json()["id"])
    assert len(third.creates()) == 1, "the throttled create failed over to the group's other upstream"
    with gateway.client(single) as api:
        second.fail_next("throttle", retry_after=30)
        refused = create(api)
        assert_problem(refused, 429)
    assert relay.calls == []
    assert len(third.creates()) == 1, "with no other upstream in the group, there is no failover"
    row = next(r for r in rows(gateway.db_url, "prediction") if r["id"] != moved.json()["id"])
    assert (row["upstream"], row["submission"], row["cost_micros"]) == ("secondary", "rejected", 0)


def test_a_group_whose_upstreams_do_not_serve_the_model_is_refused(
    gateway_factory: Any, relay: FakeRelay, second: FakeRelay
) -> None:
    gateway, admin = _routed(
        gateway_factory,
        UpstreamConfig(name="flux", url=relay.upstream_url, token=relay.key, models=["black-forest-labs/*"]),
        UpstreamConfig(name="meta", url=second.upstream_url, token=second.key, models=["meta/*"]),
    )
    with admin:
        add_group(admin, "meta-only", upstreams=["meta"])
        member = add_token(admin, "member", group="meta-only")
    with gateway.client(member) as api:
        refused = assert_problem(create(api, "black-forest-labs/flux-schnell"), 403)
        assert refused["detail"] == (
            "This token's group may not use any upstream serving black-forest-labs/flux-schnell"
        )
        assert_problem(create(api, "stability-ai/sdxl"), 404)  # served by no upstream at all
        assert rows(gateway.db_url, "prediction") == []
        assert rows(gateway.db_url, "ledger_entry") == []
        served = create(api, "meta/llama")
        assert served.status_code == 201, served.text
        wait_terminal(api, served.json()["id"])
    assert relay.calls == []
    assert len(second.creates()) == 1
