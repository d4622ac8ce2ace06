"""The gateway benchmark: one command, everything on 127.0.0.1, stops by itself.

    python bench/run.py                      # the full run (8 s a cell, 2 rounds: about 12 minutes)
    python bench/run.py --quick              # a smoke run (2 s a cell, 1 round: about 2 minutes)
    python bench/run.py --duration 10 --rounds 3 --concurrency 64 --delays 0

It starts a fake upstream (bench/upstream.py) at 0 ms and at 50 ms of delay, nginx as a reverse
proxy in front of each, and the gateway (`python -m app serve`, fresh SQLite) in front of each,
then drives every target with wrk: the upstream directly, nginx, and the gateway, for creates and
GETs, at each concurrency and delay, rounds interleaved (direct, nginx, gateway; direct, nginx,
gateway...). It prints req/s, p50 and p99 per cell, the gateway's ratios to nginx and to the
upstream measured in the same run, whether the issue's targets are met, and writes the lot as
JSON to bench/results-latest.json. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from app.db import make_engine
from sqlalchemy import text
from sqlalchemy.engine import make_url

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
HOST = "127.0.0.1"
CREATE_BODY = '{"input": {"prompt": "a lighthouse at dusk", "num_outputs": 1, "seed": 42}}'
UPSTREAM_KEY = "bench-upstream-key"
# The targets: (scenario, concurrency, delay_ms, least gateway/nginx req/s ratio, p99 cap ms)
TARGETS = [
    ("create", 64, 0, 0.15, None),
    ("get-running", 64, 0, 0.15, None),
    ("get-finished", 64, 0, 0.25, None),
    ("create", 64, 50, 0.90, 100.0),
    ("get-running", 64, 50, 0.90, 100.0),
]

LUA = r"""
wrk.method = "%(method)s"
%(body)s
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer %(token)s"

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%%d,"duration_us":%%d,"bytes":%%d,"err_connect":%%d,"err_read":%%d,' ..
    '"err_write":%%d,"err_status":%%d,"err_timeout":%%d,"p50_us":%%d,"p90_us":%%d,"p99_us":%%d,' ..
    '"max_us":%%d,"mean_us":%%.1f}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, latency.mean))
end
"""

# The gateway's running GETs cycle through this many predictions, half for each wrk thread, so no
# two requests in flight ask for the same one: the gateway shares one upstream read among polls of
# one prediction that arrive together, which would otherwise be measured instead of a read each.
RUNNING_SPREAD = 128

SPREAD_LUA = r"""
ids = {%(ids)s}
threads_seen = 0
setup = function(thread)
  thread:set("part", threads_seen)
  threads_seen = threads_seen + 1
end
sent = 0
request = function()
  local half = #ids / 2
  sent = sent + 1
  return wrk.format(nil, "%(prefix)s" .. ids[(part %% 2) * half + (sent %% half) + 1])
end
"""

NGINX_CONF = """
worker_processes 1;
daemon off;
master_process on;
pid %(dir)s/nginx.pid;
error_log %(dir)s/nginx-error.log warn;
events { worker_connections 4096; multi_accept on; }
http {
  access_log off;
  client_body_temp_path %(dir)s/client_body;
  proxy_temp_path %(dir)s/proxy;
  fastcgi_temp_path %(dir)s/fastcgi;
  uwsgi_temp_path %(dir)s/uwsgi;
  scgi_temp_path %(dir)s/scgi;
  keepalive_requests 1000000;
  %(servers)s
}
"""

NGINX_SERVER = """
  upstream relay_%(name)s { server 127.0.0.1:%(upstream)d; keepalive 256; keepalive_requests 1000000; }
  server {
    listen 127.0.0.1:%(port)d reuseport backlog=4096;
    location /replicate/ {
      proxy_pass http://relay_%(name)s;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Authorization "Bearer %(key)s";
    }
  }
"""


# ----------------------------------------------------------------------------- processes


class Processes:
    """Every process this run started, each in its own process group; all stopped at the end."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, argv: list[str], *, cpus: str | None, log: Path, **kwargs: Any) -> subprocess.Popen[bytes]:
        if cpus and shutil.which("taskset"):
            argv = ["taskset", "-c", cpus, *argv]
        handle = open(log, "wb")  # noqa: SIM115  (closed with the process)
        proc = subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True, **kwargs)
        handle.close()
        self.procs.append((name, proc))
        return proc

    def stop_all(self) -> None:
        # Newest first, each given time to exit before the next: the gateways finish their
        # reconciler pass while the upstream they poll is still up.
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGCONT)
                    os.killpg(proc.pid, signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=20)
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.procs.clear()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process for port {port} exited ({proc.returncode}):\n{tail(log)}")
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=0.5):
            return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {HOST}:{port} after {timeout} s:\n{tail(log)}")


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def cpu_ticks(pids: list[int]) -> int:
    """utime + stime of these processes (all their threads), in clock ticks."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
    return found


def http(method: str, url: str, token: str | None = None, body: str | None = None) -> tuple[int, Any]:
    assert url.startswith(f"http://{HOST}:"), url  # noqa: S101  (loopback only)
    request = urllib.request.Request(url, method=method, data=body.encode() if body else None)  # noqa: S310
    request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


# ----------------------------------------------------------------------------- tools


def ensure_tools() -> tuple[str, str]:
    """wrk and nginx from Debian's packages, installed with apt-get if missing."""
    def find() -> tuple[str | None, str | None]:
        nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
        return shutil.which("wrk"), nginx

    wrk, nginx = find()
    if wrk and nginx:
        return wrk, nginx
    if os.geteuid() != 0:
        raise SystemExit("bench: wrk and nginx are needed: sudo apt-get install -y wrk nginx")
    packages = [name for name, path in (("wrk", wrk), ("nginx", nginx)) if not path]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    print(f"bench: installing {' '.join(packages)} with apt-get", flush=True)
    install = ["apt-get", "install", "-y", "--no-install-recommends", *packages]
    if subprocess.run(install, env=env, check=False, stdout=subprocess.DEVNULL).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, check=True, stdout=subprocess.DEVNULL)
        subprocess.run(install, env=env, check=True, stdout=subprocess.DEVNULL)
    wrk, nginx = find()
    if not (wrk and nginx):
        raise SystemExit("bench: wrk or nginx is still missing after apt-get install")
    return wrk, nginx


