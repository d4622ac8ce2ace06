"""Real `replicate-gateway serve` processes on 127.0.0.1, for crash and multi-process tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.helpers import free_port

PRICES_TOML = """
[[prices]]
model = "budget/*"
per_prediction = "0.01"

[[prices]]
model = "black-forest-labs/*"
per_prediction = "0.003"
per_second = "0.0012"
estimate = "0.006"
"""


class GatewayProcess:
    """One gateway process; `kill()` is a `kill -9`."""

    def __init__(self, *, db_url: str, upstream_url: str, upstream_token: str, workdir: Path,
                 **settings: str) -> None:
        self.port = free_port()
        prices = workdir / "prices.toml"
        prices.write_text(PRICES_TOML)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        self.env.update({
            "GATEWAY_DATABASE_URL": db_url,
            "GATEWAY_UPSTREAM_URL": upstream_url,
            "GATEWAY_UPSTREAM_TOKEN": upstream_token,
            "GATEWAY_CONFIG": str(prices),
            "GATEWAY_RECONCILE_INTERVAL": "0.2",
            "GATEWAY_CREATE_TIMEOUT": "2",
            "GATEWAY_REQUEST_TIMEOUT": "2",
            "GATEWAY_LOG_LEVEL": "WARNING",
            **{f"GATEWAY_{k.upper()}": v for k, v in settings.items()},
        })
        self.workdir = workdir
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The gateway's API base for httpx clients."""
        return f"http://127.0.0.1:{self.port}/replicate/v1"

    def start(self) -> GatewayProcess:
        """Start serving and wait until it answers."""
        self.process = subprocess.Popen(
            [sys.executable, "-m", "app", "serve", "--port", str(self.port)],
            cwd=Path(__file__).resolve().parent.parent, env=self.env,
            stdout=subprocess.DEVNULL, stderr=(self.workdir / f"gateway-{self.port}.log").open("ab"),
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the gateway exited with {self.process.returncode}")
            try:
                httpx.get(self.url + "/account", timeout=1)
                return self
            except httpx.TransportError:
                time.sleep(0.1)
        raise RuntimeError("the gateway did not start")

    def kill(self) -> None:
        """SIGKILL: no shutdown, no cleanup."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self) -> None:
        """A normal shutdown."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()
