"""Webhook fixtures: a receiver on 127.0.0.1 and a gateway allowed to deliver to it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import Gateway
from tests.dbtools import create_token
from tests.fakes.receiver import Receiver


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """A webhook receiver that answers 204 unless scripted otherwise."""
    server = Receiver().start()
    yield server
    server.stop()


@pytest.fixture
def other_receiver() -> Iterator[Receiver]:
    """A second receiver, for a `webhook_completed` beside the `webhook`."""
    server = Receiver().start()
    yield server
    server.stop()


@pytest.fixture
def hooks_gateway(gateway_factory: Any) -> Gateway:
    """A gateway that may deliver to 127.0.0.1 and sends its outbox every 0.1 s."""
    gw: Gateway = gateway_factory(allow_private_webhooks=True, allow_http_webhooks=True, webhook_interval=0.1, reconcile_interval=0.2)
    return gw


@pytest.fixture
def hooks_api(hooks_gateway: Gateway) -> Iterator[httpx.Client]:
    """An API client for `hooks_gateway` with a fresh token."""
    with hooks_gateway.client(create_token(hooks_gateway.db_url, "hooks")) as client:
        yield client