def versions(nginx: str) -> dict[str, str]:
    from importlib import metadata

    found = {"python": platform.python_version()}
    for name in ("uvicorn", "httpx", "fastapi", "starlette", "sqlalchemy", "aiosqlite", "orjson", "uvloop",
                 "httptools", "pydantic", "aiohttp", "httpx-aiohttp"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[name] = metadata.version(name)
    out = subprocess.run([nginx, "-v"], capture_output=True, text=True, check=False)
    found["nginx"] = (out.stderr or out.stdout).strip().split("/")[-1]
    out = subprocess.run(["wrk", "-v"], capture_output=True, text=True, check=False)
    found["wrk"] = (out.stdout or out.stderr).split("\n")[0].strip()
    return found


def machine() -> dict[str, Any]:
    facts: dict[str, Any] = {"nproc": os.cpu_count(), "kernel": platform.release()}
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                facts["memory_gib"] = round(int(line.split()[1]) / 1024 / 1024, 1)
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                facts["cpu"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(Exception):
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, check=False).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "app"],
                               capture_output=True, text=True, check=False).stdout.strip()
        facts["commit"] = commit + (" (app/ modified)" if dirty else "")
    return facts


# ----------------------------------------------------------------------------- targets


@dataclass
class Target:
    name: str  # direct, nginx, gateway, floor
    delay_ms: int
    port: int
    pids: list[int]  # whose CPU counts as this target's
    token: str = ""
    ids: dict[str, str] = field(default_factory=dict)  # scenario -> prediction id to GET
    running: list[str] = field(default_factory=list)  # the gateway's running GETs cycle through these
    pause: list[int] = field(default_factory=list)  # process groups stopped while idle


@dataclass
class Cell:
    target: str
    scenario: str
    concurrency: int
    delay_ms: int
    round: int
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    requests: int
    errors: int
    error_detail: dict[str, int]
    proxy_cpu_pct: float
    upstream_cpu_pct: float
    settle_s: float = 0.0
    rss_mib: float = 0.0  # the target's first process, right after the cell


def start_upstreams(procs: Processes, tmp: Path, delays: list[int], cpus: str | None) -> dict[int, tuple[int, int]]:
    found = {}
    for delay in delays:
        port = free_port()
        log = tmp / f"upstream-{delay}.log"
        proc = procs.start(f"upstream-{delay}", [sys.executable, str(BENCH / "upstream.py"), "--port", str(port),
                                                 "--delay-ms", str(delay)], cpus=cpus, log=log)
        wait_for_port(port, proc, log)
        found[delay] = (port, proc.pid)
    return found


def start_nginx(procs: Processes, tmp: Path, nginx: str, upstreams: dict[int, tuple[int, int]],
                cpus: str | None) -> dict[int, tuple[int, list[int]]]:
    ngx = tmp / "nginx"
    ngx.mkdir()
    ports = {delay: free_port() for delay in upstreams}
    servers = "".join(NGINX_SERVER % {"name": f"d{delay}", "upstream": upstreams[delay][0], "port": ports[delay],
                                      "key": UPSTREAM_KEY} for delay in upstreams)
    conf = ngx / "nginx.conf"
    conf.write_text(NGINX_CONF % {"dir": ngx, "servers": servers})
    log = tmp / "nginx.log"
    proc = procs.start("nginx", [nginx, "-p", str(ngx), "-c", str(conf), "-e", str(ngx / "nginx-error.log")],
                       cpus=cpus, log=log)
    for port in ports.values():
        wait_for_port(port, proc, log)
    time.sleep(0.3)
    pids = [proc.pid, *children_of(proc.pid)]
    return {delay: (ports[delay], pids) for delay in upstreams}


