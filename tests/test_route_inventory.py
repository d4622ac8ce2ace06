"""The route inventory names every served route, and each route's class holds over HTTP."""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.routing import iter_route_contexts

from app.admin.router import AdminRoute
from app.deps import require_caller
from app.main import create_app
from app.predictions import fastlane
from app.routes import API_ROUTES, Access, inventory
from tests.conftest import Gateway, make_settings
from tests.dashboard.support import browser, csrf_of, sign_in
from tests.dbtools import create_token, token_row
from tests.fakes.relay import FakeRelay
from tests.helpers import assert_problem, create, wait_terminal

ADMIN_SECRET = "admin-canary-3e8a71d5c2"
WRONG_CAPABILITY = "0" * 40
# A session naming the admin, unexpired, but signed by no one.
FORGED_SESSION = base64.urlsafe_b64encode(b'["admin",9999999999,"x"]').decode().rstrip("=") + ".forged"
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 32


def served_routes(app: FastAPI) -> dict[tuple[str, str], Any]:
    """Each (method, path template) the framework routes, with its route; a mount or a
    websocket has no methods and appears under its class's name, so it is never classified
    by accident."""
    served: dict[tuple[str, str], Any] = {}
    for route in iter_route_contexts(app.routes):
        path = route.path_format or route.path
        for method in route.methods or {type(route.original_route).__name__}:
            served[(method, path)] = route
    return served


@pytest.fixture
def app(tmp_path: Path) -> FastAPI:
    settings = make_settings(f"sqlite:///{tmp_path / 'unused.db'}", "http://127.0.0.1:9", None,
                             admin_token=ADMIN_SECRET)
    return create_app(settings)


def test_the_inventory_names_every_served_route_and_nothing_more(app: FastAPI) -> None:
    served = set(served_routes(app))
    unclassified = served - inventory().keys()
    gone = inventory().keys() - served
    assert not unclassified, f"served but not in app/routes.py: {sorted(unclassified)}"
    assert not gone, f"in app/routes.py but not served: {sorted(gone)}"


def test_the_fast_lane_serves_only_authenticated_routes() -> None:
    # It answers ahead of the framework's routing, so its routes are not in app.routes.
    for method, routes in fastlane._ROUTES.items():
        for _, _, label in routes:
            assert API_ROUTES.get((method, label.path_format)) is Access.AUTHENTICATED, label


def test_each_router_decides_access_in_one_place(app: FastAPI) -> None:
    # The router's dependency or route class, not each endpoint's own parameters, must decide.
    for (method, path), route in served_routes(app).items():
        guards = {depends.dependency for depends in getattr(route, "dependencies", [])}
        access = inventory()[(method, path)]
        assert (require_caller in guards) == (access is Access.AUTHENTICATED), (method, path)
        assert isinstance(route.original_route, AdminRoute) == (access is Access.ADMIN), (method, path)


# ---- each class, over every route of it -----------------------------------------------------

@dataclass
class Estate:
    """A gateway with one team's token, finished prediction, file and dashboard session."""

    gateway: Gateway
    relay: FakeRelay
    token: str
    prediction: dict[str, Any]
    values: dict[str, str]
    team_session: httpx.Client
    admin_session: httpx.Client

    def url(self, template: str) -> str:
        """The template with plausible values for its parameters: this team's own objects."""
        return template.format(**self.values)

    def routes(self, access: Access) -> list[tuple[str, str]]:
        """The inventoried routes of one class."""
        found = [route for route, kind in inventory().items() if kind is access]
        assert found, access
        return found


@pytest.fixture
def estate(gateway_factory: Any, relay: FakeRelay) -> Iterator[Estate]:
    gateway: Gateway = gateway_factory(admin_token=ADMIN_SECRET)
    token = create_token(gateway.db_url, "team-a")
    with gateway.client(token) as api:
        prediction = wait_terminal(api, create(api).json()["id"])
        uploaded = api.post("/files", files={"content": ("a.png", PNG, "image/png")})
        assert uploaded.status_code == 201, uploaded.text
    as_admin = {"Authorization": f"Bearer {ADMIN_SECRET}"}
    group = httpx.post(gateway.url + "/admin/v1/groups", json={"name": "team-a"}, headers=as_admin)
    assert group.status_code == 201, group.text
    values = {
        "prediction_id": prediction["id"], "file_id": uploaded.json()["id"],
        "owner": "black-forest-labs", "name": "flux-schnell", "version_id": "a" * 64,
        "ref": f"{prediction['id']}.{WRONG_CAPABILITY}",
        "name_or_id": "team-a",  # the token's name and the group's, so each route finds one
        "token_id": token_row(gateway.db_url, "team-a")["id"],
    }
    with browser(gateway) as team_session, browser(gateway) as admin_session:
        assert sign_in(team_session, token).status_code == 303
        assert sign_in(admin_session, ADMIN_SECRET).status_code == 303
        yield Estate(gateway, relay, token, prediction, values, team_session, admin_session)


