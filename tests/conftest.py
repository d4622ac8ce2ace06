"""Shared fixtures: migrated SQLite and PostgreSQL databases, the fake relay, a live gateway."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from app.config import PriceRule, Settings
from app.db import migrate
from app.logging import JsonFormatter
from app.main import create_app
from tests.dbtools import create_token, truncate_all
from tests.fakes.relay import FakeRelay
from tests.helpers import JS_DIR
from tests.invariants import check_all
from tests.servers import ServerThread

POSTGRES_URL = os.environ.get("GATEWAY_TEST_DATABASE_URL")
REDIS_URL = os.environ.get("GATEWAY_TEST_REDIS_URL")
DATABASES = ["sqlite", *(["postgresql"] if POSTGRES_URL else [])]

# $0.003 a prediction plus $0.0012 a second of predict_time; the fake relay reports 2.5 s,
# so each succeeded image prediction costs exactly $0.006000.
TEST_PRICES = [
    PriceRule(model="llm/*", per_input_token=Decimal("0.000001"), per_output_token=Decimal("0.000002")),
    PriceRule(model="black-forest-labs/*", per_prediction=Decimal("0.003"), per_second=Decimal("0.0012")),
    PriceRule(model="*/multi", per_output=Decimal("0.01")),
    # Estimated exactly, and estimated at half the real cost, for the budget tests.
    PriceRule(model="budget/*", per_prediction=Decimal("0.01")),
    PriceRule(model="underestimated/*", per_prediction=Decimal("0.01"), estimate=Decimal("0.005")),
    PriceRule(model="billfailures/*", per_prediction=Decimal("0.02"), bill_failures=True),
]


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite file migrated once; each test gets a copy."""
    path = tmp_path_factory.mktemp("template") / "gateway.db"
    migrate(f"sqlite:///{path}")
    return path


@pytest.fixture(scope="session")
def postgres_migrated() -> str:
    """The test PostgreSQL database, migrated once per session."""
    if not POSTGRES_URL:
        pytest.skip("GATEWAY_TEST_DATABASE_URL is not set")
    migrate(POSTGRES_URL)
    return POSTGRES_URL


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The test Redis; with GATEWAY_TEST_REDIS_URL set, an unreachable one fails (never skips)."""
    if not REDIS_URL:
        pytest.skip("GATEWAY_TEST_REDIS_URL is not set")
    with redis.Redis.from_url(REDIS_URL, socket_timeout=5) as client:
        client.ping()
    return REDIS_URL


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A key prefix of this test's own in the shared Redis; its keys are deleted afterwards."""
    prefix = f"replicate-gateway-test:{uuid.uuid4().hex}:"
    yield prefix
    with redis.Redis.from_url(redis_url) as client:
        keys = list(client.scan_iter(match=f"{prefix}*"))
        if keys:
            client.delete(*keys)


@pytest.fixture(params=DATABASES)
def db_url(request: pytest.FixtureRequest, tmp_path: Path, sqlite_template: Path) -> str:
    """A migrated, empty database: a SQLite copy, or the shared PostgreSQL emptied."""
    if request.param == "sqlite":
        path = tmp_path / "gateway.db"
        shutil.copy(sqlite_template, path)
        return f"sqlite:///{path}"
    url: str = request.getfixturevalue("postgres_migrated")
    truncate_all(url)
    return url


@pytest.fixture(scope="session")
def relay_server() -> Iterator[FakeRelay]:
    """The fake relay, served over real HTTP on 127.0.0.1 for the whole session."""
    relay = FakeRelay()
    relay.start()
    yield relay
    relay.stop()


@pytest.fixture
def relay(relay_server: FakeRelay) -> Iterator[FakeRelay]:
    """The fake relay, reset for this test."""
    relay_server.reset()
    yield relay_server
    relay_server.reset()


def make_settings(db_url: str, upstream_url: str, upstream_token: str | None, **overrides: Any) -> Settings:
    """Settings for a test gateway, ignoring any .env file or GATEWAY_* variable."""
    values: dict[str, Any] = {
        "database_url": db_url,
        "upstream_url": upstream_url,
        "upstream_token": upstream_token,
        "prices": TEST_PRICES,
        # The suite's amounts assume nothing held beyond the prices; the budget tests of the
        # default estimate set it themselves.
        "default_estimate": Decimal(0),
        "metered_estimate": Decimal(0),
        "create_timeout": 5.0,
        "request_timeout": 3.0,
        "log_level": "DEBUG",
        **overrides,
    }
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


@dataclass
class Gateway:
    """A gateway served on 127.0.0.1 in front of the fake relay."""

    url: str
    db_url: str
    settings: Settings
    server: ServerThread

    @property
    def replicate_base(self) -> str:
        """The base URL the Python client is given."""
        return self.url + "/replicate"

    def client(self, token: str | None) -> httpx.Client:
        """A plain HTTP client for the gateway's API, authenticated with `token`."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.replicate_base + "/v1", headers=headers, timeout=30)


@pytest.fixture(scope="session")
def npm_client() -> Path:
    """The official npm client, installed by the test set-up from tests/js/package.json."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node and npm are not installed")
    if not (JS_DIR / "node_modules" / "replicate").is_dir():
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--silent"], cwd=JS_DIR,
                       check=True, timeout=300)
    return JS_DIR


@pytest.fixture
def other_relays() -> list[FakeRelay]:
    """Extra relays a test starts; the one-to-one invariant covers them too."""
    return []


@pytest.fixture
def gateway_factory(db_url: str, relay: FakeRelay, other_relays: list[FakeRelay], tmp_path: Path) -> Iterator[Any]:
    """Start gateways with optional setting overrides; all are stopped after the test."""
    started: list[ServerThread] = []

    def start(**overrides: Any) -> Gateway:
        upstream_url = overrides.pop("upstream_url", relay.upstream_url)
        overrides.setdefault("storage_dir", tmp_path / "storage")
        settings = make_settings(db_url, upstream_url, relay.key, **overrides)
        server = ServerThread(create_app(settings)).start()
        started.append(server)
        return Gateway(url=server.url, db_url=db_url, settings=settings, server=server)

    yield start
    for server in started:
        server.stop()
    if started:
        check_all(db_url, [relay, *other_relays])


@pytest.fixture
def gateway(gateway_factory: Any) -> Gateway:
    """A gateway in front of the fake relay with test prices."""
    gw: Gateway = gateway_factory()
    return gw


@pytest.fixture
def token(gateway: Gateway) -> str:
    """A fresh, unrestricted gateway token."""
    return create_token(gateway.db_url, "team-a")


@pytest.fixture
def api(gateway: Gateway, token: str) -> Iterator[httpx.Client]:
    """An HTTP client for the gateway's API with a valid token."""
    with gateway.client(token) as client:
        yield client


@pytest.fixture
def log_lines(gateway: Gateway) -> Iterator[list[str]]:
    """Every line the gateway logs (through its own scrubbing handler) during the test."""
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    root = logging.getLogger()
    gateway_handlers = [h for h in root.handlers if isinstance(h.formatter, JsonFormatter)]
    collector = Collect()
    collector.setFormatter(JsonFormatter())
    for handler in gateway_handlers:
        for log_filter in handler.filters:
            collector.addFilter(log_filter)
    root.addHandler(collector)
    yield lines
    root.removeHandler(collector)