def gateway_env(tmp: Path, delay: int, upstream_port: int, database_url: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update({
        "GATEWAY_DATABASE_URL": database_url or sqlite_url(tmp, delay),
        "GATEWAY_UPSTREAM_URL": f"http://{HOST}:{upstream_port}/replicate",
        "GATEWAY_UPSTREAM_TOKEN": UPSTREAM_KEY,
        "GATEWAY_LOG_LEVEL": "WARNING",  # uvicorn's access log goes through the app's logging at INFO
        "GATEWAY_STORAGE_DIR": str(tmp / f"storage-{delay}"),
        "PYTHONPATH": str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
    })
    return env


def sqlite_ledger(tmp: Path, delay: int) -> Path:
    """The gateway's SQLite ledger in the temp dir (the default)."""
    return tmp / f"gateway-{delay}.db"


def sqlite_url(tmp: Path, delay: int) -> str:
    return f"sqlite:///{sqlite_ledger(tmp, delay)}"


def local_postgres(url: str) -> str:
    """`url` if it names a PostgreSQL server on this machine; the benchmark talks to nothing else."""
    parsed = make_url(url)
    if not parsed.drivername.startswith("postgres") or parsed.host not in (HOST, "localhost"):
        raise SystemExit(f"bench: --postgres wants a postgresql:// URL on {HOST}, not {parsed.host!r}")
    return url


def on_postgres(url: str, statement: str) -> Any:
    """Run one statement, outside a transaction (as CREATE and DROP DATABASE must be), on the database
    of `url`; returns the first column of its first row, if it has rows."""

    async def run() -> Any:
        engine = make_engine(url, isolation_level="AUTOCOMMIT")
        try:
            async with engine.connect() as connection:
                result = await connection.execute(text(statement))
                return result.scalar() if result.returns_rows else None
        finally:
            await engine.dispose()

    return asyncio.run(run())


def fresh_postgres_database(server_url: str, name: str) -> str:
    """An empty database `name` on the server of `server_url` (dropped first if left over); its URL."""
    on_postgres(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    on_postgres(server_url, f'CREATE DATABASE "{name}"')
    return make_url(server_url).set(database=name).render_as_string(hide_password=False)


def prepare_ledger(env: dict[str, str], tmp: Path) -> str:
    """Migrate the gateway's database and create a token in it; returns the token."""
    # cwd is the temp dir so that no .env file of the checkout is read.
    run = {"env": env, "cwd": tmp, "capture_output": True, "text": True, "check": False}
    out = subprocess.run([sys.executable, "-m", "app", "migrate"], **run)
    if out.returncode != 0:
        raise RuntimeError(f"gateway migrate failed:\n{out.stderr[-3000:]}")
    out = subprocess.run([sys.executable, "-m", "app", "tokens", "create", "bench", "--json"], **run)
    if out.returncode != 0:
        raise RuntimeError(f"gateway tokens create failed:\n{out.stderr[-3000:]}")
    return str(json.loads(out.stdout.strip().splitlines()[-1])["token"])


def start_gateway(procs: Processes, tmp: Path, delay: int, upstream_port: int, cpus: str | None,
                  transport: str = "httpx", what_if: str = "none", database_url: str | None = None) -> Target:
    env = gateway_env(tmp, delay, upstream_port, database_url)
    token = prepare_ledger(env, tmp)
    port = free_port()
    log = tmp / f"gateway-{delay}.log"
    argv = [sys.executable, "-m", "app", "serve", "--host", HOST, "--port", str(port)]
    if transport != "httpx" or what_if != "none":  # the same serve, through bench/gateway_serve.py
        argv = [sys.executable, str(BENCH / "gateway_serve.py"), "--transport", transport, "--what-if", what_if,
                "--host", HOST, "--port", str(port)]
    proc = procs.start(f"gateway-{delay}", argv, cpus=cpus, log=log, env=env, cwd=tmp)
    wait_for_port(port, proc, log)
    base = f"http://{HOST}:{port}/replicate/v1"
    spread = []
    for _ in range(RUNNING_SPREAD):
        status, running = http("POST", f"{base}/models/bench/running/predictions", token, CREATE_BODY)
        if status != 201 or running.get("status") != "starting":
            raise RuntimeError(f"gateway create of a running prediction: {status} {running}\n{tail(log)}")
        spread.append(running["id"])
    status, finished = http("POST", f"{base}/models/bench/finished/predictions", token, CREATE_BODY)
    if status != 201 or finished.get("status") != "succeeded":
        raise RuntimeError(f"gateway create of the finished prediction: {status} {finished}\n{tail(log)}")
    # The checks that make each scenario what it claims to be.
    for running_id in spread:
        status, body = http("GET", f"{base}/predictions/{running_id}", token)
        if status != 200 or body["status"] != "processing" or not body["urls"]["get"].startswith(f"http://{HOST}:{port}/"):
            raise RuntimeError(f"GET of a running prediction: {status} {body}")
    status, body = http("GET", f"{base}/predictions/{finished['id']}", token)
    if status != 200 or body["status"] != "succeeded":
        raise RuntimeError(f"GET of the finished prediction: {status} {body}")
    return Target("gateway", delay, port, [proc.pid], token=token,
                  ids={"get-running": spread[0], "get-finished": finished["id"]}, running=spread, pause=[proc.pid])


def start_floor(procs: Processes, tmp: Path, delay: int, upstream_port: int, cpus: str | None) -> Target:
    """bench/floor.py (creates only) on a ledger of its own, made and given a token by the gateway's CLI."""
    work = tmp / f"floor-{delay}"
    work.mkdir()
    env = gateway_env(work, delay, upstream_port)
    token = prepare_ledger(env, work)
    env["BENCH_FLOOR_UPSTREAM_KEY"] = UPSTREAM_KEY
    port = free_port()
    log = tmp / f"floor-{delay}.log"
    proc = procs.start(f"floor-{delay}", [sys.executable, str(BENCH / "floor.py"), "--database",
                                          str(sqlite_ledger(work, delay)), "--upstream",
                                          f"http://{HOST}:{upstream_port}/replicate", "--port", str(port)],
                       cpus=cpus, log=log, env=env, cwd=work)
    wait_for_port(port, proc, log)
    status, body = http("POST", f"http://{HOST}:{port}/replicate/v1/models/bench/load/predictions", token,
                        CREATE_BODY)
    if status != 201 or body.get("status") != "starting":
        raise RuntimeError(f"floor create: {status} {body}\n{tail(log)}")
    return Target("floor", delay, port, [proc.pid], token=token, pause=[proc.pid])


def upstream_prediction(port: int) -> str:
    status, body = http("POST", f"http://{HOST}:{port}/replicate/v1/models/bench/running/predictions",
                        UPSTREAM_KEY, CREATE_BODY)
    if status != 201:
        raise RuntimeError(f"upstream create: {status} {body}")
    return str(body["id"])


# ----------------------------------------------------------------------------- wrk


def rss_mib(pid: int) -> float:
    """A process's resident memory (VmRSS) in MiB; 0 when it cannot be read."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def memory_report(cells: list[Cell]) -> tuple[list[str], dict[str, object]]:
    """Each gateway's RSS over the run: first, peak and last sample, and the growth over the
    second half (a leak keeps growing once pools and caches are warm)."""
    lines, found = [], {}
    for delay in sorted({c.delay_ms for c in cells if c.target == "gateway"}):
        samples = [c.rss_mib for c in cells if c.target == "gateway" and c.delay_ms == delay and c.rss_mib]
        if not samples:
            continue
        half = samples[len(samples) // 2:]
        growth = half[-1] - half[0]
        found[str(delay)] = {"first_mib": round(samples[0], 1), "peak_mib": round(max(samples), 1),
                             "last_mib": round(samples[-1], 1), "second_half_growth_mib": round(growth, 1),
                             "samples": len(samples)}
        lines.append(f"  gateway behind the {delay} ms relay: RSS first {samples[0]:.1f} MiB, peak "
                     f"{max(samples):.1f} MiB, last {samples[-1]:.1f} MiB; second half {growth:+.1f} MiB "
                     f"over {len(half)} cells (target: under 150 MiB, no growth)")
    return lines, found


def wrk_cell(wrk: str, tmp: Path, target: Target, scenario: str, concurrency: int, duration: float,
             cpus: str | None, upstream_pid: int, rnd: int) -> Cell:
    base = f"http://{HOST}:{target.port}/replicate/v1"
    if scenario == "create":
        url, method = f"{base}/models/bench/load/predictions", "POST"
        body = f"wrk.body = '{CREATE_BODY}'"
    else:
        url, method, body = f"{base}/predictions/{target.ids[scenario]}", "GET", "wrk.body = nil"
    token = target.token or UPSTREAM_KEY
    script = tmp / f"{target.name}-{scenario}.lua"
    lua = LUA % {"method": method, "body": body, "token": token}
    if scenario == "get-running" and target.running:
        lua += SPREAD_LUA % {"ids": ", ".join(f'"{i}"' for i in target.running), "prefix": "/replicate/v1/predictions/"}
    script.write_text(lua)
    threads = min(2, concurrency)
    argv = [wrk, f"-t{threads}", f"-c{concurrency}", f"-d{max(1, round(duration))}s", "--timeout", "5s", "-s", str(script), url]
    if cpus and shutil.which("taskset"):
        argv = ["taskset", "-c", cpus, *argv]
    for group in target.pause:
        os.killpg(group, signal.SIGCONT)
    try:
        proxy_before, upstream_before, t0 = cpu_ticks(target.pids), cpu_ticks([upstream_pid]), time.monotonic()
        out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 30, check=False)
        elapsed = time.monotonic() - t0
        proxy_ticks = cpu_ticks(target.pids) - proxy_before
        upstream_ticks = cpu_ticks([upstream_pid]) - upstream_before
        settled = settle(target) if target.pause else 0.0
        memory = rss_mib(target.pids[0])
    finally:
        for group in target.pause:
            os.killpg(group, signal.SIGSTOP)
    line = next((x for x in out.stdout.splitlines() if x.startswith("BENCH_JSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk gave no result for {target.name} {scenario}:\n{out.stdout}\n{out.stderr}")
    data = json.loads(line.split(" ", 1)[1])
    hz = os.sysconf("SC_CLK_TCK")
    errors = {k[4:]: v for k, v in data.items() if k.startswith("err_") and v}
    return Cell(
        target=target.name if target.name != "direct" else "direct", scenario=scenario, concurrency=concurrency,
        delay_ms=target.delay_ms, round=rnd,
        rps=round(data["requests"] / (data["duration_us"] / 1e6), 1),
        p50_ms=data["p50_us"] / 1000, p90_ms=data["p90_us"] / 1000, p99_ms=data["p99_us"] / 1000,
        max_ms=data["max_us"] / 1000, requests=data["requests"], errors=sum(errors.values()),
        error_detail=errors,
        proxy_cpu_pct=round(100 * proxy_ticks / hz / elapsed, 1) if target.name != "direct" else 0.0,
        upstream_cpu_pct=round(100 * upstream_ticks / hz / elapsed, 1), settle_s=settled, rss_mib=round(memory, 1),
    )


def settle(target: Target, quiet_pct: float = 30.0, limit_s: float = 30.0) -> float:
    """Wait until the target's processes are nearly idle (< quiet_pct of a core over 0.5 s):
    requests wrk gave up on (the gateway queues them for a database connection for up to 30 s)
    must not spill into the next cell. Returns the seconds waited."""
    hz = os.sysconf("SC_CLK_TCK")
    start = time.monotonic()
    while time.monotonic() - start < limit_s:
        before = cpu_ticks(target.pids)
        time.sleep(0.5)
        if 100 * (cpu_ticks(target.pids) - before) / hz / 0.5 < quiet_pct:
            break
    return round(time.monotonic() - start, 1)


def profile(out: Path, wrk: str, tmp: Path, target: Target, concurrency: int, duration: int,
            load_cpus: str | None, upstream_pid: int) -> None:
    """One cell per gateway scenario under `py-spy record` (raw collapsed stacks, 100 Hz, one root
    frame per thread); summarise with `bench/pyspy_summary.py FILE --thread MainThread`."""
    spy = shutil.which("py-spy")
    if spy is None:
        print("bench: --profile needs py-spy (pip install py-spy); skipped", file=sys.stderr)
        return
    out.mkdir(parents=True, exist_ok=True)
    for scenario in ("create", "get-running", "get-finished"):
        path = out / f"gateway-{scenario}-c{concurrency}.txt"
        for group in target.pause:
            os.killpg(group, signal.SIGCONT)
        recorder = subprocess.Popen([spy, "record", "-p", str(target.pids[0]), "-d", str(duration + 1), "-r", "100",
                                     "--threads", "--nonblocking", "-f", "raw", "-o", str(path)], stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        cell = wrk_cell(wrk, tmp, target, scenario, concurrency, duration, load_cpus, upstream_pid, 0)
        recorder.wait(timeout=duration + 30)
        print(f"profiled {scenario}: {cell.rps:,.0f} req/s under py-spy -> {path}", flush=True)


# ----------------------------------------------------------------------------- report


def median_cells(cells: list[Cell]) -> dict[tuple[str, str, int, int], dict[str, Any]]:
    groups: dict[tuple[str, str, int, int], list[Cell]] = {}
    for cell in cells:
        groups.setdefault((cell.target, cell.scenario, cell.concurrency, cell.delay_ms), []).append(cell)
    summary = {}
    for key, group in groups.items():
        summary[key] = {
            "rps": round(statistics.median(c.rps for c in group), 1),
            "rps_min": min(c.rps for c in group),
            "rps_max": max(c.rps for c in group),
            "p50_ms": round(statistics.median(c.p50_ms for c in group), 2),
            "p99_ms": round(statistics.median(c.p99_ms for c in group), 2),
            "errors": sum(c.errors for c in group),
            "requests": sum(c.requests for c in group),
            "proxy_cpu_pct": round(statistics.median(c.proxy_cpu_pct for c in group), 1),
            "upstream_cpu_pct": round(statistics.median(c.upstream_cpu_pct for c in group), 1),
            "rounds": len(group),
        }
    return summary


def reference_scenario(scenario: str) -> str:
    """What nginx and the upstream run for a gateway scenario: creates, or the upstream's GET."""
    return "create" if scenario == "create" else "get"


def report(summary: dict[tuple[str, str, int, int], dict[str, Any]], delays: list[int],
           concurrencies: list[int]) -> tuple[str, list[dict[str, Any]], list[dict[str, Any]]]:
    lines = []
    rows = []
    head = (f"{'delay':>5} {'scenario':<13} {'c':>3} | {'direct req/s':>12} {'p50':>6} {'p99':>6} | "
            f"{'nginx req/s':>11} {'p50':>6} {'p99':>6} | {'gateway req/s':>13} {'p50':>6} {'p99':>7} "
            f"{'cpu%':>5} | {'gw/nginx':>8} {'gw/direct':>9}")
    lines += [head, "-" * len(head)]
    for delay in delays:
        for scenario in ("create", "get-running", "get-finished"):
            for conc in concurrencies:
                gw = summary.get(("gateway", scenario, conc, delay))
                if gw is None:
                    continue
                ref = reference_scenario(scenario)
                direct = summary.get(("direct", ref, conc, delay))
                ngx = summary.get(("nginx", ref, conc, delay))
                vs_nginx = gw["rps"] / ngx["rps"] if ngx and ngx["rps"] else None
                vs_direct = gw["rps"] / direct["rps"] if direct and direct["rps"] else None
                flag = " ERRORS" if gw["errors"] or (ngx and ngx["errors"]) or (direct and direct["errors"]) else ""

                def cols(s: dict[str, Any] | None, width: int) -> str:
                    if s is None:
                        return f"{'-':>{width}} {'-':>6} {'-':>6}"
                    return f"{s['rps']:>{width},.0f} {s['p50_ms']:>6.1f} {s['p99_ms']:>6.1f}"

                lines.append(
                    f"{delay:>5} {scenario:<13} {conc:>3} | {cols(direct, 12)} | {cols(ngx, 11)} | "
                    f"{gw['rps']:>13,.0f} {gw['p50_ms']:>6.1f} {gw['p99_ms']:>7.1f} {gw['proxy_cpu_pct']:>5.0f} | "
                    f"{(vs_nginx or 0):>8.3f} {(vs_direct or 0):>9.3f}{flag}")
                rows.append({
                    "delay_ms": delay, "scenario": scenario, "concurrency": conc,
                    "direct": direct, "nginx": ngx, "gateway": gw,
                    "gateway_vs_nginx": round(vs_nginx, 4) if vs_nginx else None,
                    "gateway_vs_direct": round(vs_direct, 4) if vs_direct else None,
                })
    verdicts = []
    for scenario, conc, delay, least, p99_cap in TARGETS:
        row = next((r for r in rows if (r["scenario"], r["concurrency"], r["delay_ms"]) == (scenario, conc, delay)), None)
        if row is None or row["gateway_vs_nginx"] is None:
            continue
        ratio, p99 = row["gateway_vs_nginx"], row["gateway"]["p99_ms"]
        met = ratio >= least and (p99_cap is None or p99 < p99_cap) and not row["gateway"]["errors"]
        want = f">= {least:.0%} of nginx" + (f", p99 < {p99_cap:.0f} ms" if p99_cap else "")
        got = f"{ratio:.1%} of nginx" + (f", p99 {p99:.1f} ms" if p99_cap else "")
        verdicts.append({"scenario": scenario, "concurrency": conc, "delay_ms": delay, "want": want, "got": got,
                         "met": met})
    lines.append("")
    lines.append("Targets (concurrency 64):" if verdicts else "Targets: not measured (they need concurrency 64)")
    for v in verdicts:
        lines.append(f"  {v['scenario']:<13} {v['delay_ms']:>2} ms: want {v['want']:<32} got {v['got']:<30} "
                     f"{'MET' if v['met'] else 'NOT MET'}")
    return "\n".join(lines), rows, verdicts


def floor_report(summary: dict[tuple[str, str, int, int], dict[str, Any]], delays: list[int],
                 concurrencies: list[int]) -> tuple[str, list[dict[str, Any]]]:
    """The creates of bench/floor.py next to the gateway's and nginx's: CPU a create (µs) and the
    latency each adds over direct (ms, p50 / p99)."""
    def per_request(s: dict[str, Any]) -> float:
        return round(s["proxy_cpu_pct"] * 1e4 / s["rps"], 1) if s["rps"] else 0.0

    def added(s: dict[str, Any] | None, direct: dict[str, Any] | None) -> str:
        if s is None or direct is None:
            return "-"
        return f"{s['p50_ms'] - direct['p50_ms']:+.2f} / {s['p99_ms'] - direct['p99_ms']:+.2f}"

    rows, lines = [], []
    for delay in delays:
        for conc in concurrencies:
            floor = summary.get(("floor", "create", conc, delay))
            if floor is None:
                continue
            gw = summary.get(("gateway", "create", conc, delay))
            ngx = summary.get(("nginx", "create", conc, delay))
            direct = summary.get(("direct", "create", conc, delay))
            rows.append({
                "delay_ms": delay, "concurrency": conc, "floor": floor,
                "floor_cpu_us": per_request(floor), "gateway_cpu_us": per_request(gw) if gw else None,
                "floor_vs_nginx": round(floor["rps"] / ngx["rps"], 4) if ngx and ngx["rps"] else None,
                "gateway_vs_floor": round(gw["rps"] / floor["rps"], 4) if gw and floor["rps"] else None,
                "floor_added_ms": added(floor, direct), "gateway_added_ms": added(gw, direct),
            })
    if rows:
        head = (f"{'delay':>5} {'c':>3} | {'floor req/s':>11} {'p50':>6} {'p99':>6} {'µs/create':>9} "
                f"{'floor/nginx':>11} | {'gateway µs/create':>17} {'gw/floor':>8} | added over direct, floor / gateway")
        lines += [head, "-" * len(head)]
        for row in rows:
            floor = row["floor"]
            lines.append(
                f"{row['delay_ms']:>5} {row['concurrency']:>3} | {floor['rps']:>11,.0f} {floor['p50_ms']:>6.2f} "
                f"{floor['p99_ms']:>6.2f} {row['floor_cpu_us']:>9.0f} {row['floor_vs_nginx'] or 0:>11.3f} | "
                f"{row['gateway_cpu_us'] or 0:>17.0f} {row['gateway_vs_floor'] or 0:>8.3f} | "
                f"{row['floor_added_ms']} ms, {row['gateway_added_ms']} ms")
    return "\n".join(lines), rows


def ms(value: float) -> str:
    return f"{value:.2f}" if value < 1 else f"{value:.1f}" if value < 1000 else f"{value:,.0f}"


def markdown(result: dict[str, Any]) -> str:
    def cell(s: dict[str, Any] | None) -> str:
        return "-" if s is None else f"{s['rps']:,.0f} | {ms(s['p50_ms'])} | {ms(s['p99_ms'])}"

    lines = ["| delay | scenario | c | direct req/s | p50 | p99 | nginx req/s | p50 | p99 | gateway req/s | p50 | p99 "
             "| gw cpu% | gw/nginx | gw/direct |", "|" + "---|" * 15]
    for row in result["rows"]:
        gw = row["gateway"]
        err = f" ({gw['errors']} err)" if gw["errors"] else ""
        lines.append(f"| {row['delay_ms']} ms | {row['scenario']} | {row['concurrency']} | {cell(row['direct'])} | "
                     f"{cell(row['nginx'])} | {gw['rps']:,.0f}{err} | {ms(gw['p50_ms'])} | {ms(gw['p99_ms'])} | "
                     f"{gw['proxy_cpu_pct']:.0f} | {row['gateway_vs_nginx'] or 0:.3f} | {row['gateway_vs_direct'] or 0:.3f} |")
    if result.get("floor"):
        lines += ["", "| delay | c | floor req/s | p50 | p99 | floor µs/create | floor/nginx | gateway µs/create "
                  "| gw/floor | added over direct (p50 / p99 ms): floor | gateway |", "|" + "---|" * 11]
        for row in result["floor"]:
            floor = row["floor"]
            lines.append(f"| {row['delay_ms']} ms | {row['concurrency']} | {floor['rps']:,.0f} | {ms(floor['p50_ms'])} | "
                         f"{ms(floor['p99_ms'])} | {row['floor_cpu_us']:.0f} | {row['floor_vs_nginx'] or 0:.3f} | "
                         f"{row['gateway_cpu_us'] or 0:.0f} | {row['gateway_vs_floor'] or 0:.3f} | "
                         f"{row['floor_added_ms']} | {row['gateway_added_ms']} |")
    lines += ["", "| target | want | got | |", "|---|---|---|---|"]
    for v in result["targets"]:
        lines.append(f"| {v['scenario']}, c{v['concurrency']}, {v['delay_ms']} ms | {v['want']} | {v['got']} | "
                     f"{'met' if v['met'] else '**not met**'} |")
    return "\n".join(lines)


# The running predictions the GET cells read are meant to stay unfinished: not a backlog.
BACKLOG_SQL = "select count(*) from prediction where status in ('starting', 'processing') and model != 'bench/running'"


def backlog(database_url: str) -> int | None:
    """Predictions the gateway had not settled when the run ended (None if the ledger cannot be read)."""
    if database_url.startswith("sqlite:///"):
        db = database_url.removeprefix("sqlite:///")
        with contextlib.suppress(sqlite3.Error), \
                contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as conn:
            return int(conn.execute(BACKLOG_SQL).fetchone()[0])
        return None
    with contextlib.suppress(Exception):
        return int(on_postgres(database_url, BACKLOG_SQL) or 0)
    return None


# ----------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2 s a cell, 1 round")
    parser.add_argument("--duration", type=int, default=None, help="seconds per cell (default 8; 2 with --quick)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds, interleaved (default 2; 1 with --quick)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--delays", type=int, nargs="+", default=[0, 50], help="upstream delays, ms")
    parser.add_argument("--scenarios", nargs="+", choices=("create", "get-running", "get-finished"),
                        default=["create", "get-running", "get-finished"], help="scenarios measured (default: all)")
    parser.add_argument("--targets", nargs="+", default=["direct", "nginx", "gateway"],
                        choices=["direct", "nginx", "gateway"])
    parser.add_argument("--finished-at-every-delay", action="store_true",
                        help="also run get-finished at delays other than 0 (served from the ledger: the delay "
                             "does not reach it)")
    parser.add_argument("--proxy-cpus", default="0", help="taskset list for nginx and the gateway ('' = none)")
    parser.add_argument("--load-cpus", default="1", help="taskset list for wrk and the fake upstream ('' = none)")
    parser.add_argument("--gateway-transport", choices=("httpx", "aiohttp"), default="httpx",
                        help="httpx: `python -m app serve` as shipped; aiohttp: the same app with the transport "
                             "recommended in RESULTS.md (bench/gateway_serve.py)")
    parser.add_argument("--what-if", choices=("none", "cache", "cache-inline"), default="none",
                        help="cache: monkeypatch an auth cache and a final-prediction cache into the gateway "
                             "(a measurement aid; see bench/gateway_serve.py); cache-inline: also runs the sync "
                             "dependencies inline (as `async def` would)")
    parser.add_argument("--floor", action="store_true",
                        help="also measure bench/floor.py (the least a create can cost in Python here) in the "
                             "create cells")
    parser.add_argument("--postgres", default=None, metavar="URL",
                        help="the gateways' ledgers on this PostgreSQL server (on 127.0.0.1) instead of SQLite: a "
                             "fresh database per gateway, created through URL's database and dropped at the end")
    parser.add_argument("--profile", type=Path, default=None, metavar="DIR",
                        help="after the measured cells, run each gateway scenario once more at the highest "
                             "concurrency, 0 ms, under py-spy (pip install py-spy), writing DIR/*.txt")
    parser.add_argument("--output", type=Path, default=BENCH / "results-latest.json")
    parser.add_argument("--markdown", type=Path, default=None, metavar="JSON",
                        help="print a results JSON as the Markdown table of bench/RESULTS.md, run nothing")
    parser.add_argument("--keep-temp", action="store_true", help="keep the temp dir (logs, databases)")
    args = parser.parse_args()
    if args.markdown:
        print(markdown(json.loads(args.markdown.read_text())))
        return 0
    if args.postgres and args.floor:
        parser.error("--floor measures a SQLite ledger; it cannot be combined with --postgres")
    server_url = local_postgres(args.postgres) if args.postgres else None
    duration = args.duration or (2 if args.quick else 8)
    rounds = args.rounds or (1 if args.quick else 2)
    ncpu = os.cpu_count() or 1
    proxy_cpus = args.proxy_cpus if ncpu >= 2 and args.proxy_cpus else None
    load_cpus = args.load_cpus if ncpu >= 2 and args.load_cpus else None

    wrk, nginx = ensure_tools()
    facts = machine()  # before the gateways start: the commit (and local changes) they run
    procs = Processes()
    tmp = Path(tempfile.mkdtemp(prefix="gateway-bench-"))

    def interrupted(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    cells: list[Cell] = []
    ledgers: dict[int, str] = {}
    try:
        upstreams = start_upstreams(procs, tmp, args.delays, load_cpus)
        targets: dict[tuple[str, int], Target] = {}
        ids = {delay: upstream_prediction(port) for delay, (port, _) in upstreams.items()}
        for delay, (port, pid) in upstreams.items():
            if "direct" in args.targets:
                targets["direct", delay] = Target("direct", delay, port, [pid], ids={"get": ids[delay]})
        if "nginx" in args.targets:
            for delay, (port, pids) in start_nginx(procs, tmp, nginx, upstreams, proxy_cpus).items():
                targets["nginx", delay] = Target("nginx", delay, port, pids, ids={"get": ids[delay]})
        if "gateway" in args.targets:
            for delay, (port, _) in upstreams.items():
                ledgers[delay] = sqlite_url(tmp, delay) if server_url is None else \
                    fresh_postgres_database(server_url, f"gateway_bench_{delay}ms_{os.getpid()}")
                targets["gateway", delay] = start_gateway(procs, tmp, delay, port, proxy_cpus, args.gateway_transport,
                                                          args.what_if, ledgers[delay])
        names = list(args.targets)
        if args.floor:
            names.append("floor")
            for delay, (port, _) in upstreams.items():
                targets["floor", delay] = start_floor(procs, tmp, delay, port, proxy_cpus)
        for target in targets.values():
            for group in target.pause:
                os.killpg(group, signal.SIGSTOP)

        plan = []
        for rnd in range(1, rounds + 1):
            for delay in args.delays:
                for conc in args.concurrency:
                    for scenario in args.scenarios:
                        if scenario == "get-finished" and delay != args.delays[0] and not args.finished_at_every_delay:
                            continue
                        for name in names:
                            if (name != "gateway" and scenario == "get-finished") or (
                                    name == "floor" and scenario != "create"):
                                continue
                            plan.append((rnd, delay, conc, scenario, name))
        print(f"bench: {len(plan)} cells of {duration:g} s ({rounds} round(s)), about "
              f"{len(plan) * (duration + 0.6) / 60:.1f} min; proxies on cpu {proxy_cpus}, wrk and upstream on cpu "
              f"{load_cpus}; logs in {tmp}", flush=True)
        # Warm each target up (imports, pools, first queries) before anything is recorded.
        for (name, delay), target in targets.items():
            for scenario in {"gateway": ("create", "get-running"), "floor": ("create",)}.get(name, ("create", "get")):
                wrk_cell(wrk, tmp, target, scenario, 16, 1, load_cpus, upstreams[delay][1], 0)
        for i, (rnd, delay, conc, scenario, name) in enumerate(plan, 1):
            target = targets[name, delay]
            run_scenario = scenario if name == "gateway" else reference_scenario(scenario)
            cell = wrk_cell(wrk, tmp, target, run_scenario, conc, duration, load_cpus, upstreams[delay][1], rnd)
            cell.scenario = run_scenario
            cells.append(cell)
            err = f"  ERRORS {cell.error_detail}" if cell.errors else ""
            print(f"[{i:>3}/{len(plan)}] r{rnd} {delay:>2} ms c{conc:<3} {name:<8} {run_scenario:<13} "
                  f"{cell.rps:>9,.0f} req/s  p50 {cell.p50_ms:7.2f} ms  p99 {cell.p99_ms:7.2f} ms  "
                  f"cpu {cell.proxy_cpu_pct:5.1f}%  upstream cpu {cell.upstream_cpu_pct:5.1f}%"
                  + (f"  settled in {cell.settle_s:.1f} s" if cell.settle_s > 0.6 else "") + err, flush=True)
            time.sleep(0.5)
        if args.profile and ("gateway", args.delays[0]) in targets:
            profile(args.profile, wrk, tmp, targets["gateway", args.delays[0]], max(args.concurrency), duration,
                    load_cpus, upstreams[args.delays[0]][1])
        left = {delay: backlog(ledgers[delay]) for delay in args.delays if ("gateway", delay) in targets}
    except KeyboardInterrupt:
        print("bench: interrupted; stopping everything", file=sys.stderr)
        return 130
    finally:
        procs.stop_all()
        if server_url is not None:
            for ledger in ledgers.values():
                with contextlib.suppress(Exception):
                    on_postgres(server_url, f'DROP DATABASE IF EXISTS "{make_url(ledger).database}"')
        if not args.keep_temp:
            shutil.rmtree(tmp, ignore_errors=True)

    summary = median_cells(cells)
    table, rows, verdicts = report(summary, args.delays, args.concurrency)
    print()
    print(f"{facts.get('cpu', '?')}, {facts['nproc']} cores; gateway ledger on "
          f"{'PostgreSQL' if server_url else 'SQLite'}; medians of {rounds} round(s) of {duration:g} s; "
          "cpu% = the gateway process's CPU use during the cell (100 = one core)")
    print(table)
    floor_table, floor_rows = floor_report(summary, args.delays, args.concurrency)
    if floor_rows:
        print("\nThe floor (bench/floor.py: the least a create can cost in Python here) next to the gateway:")
        print(floor_table)
    errors = sum(c.errors for c in cells)
    if errors:
        print(f"\nWARNING: {errors} failed requests (non-2xx, timeouts or socket errors): this run is flagged")
    print(f"\nGateway predictions still unfinished at the end (the reconciler's backlog): {left}")
    memory_lines, memory = memory_report(cells)
    print("\nMemory:\n" + "\n".join(memory_lines))
    result = {
        "machine": facts, "versions": versions(nginx),
        "settings": {"gateway_transport": args.gateway_transport, "what_if": args.what_if, "duration_s": duration, "rounds": rounds, "concurrency": args.concurrency, "delays_ms": args.delays,
                     "proxy_cpus": proxy_cpus, "load_cpus": load_cpus, "floor": args.floor,
                     "database": "postgresql" if server_url else "sqlite"},
        "rows": rows, "floor": floor_rows, "targets": verdicts, "cells": [asdict(c) for c in cells], "errors": errors,
        "reconciler_backlog": left, "memory": memory, "flagged": bool(errors),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    print(f"Written to {args.output}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