def _body(method: str, template: str) -> dict[str, Any]:
    """A body a caller let in would send, so a missing check shows as a success."""
    if method in {"GET", "HEAD", "DELETE"} or template.endswith(("/cancel", "/revoke", "/logout")):
        return {}
    if template.endswith("/files"):
        return {"files": {"content": ("b.png", PNG, "image/png")}}
    if template.startswith("/dashboard"):
        return {"data": {"name": "intruder", "csrf": "x"}}
    if template.startswith("/admin/v1/tokens/"):
        return {"json": {"rpm_limit": 1000}}
    if template.startswith("/admin"):
        return {"json": {"name": "intruder"}}
    if template.endswith("}/predictions"):  # a model's or a deployment's
        return {"json": {"input": {"prompt": "p"}}}
    return {"json": {"version": "a" * 64, "input": {"prompt": "p"}}}


def _send(client: httpx.Client, estate: Estate, method: str, template: str,
          **options: Any) -> httpx.Response:
    return client.request(method, estate.url(template), **{**_body(method, template), **options})


def _elsewhere(secret: str) -> dict[str, dict[str, Any]]:
    """The secret in each place other than `Authorization: Bearer` (or `Token`)."""
    basic = base64.b64encode(f"{secret}:".encode()).decode()
    return {
        "x-api-key": {"headers": {"X-Api-Key": secret}},
        "api-key": {"headers": {"Api-Key": secret}},
        "x-auth-token": {"headers": {"X-Auth-Token": secret}},
        "proxy-authorization": {"headers": {"Proxy-Authorization": f"Bearer {secret}"}},
        "basic": {"headers": {"Authorization": f"Basic {basic}"}},
        "query token": {"params": {"token": secret}},
        "query api_key": {"params": {"api_key": secret}},
        "cookie": {"headers": {"Cookie": f"token={secret}"}},
    }


def _cookie_of(client: httpx.Client) -> dict[str, Any]:
    """A signed-in browser's cookies, sent by hand to a path the browser would not send them to."""
    return {"headers": {"Cookie": "; ".join(f"{k}={v}" for k, v in client.cookies.items())}}


UNREADABLE_BODY = {"content": b"{not json", "headers": {"Content-Type": "application/json"}}


def _collect(failures: list[str], what: str, check: Callable[..., None], *args: Any) -> None:
    """Run one check, keeping its failure with the others so one run names them all."""
    try:
        check(*args)
    except AssertionError as exc:
        failures.append(f"{what}: {str(exc).splitlines()[0]}")


def _status(response: httpx.Response, status: int) -> None:
    assert response.status_code == status, f"{response.status_code} {response.text[:200]}"


def _refused(response: httpx.Response, status: int) -> None:
    _status(response, status)
    assert_problem(response, status)
    if status == 401:
        assert response.headers.get("www-authenticate") == "Bearer", response.headers


def _not_found(response: httpx.Response) -> None:
    if response.request.method == "HEAD":
        _status(response, 404)
    else:
        _refused(response, 404)


def _answered(response: httpx.Response) -> None:
    assert response.status_code not in {401, 403}, f"{response.status_code} {response.text[:200]}"
    assert "/dashboard/login" not in response.headers.get("location", ""), response.headers


def _to_sign_in(response: httpx.Response) -> None:
    if response.url.path.endswith(".csv"):  # a download, not a page
        _refused(response, 401)
    else:
        _status(response, 303)
        assert response.headers["location"].startswith("/dashboard/login"), response.headers


def test_authenticated_routes_refuse_every_other_credential(estate: Estate) -> None:
    calls_before = len(estate.relay.calls)
    attempts = {
        "no credential": {},
        "an unknown token": {"headers": {"Authorization": "Bearer gw_" + "x" * 40}},
        "a scheme alone": {"headers": {"Authorization": "Bearer"}},
        "the admin token": {"headers": {"Authorization": f"Bearer {ADMIN_SECRET}"}},
        "a team's dashboard session": _cookie_of(estate.team_session),
        "an unreadable body": UNREADABLE_BODY,
        **_elsewhere(estate.token),
    }
    failures: list[str] = []
    with httpx.Client(base_url=estate.gateway.url, timeout=30) as raw:
        for method, template in estate.routes(Access.AUTHENTICATED):
            for name, attempt in attempts.items():
                _collect(failures, f"{method} {template} with {name}",
                         _refused, _send(raw, estate, method, template, **attempt), 401)
            doubled = template.replace("/v1/", "/v1/v1/", 1)  # the prefix the Python client doubles
            _collect(failures, f"{method} {doubled}", _refused, _send(raw, estate, method, doubled), 401)
    assert not failures, "\n".join(failures)
    assert len(estate.relay.calls) == calls_before, estate.relay.calls[calls_before:]


