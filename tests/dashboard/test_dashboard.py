"""The dashboard over HTTP: sign-in, sessions, CSRF, team isolation, pages, CSV and escaping."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from app.dashboard import render
from tests.conftest import Gateway
from tests.dashboard.support import ADMIN_SECRET, browser, csrf_of, sign_in, signed_in, text_of
from tests.dbtools import create_token, rows
from tests.fakes.relay import FakeRelay
from tests.helpers import assert_problem, create, wait_terminal

PAGES = ["/dashboard", "/dashboard/tokens", "/dashboard/predictions", "/dashboard/usage",
         "/dashboard/predictions/abc123", "/dashboard/tokens/abc123"]
POSTS = ["/dashboard/tokens", "/dashboard/tokens/abc123", "/dashboard/tokens/abc123/revoke", "/dashboard/logout"]


@pytest.fixture
def admin_gateway(gateway_factory: Any) -> Gateway:
    gw: Gateway = gateway_factory(admin_token=ADMIN_SECRET)
    return gw


def _finished(gateway: Gateway, token: str, count: int, **inputs: Any) -> list[dict[str, Any]]:
    with gateway.client(token) as api:
        created = [create(api, **inputs).json() for _ in range(count)]
        return [wait_terminal(api, p["id"]) for p in created]


class TestSignIn:
    def test_every_page_refuses_without_a_session(self, admin_gateway: Gateway) -> None:
        with browser(admin_gateway) as client:
            for path in PAGES:
                answer = client.get(path)
                assert answer.status_code == 303, path
                assert answer.headers["location"].startswith("/dashboard/login?next="), path
            for path in POSTS:
                answer = client.post(path, data={"name": "x"})
                assert answer.status_code == 303, path
                assert answer.headers["location"] == "/dashboard/login"
            assert_problem(client.get("/dashboard/usage.csv"), 401)
        assert [t["name"] for t in rows(admin_gateway.db_url, "api_token")] == []

    def test_admin_signs_in_with_a_signed_session_cookie(self, admin_gateway: Gateway) -> None:
        with browser(admin_gateway) as client:
            answer = sign_in(client, ADMIN_SECRET)
            assert answer.status_code == 303
            assert answer.headers["location"] == "/dashboard"
            cookie = next(v for k, v in answer.headers.multi_items()
                          if k == "set-cookie" and v.startswith("gw_dashboard="))
            flags = {part.strip().lower() for part in cookie.split(";")[1:]}
            assert {"httponly", "path=/dashboard", "samesite=lax"} <= flags
            assert "secure" not in flags  # plain http on 127.0.0.1
            assert ADMIN_SECRET not in cookie
            page = client.get("/dashboard")
            assert page.status_code == 200
            assert "Signed in as admin" in text_of(page)
            assert page.headers["cache-control"] == "no-store"
            assert "frame-ancestors 'none'" in page.headers["content-security-policy"]

    def test_the_cookie_is_secure_when_the_public_url_is_https(self, gateway_factory: Any) -> None:
        gateway = gateway_factory(admin_token=ADMIN_SECRET, public_url="https://gw.example.test")
        with browser(gateway) as client:
            # httpx keeps Secure cookies only for https, so carry the sign-in cookie by hand.
            form = client.get("/dashboard/login")
            assert "secure" in form.headers["set-cookie"].lower()
            nonce = form.headers["set-cookie"].split(";")[0]
            answer = client.post("/dashboard/login", data={"token": ADMIN_SECRET, "csrf": csrf_of(form)},
                                 headers={"Cookie": nonce})
            assert answer.status_code == 303
            assert "; secure" in answer.headers["set-cookie"].lower()

    @pytest.mark.parametrize("wrong", ["nope", "gw_" + "x" * 43, "admin-canary-7c2d19e4b9"])
    def test_failed_sign_in_says_so_and_echoes_nothing(self, admin_gateway: Gateway, wrong: str) -> None:
        with browser(admin_gateway) as client:
            answer = sign_in(client, wrong)
            assert answer.status_code == 401
            assert "Sign-in failed: that token is not valid for this gateway." in text_of(answer)
            assert wrong not in answer.text
            assert "gw_dashboard=" not in answer.headers.get("set-cookie", "")
            assert client.get("/dashboard").status_code == 303

    def test_sign_in_needs_the_forms_csrf_token(self, admin_gateway: Gateway) -> None:
        with browser(admin_gateway) as client:
            client.get("/dashboard/login")
            answer = client.post("/dashboard/login", data={"token": ADMIN_SECRET, "csrf": "forged"})
            assert answer.status_code == 403
            assert client.get("/dashboard").status_code == 303

    def test_next_returns_to_the_page_asked_for_but_never_off_site(self, admin_gateway: Gateway) -> None:
        with browser(admin_gateway) as client:
            asked = client.get("/dashboard/predictions?status=failed")
            assert asked.headers["location"] == "/dashboard/login?next=%2Fdashboard%2Fpredictions%3Fstatus%3Dfailed"
            form = client.get(asked.headers["location"])
            answer = client.post("/dashboard/login", data={
                "token": ADMIN_SECRET, "csrf": csrf_of(form), "next": "/dashboard/predictions?status=failed"})
            assert answer.headers["location"] == "/dashboard/predictions?status=failed"
        for evil in ("https://evil.example/", "//evil.example/dashboard", "/dashboard/../admin", "/\\evil"):
            with browser(admin_gateway) as client:
                form = client.get("/dashboard/login")
                answer = client.post("/dashboard/login", data={
                    "token": ADMIN_SECRET, "csrf": csrf_of(form), "next": evil})
                assert answer.headers["location"] in ("/dashboard", evil if evil.startswith("/dashboard/") else "/dashboard")
                assert not answer.headers["location"].startswith(("//", "http"))

    def test_sign_out_ends_the_session(self, admin_gateway: Gateway) -> None:
        with signed_in(admin_gateway, ADMIN_SECRET) as client:
            page = client.get("/dashboard")
            answer = client.post("/dashboard/logout", data={"csrf": csrf_of(page)})
            assert answer.status_code == 303
            assert client.get("/dashboard").status_code == 303

    def test_a_changed_admin_token_ends_admin_sessions(self, admin_gateway: Gateway, gateway_factory: Any) -> None:
        with signed_in(admin_gateway, ADMIN_SECRET) as client:
            cookie = client.cookies["gw_dashboard"]
        rotated = gateway_factory(admin_token=ADMIN_SECRET + "-rotated")
        with browser(rotated) as client:
            client.cookies.set("gw_dashboard", cookie, path="/dashboard")
            assert client.get("/dashboard").status_code == 303
        with browser(admin_gateway) as client:
            client.cookies.set("gw_dashboard", cookie, path="/dashboard")
            assert client.get("/dashboard").status_code == 200
            tampered = cookie[:-2] + ("A" if cookie[-2] != "A" else "B") + cookie[-1]
            client.cookies.set("gw_dashboard", tampered, path="/dashboard")
            assert client.get("/dashboard").status_code == 303

    def test_without_an_admin_token_only_team_tokens_sign_in(self, gateway: Gateway, token: str) -> None:
        with browser(gateway) as client:
            assert sign_in(client, "").status_code == 401
        with signed_in(gateway, token) as client:
            assert "team token team-a" in text_of(client.get("/dashboard"))


class TestCsrf:
    def test_forms_need_the_sessions_own_csrf_token(self, admin_gateway: Gateway) -> None:
        with signed_in(admin_gateway, ADMIN_SECRET) as one, signed_in(admin_gateway, ADMIN_SECRET) as two:
            theirs = csrf_of(two.get("/dashboard/tokens"))
            for csrf in ("", "forged", theirs):
                answer = one.post("/dashboard/tokens", data={"csrf": csrf, "name": "sneaky"})
                assert answer.status_code == 403, csrf
            mine = csrf_of(one.get("/dashboard/tokens"))
            answer = one.post("/dashboard/tokens", data={"csrf": mine, "name": "sneaky"},
                              headers={"Origin": "https://evil.example"})
            assert answer.status_code == 403
            answer = one.post("/dashboard/tokens", data={"csrf": mine, "name": "sneaky"},
                              headers={"Referer": "https://evil.example/page"})
            assert answer.status_code == 403
            assert rows(admin_gateway.db_url, "api_token") == []
            answer = one.post("/dashboard/tokens", data={"csrf": mine, "name": "fine"},
                              headers={"Origin": admin_gateway.url})
            assert answer.status_code == 201


class TestTokens:
    def test_admin_creates_updates_and_revokes_a_token(self, admin_gateway: Gateway) -> None:
        with signed_in(admin_gateway, ADMIN_SECRET) as client:
            csrf = csrf_of(client.get("/dashboard/tokens"))
            made = client.post("/dashboard/tokens", data={
                "csrf": csrf, "name": "team-web", "budget_usd": "1.50", "budget_period": "month",
                "rpm_limit": "30", "max_in_flight": "", "models": "black-forest-labs/* llm/*",
                "expires_at": "2099-01-01T00:00"})
            assert made.status_code == 201, made.text
            assert made.headers["cache-control"] == "no-store"
            secret = re.search(r"gw_[A-Za-z0-9_-]{43}", made.text)
            assert secret is not None
            stored = rows(admin_gateway.db_url, "api_token")[0]
            assert secret.group(0) not in repr(stored)
            assert (stored["budget_micros"], stored["budget_period"], stored["rpm_limit"]) == (1_500_000, "month", 30)
            assert stored["max_in_flight"] is None
            with admin_gateway.client(secret.group(0)) as api:
                assert api.get("/account").status_code == 200
            page = client.get(f"/dashboard/tokens/{stored['id']}")
            assert secret.group(0) not in page.text  # shown once, never again
            assert "black-forest-labs/*, llm/*" in text_of(page)
            bad = client.post(f"/dashboard/tokens/{stored['id']}", data={
                "csrf": csrf, "budget_usd": "lots", "budget_period": "total"})
            assert bad.status_code == 422
            assert "budget_usd" in text_of(bad)
            updated = client.post(f"/dashboard/tokens/{stored['id']}", data={
                "csrf": csrf, "budget_usd": "", "budget_period": "total", "rpm_limit": "", "max_in_flight": "2",
                "models": "", "expires_at": ""})
            assert updated.status_code == 303
            after = rows(admin_gateway.db_url, "api_token")[0]
            assert (after["budget_micros"], after["rpm_limit"], after["max_in_flight"],
                    after["expires_at"]) == (None, None, 2, None)
            assert after["model_globs"] in (None, "null")  # the JSON column may hold a JSON null
            assert "The limits were saved." in text_of(client.get(updated.headers["location"]))
            taken = client.post("/dashboard/tokens", data={"csrf": csrf, "name": "team-web"})
            assert taken.status_code == 409
            assert "A token named team-web already exists." in text_of(taken)
            revoked = client.post(f"/dashboard/tokens/{stored['id']}/revoke", data={"csrf": csrf})
            assert revoked.status_code == 303
            with admin_gateway.client(secret.group(0)) as api:
                assert_problem(api.get("/account"), 401)
            assert "revoked" in text_of(client.get("/dashboard/tokens"))

    def test_invalid_names_are_explained(self, admin_gateway: Gateway) -> None:
        with signed_in(admin_gateway, ADMIN_SECRET) as client:
            csrf = csrf_of(client.get("/dashboard/tokens"))
            answer = client.post("/dashboard/tokens", data={"csrf": csrf, "name": "<b>bad name</b>"})
            assert answer.status_code == 422
            assert "<b>bad name</b>" not in answer.text
            assert "&lt;b&gt;bad name&lt;/b&gt;" in answer.text

    def test_tokens_are_listed_fifty_a_page(self, admin_gateway: Gateway) -> None:
        for i in range(53):
            create_token(admin_gateway.db_url, f"t{i:03d}")
        with signed_in(admin_gateway, ADMIN_SECRET) as client:
            first = client.get("/dashboard/tokens")
            names = re.findall(r">(t\d{3})</a>", first.text)
            assert names == [f"t{i:03d}" for i in range(50)]
            second = client.get("/dashboard/tokens?after=t049")
            assert re.findall(r">(t\d{3})</a>", second.text) == ["t050", "t051", "t052"]
            assert 'href="/dashboard/tokens?after=t049"' in first.text


class TestTeamView:
    def test_a_team_token_sees_only_its_own_usage_and_predictions(self, admin_gateway: Gateway) -> None:
        mine = create_token(admin_gateway.db_url, "team-mine")
        theirs = create_token(admin_gateway.db_url, "team-theirs")
        my_predictions = _finished(admin_gateway, mine, 2)
        their_predictions = _finished(admin_gateway, theirs, 3)
        with signed_in(admin_gateway, mine) as client:
            overview = client.get("/dashboard")
            assert re.search(r'data-testid="total-predictions">2<', overview.text)
            assert re.search(r'data-testid="total-cost">\$0\.012000<', overview.text)
            assert "team-theirs" not in overview.text
            listing = client.get("/dashboard/predictions")
            assert all(p["id"] in listing.text for p in my_predictions)
            assert not any(p["id"] in listing.text for p in their_predictions)
            forced = client.get("/dashboard/predictions?token=team-theirs")
            assert not any(p["id"] in forced.text for p in their_predictions)
            assert client.get(f"/dashboard/predictions/{my_predictions[0]['id']}").status_code == 200
            assert client.get(f"/dashboard/predictions/{their_predictions[0]['id']}").status_code == 404
            tokens = client.get("/dashboard/tokens")
            assert "team-mine" in tokens.text
            assert "team-theirs" not in tokens.text
            assert "Create a token" not in tokens.text
            their_id = next(t["id"] for t in rows(admin_gateway.db_url, "api_token") if t["name"] == "team-theirs")
            assert client.get(f"/dashboard/tokens/{their_id}").status_code == 404
            csrf = csrf_of(tokens)
            assert client.post("/dashboard/tokens", data={"csrf": csrf, "name": "mine-too"}).status_code == 404
            assert client.post(f"/dashboard/tokens/{their_id}/revoke", data={"csrf": csrf}).status_code == 404
            csv_text = client.get("/dashboard/usage.csv?group_by=token").text
            assert csv_text.splitlines() == ["token,predictions,cost_usd", "team-mine,2,0.012000"]
        assert len(rows(admin_gateway.db_url, "api_token")) == 2
        assert all(t["revoked_at"] is None for t in rows(admin_gateway.db_url, "api_token"))

    def test_a_revoked_team_token_loses_its_session_at_once(self, admin_gateway: Gateway) -> None:
        secret = create_token(admin_gateway.db_url, "team-soon-gone")
        with signed_in(admin_gateway, secret) as team, signed_in(admin_gateway, ADMIN_SECRET) as admin:
            assert team.get("/dashboard").status_code == 200
            token_id = rows(admin_gateway.db_url, "api_token")[0]["id"]
            csrf = csrf_of(admin.get(f"/dashboard/tokens/{token_id}"))
            assert admin.post(f"/dashboard/tokens/{token_id}/revoke", data={"csrf": csrf}).status_code == 303
            assert team.get("/dashboard").status_code == 303
            assert_problem(team.get("/dashboard/usage.csv"), 401)

    def test_an_expired_team_token_cannot_sign_in(self, admin_gateway: Gateway) -> None:
        secret = create_token(admin_gateway.db_url, "team-old", expires_at=datetime(2020, 1, 1, tzinfo=UTC))
        with browser(admin_gateway) as client:
            assert sign_in(client, secret).status_code == 401


class TestPredictions:
    def test_keyset_pages_and_filters(self, admin_gateway: Gateway, relay: FakeRelay) -> None:
        relay.starting_seconds = relay.processing_seconds = 0
        secret = create_token(admin_gateway.db_url, "team-many")
        with admin_gateway.client(secret) as api:
            ids = [create(api).json()["id"] for _ in range(103)]
            failed = wait_terminal(api, create(api, fail=True).json()["id"])
            for pid in ids:
                wait_terminal(api, pid)
        with signed_in(admin_gateway, ADMIN_SECRET) as client:
            first = client.get("/dashboard/predictions")
            seen = re.findall(r'href="/dashboard/predictions/([a-z0-9]+)"', first.text)
            assert len(seen) == 100
            older = re.search(r'href="([^"]+)" rel="next"', first.text)
            assert older is not None
            second = client.get(older.group(1).replace("&amp;", "&"))
            rest = re.findall(r'href="/dashboard/predictions/([a-z0-9]+)"', second.text)
            assert len(rest) == 4
            assert not set(rest) & set(seen)
            assert set(seen + rest) == {*ids, failed["id"]}
            assert 'rel="next"' not in second.text
            only_failed = client.get("/dashboard/predictions?status=failed&token=team-many")
            assert re.findall(r'href="/dashboard/predictions/([a-z0-9]+)"', only_failed.text) == [failed["id"]]
            none = client.get("/dashboard/predictions?model=other/model")
            assert "No predictions match." in text_of(none)
            unknown = client.get("/dashboard/predictions?token=nobody")
            assert "No token is named nobody." in text_of(unknown)
            assert client.get("/dashboard/predictions?cursor=forged.cursor").status_code == 400
            assert client.get("/dashboard/predictions?status=exploded").status_code == 400
            assert client.get("/dashboard/predictions?since=yesterday").status_code == 400

    def test_the_prediction_page_shows_cost_output_and_escaped_input(
        self, admin_gateway: Gateway, relay: FakeRelay
    ) -> None:
        relay.outputs_on_relay = True
        secret = create_token(admin_gateway.db_url, "team-pics")
        hostile = '<script>alert("x")</script>'
        done = _finished(admin_gateway, secret, 1, prompt=hostile, num_outputs=2)[0]
        with signed_in(admin_gateway, ADMIN_SECRET) as client:
            page = client.get(f"/dashboard/predictions/{done['id']}")
            assert page.status_code == 200
            assert "<script>" not in page.text
            assert "&lt;script&gt;alert(" in page.text
            assert 'data-testid="cost">$0.006000<' in page.text
            assert len(re.findall(r'<img src="http://127\.0\.0\.1:\d+/delivery/[^"]+\.webp"', page.text)) == 2
            assert "step 3/3" in page.text
            assert "settlement" in page.text
            failed = _finished(admin_gateway, secret, 1, fail=True)[0]
            text = text_of(client.get(f"/dashboard/predictions/{failed['id']}"))
            assert "something went wrong" in text
            assert "failed" in text
            assert client.get("/dashboard/predictions/NOT-AN-ID").status_code == 404

    def test_web_url_is_the_dashboard_page_and_old_links_redirect(self, admin_gateway: Gateway) -> None:
        secret = create_token(admin_gateway.db_url, "team-links")
        with admin_gateway.client(secret) as api:
            body = create(api).json()
            wait_terminal(api, body["id"])
        web = body["urls"]["web"]
        assert web == f"{admin_gateway.url}/dashboard/predictions/{body['id']}"
        with browser(admin_gateway) as client:
            for old in (f"/p/{body['id']}", f"/replicate/p/{body['id']}"):
                answer = client.get(old)
                assert answer.status_code == 308
                assert answer.headers["location"] == f"/dashboard/predictions/{body['id']}"
            assert client.get(web).status_code == 303  # to the sign-in form
        with signed_in(admin_gateway, ADMIN_SECRET) as client:
            assert body["id"] in client.get(web).text


class TestUsage:
    def test_overview_chart_and_csv_agree_with_the_usage_report(self, admin_gateway: Gateway) -> None:
        one = create_token(admin_gateway.db_url, "team-one")
        two = create_token(admin_gateway.db_url, "team-two")
        _finished(admin_gateway, one, 2)
        _finished(admin_gateway, one, 1, fail=True)
        _finished(admin_gateway, two, 1)
        with admin_gateway.client(two) as api:
            api.post("/models/billfailures/thing/predictions", json={"input": {"fail": True}})
        with signed_in(admin_gateway, ADMIN_SECRET) as client:
            overview = client.get("/dashboard")
            assert overview.status_code == 200
            svg = re.findall(r"<svg[^>]*>.*?</svg>", overview.text, re.S)
            assert len(svg) == 2
            assert all("<title" in chart and "<desc" in chart for chart in svg)
            assert len(re.findall(r'class="main"', svg[0])) == 30  # a bar per day of the default range
            assert re.search(r'data-testid="total-predictions">5<', overview.text)
            text = text_of(overview)
            assert "team-one" in text
            assert "team-two" in text
            assert "black-forest-labs/flux-schnell" in text
            query = "group_by=day&group_by=token&group_by=model"
            ours = client.get(f"/dashboard/usage.csv?{query}")
            assert ours.status_code == 200
            assert ours.headers["content-type"].startswith("text/csv")
            assert "attachment" in ours.headers["content-disposition"]
        with httpx.Client(base_url=admin_gateway.url, headers={"Authorization": f"Bearer {ADMIN_SECRET}"}) as admin:
            report = admin.get(f"/admin/v1/usage?format=csv&{query}").text
        assert sorted(ours.text.splitlines()) == sorted(report.splitlines())
        assert len(ours.text.splitlines()) == 4

    def test_ranges_are_checked(self, admin_gateway: Gateway) -> None:
        with signed_in(admin_gateway, ADMIN_SECRET) as client:
            assert client.get("/dashboard?since=2026-02-01&until=2026-01-01").status_code == 400
            assert client.get("/dashboard?since=2020-01-01&until=2026-01-01").status_code == 400
            page = client.get("/dashboard?since=2026-01-01&until=2026-01-07")
            assert page.status_code == 200
            assert len(re.findall(r'class="main"', page.text)) == 14  # seven bars in each chart
            assert client.get("/dashboard/usage.csv?since=nonsense").status_code == 400


class TestPreviews:
    @pytest.mark.parametrize(("output", "kinds"), [
        (["https://x.test/a.png", "https://x.test/b.mp4"], ["image", "link"]),
        ("data:image/png;base64,iVBORw0KGgo=", ["image"]),
        ("javascript:alert(1)", ["text"]),
        (["javascript:alert(1)//x.png", "data:text/html,<script>x</script>"], ["text"]),
        ({"video": "https://x.test/v.mp4", "n": 3}, ["link", "text"]),
        (["Hello", " world"], ["text"]),
        (None, []),
    ])
    def test_only_http_urls_become_links_or_images(self, output: Any, kinds: list[str]) -> None:
        assert [p.kind for p in render.previews(output)] == kinds

    def test_a_language_models_fragments_read_as_one_text(self) -> None:
        assert [p.value for p in render.previews(["Hello", " world"])] == ["Hello world"]
