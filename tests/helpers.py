"""Small helpers shared by the integration tests."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, cast

import httpx

from tests.dbtools import rows

T = TypeVar("T")
TERMINAL = {"succeeded", "failed", "canceled"}
JS_DIR = Path(__file__).resolve().parent / "js"


def free_port() -> int:
    """A loopback port with nothing listening on it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def assert_problem(response: httpx.Response, status: int) -> dict[str, Any]:
    """The response is a Replicate-style problem with this status; return its body."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    assert isinstance(body["title"], str)
    assert isinstance(body["detail"], str)
    assert body["detail"]
    return body


def create(api: httpx.Client, model: str = "black-forest-labs/flux-schnell", **inputs: Any) -> httpx.Response:
    """POST a model create with the given input."""
    return api.post(f"/models/{model}/predictions", json={"input": {"prompt": "p", **inputs}})


def wait_terminal(api: httpx.Client, prediction_id: str, timeout: float = 15) -> dict[str, Any]:
    """Poll the gateway until the prediction is final."""
    deadline = time.monotonic() + timeout
    while True:
        body: dict[str, Any] = api.get(f"/predictions/{prediction_id}").json()
        if body["status"] in TERMINAL:
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"prediction {prediction_id} still {body['status']}")
        time.sleep(0.1)


def release_together(count: int, request: Callable[[int], T]) -> list[T]:
    """Run `request(i)` for i in range(count) from as many threads, all released at once; their
    results in the order of `i`."""
    start = threading.Barrier(count)
    results: list[T | None] = [None] * count

    def one(i: int) -> None:
        start.wait()
        results[i] = request(i)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return cast(list[T], results)


def cli(db_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the replicate-gateway command against a database."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env["GATEWAY_DATABASE_URL"] = db_url
    return subprocess.run(
        [sys.executable, "-m", "app", *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )


def wait_until_all_final(db_url: str, timeout: float) -> float:
    """Seconds until every prediction in the database is final."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if all(p["status"] in TERMINAL for p in rows(db_url, "prediction")):
            return time.monotonic() - started
        time.sleep(0.25)
    pending = [(p["id"], p["status"], p["submission"]) for p in rows(db_url, "prediction") if p["status"] not in TERMINAL]
    raise AssertionError(f"still unfinished after {timeout} s: {pending}")


def burst(gateway: Any, secret: str, count: int, model: str = "budget/model") -> list[httpx.Response]:
    """`count` creates with `secret`, released together from as many threads."""

    def one(i: int) -> httpx.Response:
        with gateway.client(secret) as api:
            return create(api, model, i=i)

    return release_together(count, one)


def same_minute(margin: float = 10) -> None:
    """Wait for the next minute when this one ends within `margin` seconds, so the creates
    that follow all count in one rate-limit minute."""
    left = 60 - time.time() % 60
    if left < margin:
        time.sleep(left + 0.2)


def node(script: str, gateway: Any, token: str, *args: str) -> Any:
    """Run a script of tests/js with the official npm client against `gateway`; its JSON output."""
    env = {**os.environ, "GATEWAY_TOKEN": token, "GATEWAY_BASE": gateway.replicate_base + "/v1"}
    result = subprocess.run(["node", str(JS_DIR / script), *args], env=env, capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)