def test_authenticated_routes_answer_their_own_team(estate: Estate) -> None:
    failures: list[str] = []
    with httpx.Client(base_url=estate.gateway.url, timeout=30,
                      headers={"Authorization": f"Bearer {estate.token}"}) as api:
        for method, template in estate.routes(Access.AUTHENTICATED):
            if method == "GET":
                _collect(failures, f"{method} {template}",
                         _status, _send(api, estate, method, template), 200)
    assert not failures, "\n".join(failures)


def test_admin_routes_refuse_team_tokens_and_other_channels(estate: Estate) -> None:
    calls_before = len(estate.relay.calls)
    attempts: dict[str, tuple[dict[str, Any], int]] = {
        "no credential": ({}, 401),
        "an unreadable body": (UNREADABLE_BODY, 401),
        "a team token": ({"headers": {"Authorization": f"Bearer {estate.token}"}}, 403),
        "an unknown token": ({"headers": {"Authorization": "Bearer gw_" + "x" * 40}}, 403),
        "the admin's dashboard session": (_cookie_of(estate.admin_session), 401),
        **{name: (attempt, 401) for name, attempt in _elsewhere(ADMIN_SECRET).items()},
    }
    failures: list[str] = []
    with httpx.Client(base_url=estate.gateway.url, timeout=30) as raw:
        for method, template in estate.routes(Access.ADMIN):
            for name, (attempt, status) in attempts.items():
                _collect(failures, f"{method} {template} with {name}",
                         _refused, _send(raw, estate, method, template, **attempt), status)
    assert not failures, "\n".join(failures)
    assert len(estate.relay.calls) == calls_before, estate.relay.calls[calls_before:]


def test_public_routes_need_no_credential(estate: Estate) -> None:
    failures: list[str] = []
    stranger = httpx.Client(base_url=estate.gateway.url, timeout=30)
    with stranger, browser(estate.gateway) as signing_in:
        # Signing in is the one public route that takes a secret: the one it makes a session of.
        form_csrf = csrf_of(signing_in.get("/dashboard/login"))
        sign_in_form = {"data": {"token": estate.token, "csrf": form_csrf}}
        for method, template in estate.routes(Access.PUBLIC):
            if (method, template) == ("POST", "/dashboard/login"):
                answer = _send(signing_in, estate, method, template, **sign_in_form)
            else:
                answer = _send(stranger, estate, method, template)
            _collect(failures, f"{method} {template}", _answered, answer)
    assert not failures, "\n".join(failures)


def test_capability_routes_answer_only_to_their_capability(estate: Estate) -> None:
    attempts = {
        "no credential": {},
        "a team token": {"headers": {"Authorization": f"Bearer {estate.token}"}},
        "the admin token": {"headers": {"Authorization": f"Bearer {ADMIN_SECRET}"}},
    }
    failures: list[str] = []
    with httpx.Client(base_url=estate.gateway.url, timeout=30) as raw:
        for method, template in estate.routes(Access.CAPABILITY):
            for name, attempt in attempts.items():
                _collect(failures, f"{method} {template} with {name} and a wrong capability",
                         _not_found, _send(raw, estate, method, template, **attempt))
        stream = raw.get(estate.prediction["urls"]["stream"])
    assert not failures, "\n".join(failures)
    _status(stream, 200)


def test_session_routes_send_strangers_to_sign_in(estate: Estate) -> None:
    attempts = {
        "no credential": {},
        "a team token": {"headers": {"Authorization": f"Bearer {estate.token}"}},
        "the admin token": {"headers": {"Authorization": f"Bearer {ADMIN_SECRET}"}},
        "a forged session": {"headers": {"Cookie": f"gw_dashboard={FORGED_SESSION}"}},
    }
    failures: list[str] = []
    with httpx.Client(base_url=estate.gateway.url, timeout=30) as raw:
        for method, template in estate.routes(Access.SESSION) + estate.routes(Access.ADMIN_SESSION):
            for name, attempt in attempts.items():
                _collect(failures, f"{method} {template} with {name}",
                         _to_sign_in, _send(raw, estate, method, template, **attempt))
    assert not failures, "\n".join(failures)


def test_session_pages_open_to_a_team_session(estate: Estate) -> None:
    failures: list[str] = []
    for method, template in estate.routes(Access.SESSION):
        if method == "GET":
            _collect(failures, f"{method} {template}",
                     _status, _send(estate.team_session, estate, method, template), 200)
    assert not failures, "\n".join(failures)


def test_admin_session_routes_refuse_a_team_session(estate: Estate) -> None:
    form = {"data": {"name": "intruder", "csrf": csrf_of(estate.team_session.get("/dashboard/tokens"))}}
    failures: list[str] = []
    for method, template in estate.routes(Access.ADMIN_SESSION):
        _collect(failures, f"{method} {template}",
                 _status, _send(estate.team_session, estate, method, template, **form), 404)
    assert not failures, "\n".join(failures)
    assert estate.team_session.get("/dashboard/tokens").status_code == 200, "the team session ended"
