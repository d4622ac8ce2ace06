"""The dashboard in headless Chromium: sign in, create a token, run predictions with the official
client, and see them, their cost and the chart; a team token sees only its own.

Screenshots of every page are saved under this test's `tmp_path` (in `screenshots/`), or in the
directory named by GATEWAY_TEST_SCREENSHOTS when it is set."""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import replicate
from replicate.exceptions import ModelError

from tests.conftest import Gateway
from tests.dashboard.support import ADMIN_SECRET
from tests.dbtools import create_token
from tests.fakes.relay import FakeRelay
from tests.helpers import create, wait_terminal

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
MODEL = "black-forest-labs/flux-schnell"


def _install_chromium() -> None:
    """Debian's chromium, installed with apt-get when we may (Playwright's own download cannot work
    here)."""
    if os.path.exists(CHROMIUM) or os.geteuid() != 0 or shutil.which("apt-get") is None:
        return
    install = ["apt-get", "install", "-y", "chromium"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if subprocess.run(install, env=env, capture_output=True, check=False, timeout=900).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, check=False, timeout=600)
        subprocess.run(install, env=env, capture_output=True, check=False, timeout=900)


@pytest.fixture(scope="session")
def chromium() -> str:
    """The path of a headless-capable Debian Chromium."""
    _install_chromium()
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: run `apt-get install -y chromium` as root (the test set-up "
                    "does this itself when it runs as root)")
    return CHROMIUM


