"""A SIGTERM drains the gateway: open event streams end with an error event, and the process exits."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import httpx

from tests.dbtools import create_token
from tests.fakes.relay import FakeRelay
from tests.processes import GatewayProcess


def test_sigterm_ends_open_streams_with_an_error_event_and_the_process_exits(
    db_url: str, relay: FakeRelay, tmp_path: Path
) -> None:
    relay.processing_seconds = 60  # the prediction outlives the gateway
    gateway = GatewayProcess(db_url=db_url, upstream_url=relay.upstream_url, upstream_token=relay.key,
                             workdir=tmp_path).start()
    assert gateway.process is not None
    try:
        secret = create_token(db_url, "streamer")
        with httpx.Client(base_url=gateway.url, headers={"Authorization": f"Bearer {secret}"}) as api:
            created = api.post("/models/llm/echo/predictions", json={"input": {"text": "a b"}, "stream": True})
        assert created.status_code == 201, created.text
        lines: list[str] = []
        opened = threading.Event()

        def read() -> None:
            with httpx.stream("GET", created.json()["urls"]["stream"], timeout=30) as response:
                opened.set()
                lines.extend(response.iter_lines())

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        assert opened.wait(5)
        time.sleep(0.5)
        stopping = time.monotonic()
        gateway.process.terminate()
        reader.join(timeout=10)
        assert not reader.is_alive(), "the stream kept the connection open through the shutdown"
        assert "event: error" in lines
        assert any(line.startswith("data: ") and "restarting" in line for line in lines)
        assert "event: done" not in lines, "the prediction has not ended"
        # uvicorn raises the signal again once it has shut down, so the exit is the signal's.
        assert gateway.process.wait(timeout=15) in (0, -signal.SIGTERM)
        assert time.monotonic() - stopping < 10
    finally:
        gateway.stop()
