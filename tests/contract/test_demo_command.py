"""The official Python client against `replicate-gateway demo`, with no other configuration."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import replicate

from tests.helpers import free_port

pytestmark = pytest.mark.contract


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """A `replicate-gateway demo` process in an empty directory; yields (base URL, token)."""
    workdir: Path = tmp_path_factory.mktemp("demo")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "REPLICATE_"))}
    process = subprocess.Popen(
        [sys.executable, "-m", "app", "demo", "--port", str(port)],
        cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        assert process.stdout is not None
        token = ""
        deadline = time.monotonic() + 30
        while not token and time.monotonic() < deadline:
            line = process.stdout.readline()
            match = re.search(r"REPLICATE_API_TOKEN=(\S+)", line)
            token = match.group(1) if match else ""
        assert token, "the demo printed no token"
        base = f"http://127.0.0.1:{port}/replicate"
        while time.monotonic() < deadline:
            try:
                httpx.get(base + "/v1/account", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        assert (workdir / "gateway.db").exists()
        yield base, token
    finally:
        process.terminate()
        process.wait(timeout=15)


@pytest.fixture
def client(demo: tuple[str, str]) -> replicate.Client:
    base, token = demo
    return replicate.Client(api_token=token, base_url=base)


def test_run_model(client: replicate.Client) -> None:
    output = client.run("black-forest-labs/flux-schnell", input={"prompt": "a lighthouse", "num_outputs": 2})
    assert len(output) == 2
    image = httpx.get(str(output[0]))
    assert image.content.startswith(b"\x89PNG")


def test_run_model_with_version(client: replicate.Client) -> None:
    version = client.models.get("demo/echo").versions.list()[0].id
    words = client.run(f"demo/echo:{version}", input={"prompt": "hello from the demo"})
    assert "".join(words) == "hello from the demo"


def test_create_wait_reload_cancel(client: replicate.Client) -> None:
    prediction = client.predictions.create(model="demo/image", input={"prompt": "x"})
    prediction.wait()
    assert prediction.status == "succeeded"
    prediction.reload()
    assert prediction.metrics["image_count"] == 1
    doomed = client.predictions.create(model="demo/image", input={"prompt": "y"})
    doomed.cancel()
    assert doomed.status == "canceled"


def test_list_pages_through_more_than_a_hundred(client: replicate.Client) -> None:
    for i in range(101):
        client.predictions.create(model="demo/image", input={"prompt": str(i)})
    seen = [p.id for page in replicate.paginate(client.predictions.list) for p in page]
    assert len(seen) == len(set(seen))
    assert len(seen) >= 101