def in_browser(drive: Callable[[Any], None]) -> None:
    """Run `drive(browser)` with Chromium under Playwright's sync API, in a thread of its own:
    that API keeps an event loop running in its thread, where the database helpers' own
    asyncio.run() could not work."""
    from playwright.sync_api import sync_playwright

    def session() -> None:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            try:
                drive(browser)
            finally:
                browser.close()

    with ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(session).result(timeout=600)


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    """Where this test's screenshots go."""
    chosen = os.environ.get("GATEWAY_TEST_SCREENSHOTS")
    folder = Path(chosen) if chosen else tmp_path / "screenshots"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _png(size: int = 48) -> bytes:
    """A small, valid PNG (a gradient), made here so no image file has to be shipped."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + bytes(v for x in range(size) for v in (x * 5 % 256, y * 5 % 256, 160))
                    for y in range(size))
    header = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


PNG = _png()


def _local_only(route: Any) -> None:
    # Tests talk to 127.0.0.1 only: anything else the page asks for is refused. The fake relay's
    # output files are not real images, so the browser is handed a real one in their place.
    url = urlsplit(route.request.url)
    if url.hostname != "127.0.0.1":
        route.abort()
    elif url.path.startswith("/delivery/"):
        route.fulfill(status=200, content_type="image/png", body=PNG)
    else:
        route.continue_()


def _page(chromium: Any, gateway: Gateway) -> Any:
    context = chromium.new_context(base_url=gateway.url, accept_downloads=True)
    context.route("**/*", _local_only)
    return context.new_page()


def _sign_in(page: Any, secret: str) -> None:
    page.goto("/dashboard/predictions")
    assert "/dashboard/login" in page.url
    page.get_by_label("Token").fill(secret)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url("**/dashboard/predictions")


def _accessible(page: Any) -> None:
    """The basics every page must have: a language, a title, labelled fields, described images."""
    assert page.evaluate("document.documentElement.lang") == "en"
    assert page.title().endswith("replicate-gateway")
    unlabelled = page.evaluate("""[...document.querySelectorAll('input:not([type=hidden]), select, textarea')]
        .filter(e => !e.labels || e.labels.length === 0).map(e => e.name)""")
    assert unlabelled == []
    assert page.evaluate("[...document.images].filter(i => !i.alt).length") == 0
    assert page.locator("a.skip[href='#main']").count() == 1


def test_admin_and_team_in_a_real_browser(
    chromium: str, gateway_factory: Any, relay: FakeRelay, shots: Path
) -> None:
    relay.outputs_on_relay = True  # output images served from 127.0.0.1, so the page can load them
    gateway: Gateway = gateway_factory(admin_token=ADMIN_SECRET)
    other = create_token(gateway.db_url, "team-other")
    with gateway.client(other) as api:
        theirs = wait_terminal(api, create(api).json()["id"])
    in_browser(lambda browser: _admin_then_team(browser, gateway, shots, theirs["id"]))
    assert len(list(shots.glob("*.png"))) == 10


def _admin_then_team(chromium: Any, gateway: Gateway, shots: Path, their_id: str) -> None:
    page = _page(chromium, gateway)
    page.goto("/dashboard")
    page.screenshot(path=shots / "01-sign-in.png", full_page=True)
    _accessible(page)
    page.get_by_label("Token").fill("not-a-token")
    page.get_by_role("button", name="Sign in").click()
    assert page.get_by_role("alert").inner_text() == "Sign-in failed: that token is not valid for this gateway."
    _sign_in(page, ADMIN_SECRET)

    # A token created in the browser; its secret is read from the page that shows it once.
    page.get_by_role("link", name="Tokens").click()
    page.get_by_label("Name").fill("team-browser")
    page.get_by_label("Budget (USD)").fill("5")
    page.get_by_label("Predictions per minute").fill("100")
    page.screenshot(path=shots / "02-tokens.png", full_page=True)
    _accessible(page)
    page.get_by_role("button", name="Create token").click()
    secret = page.get_by_test_id("token-secret").inner_text().strip()
    assert re.fullmatch(r"gw_[A-Za-z0-9_-]{43}", secret)
    page.screenshot(path=shots / "03-token-created.png", full_page=True)

    # Predictions through the official client, with only base_url changed.
    client = replicate.Client(api_token=secret, base_url=gateway.replicate_base)
    made = []
    for prompt in ("a red fox", "a blue whale"):
        prediction = client.predictions.create(model=MODEL, input={"prompt": prompt, "num_outputs": 2})
        prediction.wait()
        assert prediction.status == "succeeded"
        made.append(prediction)
    with pytest.raises(ModelError):
        client.run(MODEL, input={"prompt": "doomed", "fail": True})
    assert made[0].urls["web"] == f"{gateway.url}/dashboard/predictions/{made[0].id}"

    page.get_by_role("link", name="Predictions").click()
    listed = page.locator("table.list tbody tr")
    assert listed.count() == 4  # ours (2 succeeded, 1 failed) and the other team's
    for prediction in made:
        assert page.locator(f"a[href='/dashboard/predictions/{prediction.id}']").count() == 1
    assert page.locator("table.list .status-failed").count() == 1
    page.screenshot(path=shots / "04-predictions.png", full_page=True)
    _accessible(page)

    page.goto(made[0].urls["web"])
    assert page.get_by_test_id("cost").inner_text() == "$0.006000"
    assert page.get_by_test_id("status").inner_text() == "succeeded"
    images = page.locator("ul.outputs img")
    assert images.count() == 2
    page.wait_for_function("[...document.querySelectorAll('ul.outputs img')].every(i => i.complete)")
    assert page.evaluate("[...document.querySelectorAll('ul.outputs img')].map(i => i.naturalWidth)") == [48, 48]
    assert "a red fox" in page.locator("pre").filter(has_text="prompt").inner_text()
    page.screenshot(path=shots / "05-prediction.png", full_page=True)
    _accessible(page)

    page.get_by_role("link", name="Overview").click()
    assert page.get_by_test_id("total-cost").inner_text() == "$0.018000"  # three succeeded, $0.006 each
    assert page.get_by_test_id("total-predictions").inner_text() == "4"
    charts = page.locator("svg[role=img]")
    assert charts.count() == 2
    assert page.locator("svg[role=img] rect.main").count() == 60  # 30 days in each chart
    tallest = page.evaluate("Math.max(...[...document.querySelectorAll('svg rect.main')].map(r => r.height.baseVal.value))")
    assert tallest > 100
    page.screenshot(path=shots / "06-overview.png", full_page=True)
    _accessible(page)

    page.get_by_role("link", name="Usage export").click()
    page.screenshot(path=shots / "07-usage.png", full_page=True)
    _accessible(page)
    with page.expect_download() as caught:
        page.get_by_role("button", name="Download CSV").click()
    csv_text = Path(caught.value.path()).read_text()
    lines = csv_text.splitlines()
    assert lines[0] == "token,model,day,predictions,cost_usd"
    assert any(line.startswith(f"team-browser,{MODEL},") and line.endswith(",3,0.012000") for line in lines)
    assert any(line.startswith(f"team-other,{MODEL},") for line in lines)
    page.context.close()

    # The team token, signed in afresh, sees only its own.
    team = _page(chromium, gateway)
    _sign_in(team, secret)
    assert team.locator("table.list tbody tr").count() == 3
    assert team.locator(f"a[href='/dashboard/predictions/{their_id}']").count() == 0
    team.screenshot(path=shots / "08-team-predictions.png", full_page=True)
    team.get_by_role("link", name="Overview").click()
    assert team.get_by_test_id("total-cost").inner_text() == "$0.012000"
    assert team.get_by_test_id("total-predictions").inner_text() == "3"
    assert "team-other" not in team.content()
    team.screenshot(path=shots / "09-team-overview.png", full_page=True)
    team.get_by_role("link", name="Tokens").click()
    assert team.locator("tbody th a").all_inner_texts() == ["team-browser"]
    assert team.get_by_role("button", name="Create token").count() == 0
    team.screenshot(path=shots / "10-team-tokens.png", full_page=True)
    response = team.goto(f"/dashboard/predictions/{their_id}")
    assert response is not None
    assert response.status == 404
    team.context.close()
