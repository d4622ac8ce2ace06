"""Group fixtures: more relays for routing tests, a gateway with the admin API and its client."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import Gateway
from tests.fakes.relay import FakeRelay
from tests.groups.support import ADMIN, admin_client


def _started(other_relays: list[FakeRelay], key: str) -> Iterator[FakeRelay]:
    relay = FakeRelay(key=key)
    relay.start()
    other_relays.append(relay)  # the one-to-one invariant covers it too
    yield relay
    relay.stop()


@pytest.fixture
def second(other_relays: list[FakeRelay]) -> Iterator[FakeRelay]:
    """A second relay on 127.0.0.1."""
    yield from _started(other_relays, "sk-groups-second-canary")


@pytest.fixture
def third(other_relays: list[FakeRelay]) -> Iterator[FakeRelay]:
    """A third relay on 127.0.0.1."""
    yield from _started(other_relays, "sk-groups-third-canary")


@pytest.fixture
def admin_gateway(gateway_factory: Any) -> Gateway:
    """A gateway in front of the fake relay with the admin API on."""
    gw: Gateway = gateway_factory(admin_token=ADMIN)
    return gw


@pytest.fixture
def admin(admin_gateway: Gateway) -> Iterator[httpx.Client]:
    """The admin API of `admin_gateway`."""
    with admin_client(admin_gateway) as client:
        yield client
