"""Upstream transports, JSON libraries and worker counts, measured in isolation.

    python bench/transports.py              # about 4 minutes
    python bench/transports.py --quick      # 2 s a cell
    python bench/transports.py --checks     # only the correctness checks of each transport

1. Throughput: bench/passthrough.py (FastAPI, no database) in front of the fake upstream at
   0 ms and 50 ms, concurrency 64, creates and GETs, with
     httpx            httpx.AsyncClient, its default transport (httpcore)
     httpx-aiohttp    httpx.AsyncClient(transport=httpx_aiohttp.AiohttpTransport(client=session))
     aiohttp          aiohttp.ClientSession, no httpx
     no upstream call a canned answer: what FastAPI + uvicorn alone cost per request
   (orjson, one uvicorn worker pinned to cpu 0), then json vs orjson, then 1 vs 2 uvicorn workers
   (both unpinned, sharing the two cores with wrk and the upstream).
2. JSON: loads + dumps of a prediction-sized body, json vs orjson, in-process.
3. Correctness: the gateway's own UpstreamClient (app/upstream/client.py) over each transport
   against a misbehaving local server: does a cookie set by the upstream come back on the next
   call, which error does a dropped connection, a read time-out and a refused connection become
   (and is the create then "maybe sent"), is a redirect followed.

Results go to stdout and bench/transports-latest.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import tempfile
import time
import timeit
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run

CLIENTS = ["httpx", "httpx-aiohttp", "aiohttp"]


# ----------------------------------------------------------------------------- throughput


def start_passthrough(procs: run.Processes, tmp: Path, upstream_port: int, client: str, json_lib: str,
                      workers: int, cpus: str | None) -> run.Target:
    port = run.free_port()
    env = {**os.environ, "PASSTHROUGH_UPSTREAM": f"http://{run.HOST}:{upstream_port}/replicate",
           "PASSTHROUGH_CLIENT": client, "PASSTHROUGH_JSON": json_lib}
    log = tmp / f"passthrough-{client}-{json_lib}-{workers}-{upstream_port}.log"
    argv = [sys.executable, "-m", "uvicorn", "bench.passthrough:app", "--host", run.HOST, "--port", str(port),
            "--workers", str(workers), "--loop", "uvloop", "--http", "httptools", "--no-access-log",
            "--log-level", "warning"]
    proc = procs.start(f"passthrough-{client}", argv, cpus=cpus, log=log, env=env, cwd=run.ROOT)
    run.wait_for_port(port, proc, log)
    time.sleep(0.5 if workers == 1 else 2.0)
    pids = [proc.pid, *run.children_of(proc.pid)]
    for pid in list(pids):
        pids += [p for p in run.children_of(pid) if p not in pids]
    return run.Target("gateway", 0, port, pids, ids={}, pause=[proc.pid])


def throughput(args: argparse.Namespace, wrk: str) -> list[dict[str, Any]]:
    procs = run.Processes()
    tmp = Path(tempfile.mkdtemp(prefix="gateway-transports-"))
    results: list[dict[str, Any]] = []
    try:
        upstreams = run.start_upstreams(procs, tmp, [0, 50], "1")
        ids = {delay: run.upstream_prediction(port) for delay, (port, _) in upstreams.items()}
        # (label, client, json, workers, cpus)
        variants = [(c, c, "orjson", 1, "0") for c in CLIENTS]
        variants += [("no upstream call", "none", "orjson", 1, "0")]
        variants += [("httpx json", "httpx", "json", 1, "0"), ("httpx-aiohttp json", "httpx-aiohttp", "json", 1, "0")]
        variants += [(f"{c} 1w unpinned", c, "orjson", 1, None) for c in ("httpx", "httpx-aiohttp")]
        variants += [(f"{c} 2w unpinned", c, "orjson", 2, None) for c in ("httpx", "httpx-aiohttp")]
        servers: dict[tuple[str, int], run.Target] = {}
        for label, client, json_lib, workers, cpus in variants:
            for delay, (port, _) in upstreams.items():
                target = start_passthrough(procs, tmp, port, client, json_lib, workers, cpus)
                target.delay_ms = delay
                target.ids = {"get-running": ids[delay]}
                servers[label, delay] = target
                for group in target.pause:
                    os.killpg(group, signal.SIGSTOP)
        directs = {delay: run.Target("direct", delay, port, [pid], ids={"get": ids[delay]})
                   for delay, (port, pid) in upstreams.items()}
        plan = []
        for rnd in range(1, args.rounds + 1):
            for delay in (0, 50):
                for scenario in ("create", "get-running"):
                    plan.append((rnd, delay, scenario, "direct"))
                    for label, *_ in variants:
                        if delay == 50 and ("json" in label or label == "no upstream call"):
                            continue  # the JSON library matters only where the CPU is the limit
                        plan.append((rnd, delay, scenario, label))
        print(f"transports: {len(plan)} cells of {args.duration} s", flush=True)
        for target in servers.values():  # warm-up
            run.wrk_cell(wrk, tmp, target, "get-running", 16, 1, "1", upstreams[target.delay_ms][1], 0)
        for i, (rnd, delay, scenario, label) in enumerate(plan, 1):
            if label == "direct":
                target, sc = directs[delay], ("create" if scenario == "create" else "get")
            else:
                target, sc = servers[label, delay], scenario
            # Unpinned variants get an unpinned wrk too; pinned ones keep wrk on cpu 1.
            load_cpus = "1" if not label.endswith("unpinned") else None
            cell = run.wrk_cell(wrk, tmp, target, sc, 64, args.duration, load_cpus, upstreams[delay][1], rnd)
            row = {"round": rnd, "variant": label, "delay_ms": delay, "scenario": scenario, "rps": cell.rps,
                   "p50_ms": cell.p50_ms, "p99_ms": cell.p99_ms, "errors": cell.errors,
                   "cpu_pct": cell.proxy_cpu_pct, "upstream_cpu_pct": cell.upstream_cpu_pct}
            results.append(row)
            print(f"[{i:>3}/{len(plan)}] {delay:>2} ms {scenario:<12} {label:<26} {cell.rps:>9,.0f} req/s "
                  f"p50 {cell.p50_ms:7.2f} p99 {cell.p99_ms:7.2f} cpu {cell.proxy_cpu_pct:5.1f}%"
                  + (f" ERRORS {cell.error_detail}" if cell.errors else ""), flush=True)
            time.sleep(0.3)
    finally:
        procs.stop_all()
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return results


def summarise(results: list[dict[str, Any]]) -> str:
    import statistics

    groups: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    for row in results:
        groups.setdefault((row["variant"], row["delay_ms"], row["scenario"]), []).append(row)
    labels = list(dict.fromkeys(r["variant"] for r in results))
    lines = [f"{'variant':<26} | {'0 ms create':>20} | {'0 ms GET':>20} | {'50 ms create':>20} | {'50 ms GET':>20}",
             f"{'':<26} | {'req/s   p99  cpu%':>20} | {'req/s   p99  cpu%':>20} | {'req/s   p99  cpu%':>20} | "
             f"{'req/s   p99  cpu%':>20}"]
    for label in labels:
        cols = []
        for delay, scenario in ((0, "create"), (0, "get-running"), (50, "create"), (50, "get-running")):
            group = groups.get((label, delay, scenario))
            if not group:
                cols.append(f"{'-':>20}")
                continue
            rps = statistics.median(r["rps"] for r in group)
            p99 = statistics.median(r["p99_ms"] for r in group)
            cpu = statistics.median(r["cpu_pct"] for r in group)
            err = "!" if any(r["errors"] for r in group) else " "
            cols.append(f"{rps:>7,.0f}{err}{p99:>6.1f} {cpu:>5.0f}")
        lines.append(f"{label:<26} | " + " | ".join(cols))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- JSON


def json_micro() -> dict[str, float]:
    import orjson

    sys.path.insert(0, str(run.BENCH))
    import upstream as fake

    body = fake.dumps(fake.prediction("prd" + "x" * 23, "succeeded", "bench/load",
                                      {"prompt": "a lighthouse at dusk " * 4, "num_outputs": 1, "seed": 42}))
    out: dict[str, float] = {"body_bytes": len(body)}
    for name, loads, dumps in (
        ("json", json.loads, lambda v: json.dumps(v, separators=(",", ":")).encode()),
        ("orjson", orjson.loads, orjson.dumps),
    ):
        n = 20000
        seconds = min(timeit.repeat(lambda loads=loads, dumps=dumps: dumps(loads(body)), number=n, repeat=5))
        out[f"{name}_us"] = round(seconds / n * 1e6, 2)
    return out


# ----------------------------------------------------------------------------- correctness


async def misbehaving_server() -> tuple[asyncio.AbstractServer, int]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                path = lines[0].split(" ")[1]
                headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:] if x)}
                length = int(headers.get("content-length", "0") or 0)
                if length:
                    await reader.readexactly(length)
                extra = b""
                status = b"200 OK"
                if "/disconnect/" in path:
                    writer.close()  # the request arrived; no answer at all
                    return
                if "/slow/" in path:
                    await asyncio.sleep(3)
                if "/cookie" in path:
                    extra = b"set-cookie: relay_session=secret-of-caller-A; Path=/\r\n"
                if "/redirect" in path:
                    status, extra = b"302 Found", b"location: http://127.0.0.1:9/elsewhere\r\n"
                body = json.dumps({"id": "abc", "status": "starting", "cookie_seen": headers.get("cookie"),
                                   "headers": sorted(headers)}).encode()
                writer.write(b"HTTP/1.1 %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%s\r\n"
                             % (status, len(body), extra) + body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    port = run.free_port()
    # Loopback only, both families, so that "localhost" (a host name, whose cookies a jar keeps,
    # unlike an IP address's) reaches it whichever address a client tries first.
    server = await asyncio.start_server(handle, ["127.0.0.1", "::1"], port)
    return server, port


async def check_transport(name: str, port: int) -> dict[str, Any]:
    import aiohttp
    import httpx
    import httpx_aiohttp

    sys.path.insert(0, str(run.ROOT))
    from app.upstream.client import UpstreamClient, UpstreamFailure

    def make_transport() -> httpx.AsyncBaseTransport | None:
        if name == "httpx-aiohttp (own session, DummyCookieJar)":
            session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=200),
                                            cookie_jar=aiohttp.DummyCookieJar())
            return httpx_aiohttp.AiohttpTransport(client=session)
        if name == "httpx-aiohttp (its default session)":
            return httpx_aiohttp.AiohttpTransport()
        if name.startswith("GatewayAiohttpTransport"):
            from passthrough import gateway_aiohttp_transport

            return gateway_aiohttp_transport()  # type: ignore[no-any-return]
        return None

    def client(base_port: int, host: str = run.HOST) -> UpstreamClient:
        # UpstreamClient.aclose() closes its transport (and the aiohttp session in it).
        return UpstreamClient(name="check", base_url=f"http://{host}:{base_port}/x", token="sk-check-key",  # noqa: S106
                              connect_timeout=1, request_timeout=1, create_timeout=1, max_body_bytes=1 << 20,
                              transport=make_transport())

    async def outcome(call: Any) -> str:
        try:
            reply = await call
        except UpstreamFailure as failure:
            return f"{type(failure.error).__name__} (status {failure.error.status}), maybe_sent={failure.maybe_sent}"
        return f"answered: {reply if not isinstance(reply, dict) else {k: reply[k] for k in list(reply)[:3]}}"

    found: dict[str, Any] = {"transport": name}
    for host in ("127.0.0.1", "localhost"):
        up = client(port, host)
        await up.get_json("v1/cookie")
        echo = await up.get_json("v1/echo")
        found[f"cookie replayed on the next call ({host})"] = echo.get("cookie_seen")
        found["headers sent"] = echo.get("headers")
        await up.aclose()
    up = client(port)
    found["create, connection dropped after the request"] = await outcome(
        up.create_prediction("v1/models/bench/disconnect/predictions", {"input": {}}, prefer=None,
                             cancel_after=None, wait_seconds=None))
    found["create, read time-out"] = await outcome(
        up.create_prediction("v1/models/bench/slow/predictions", {"input": {}}, prefer=None,
                             cancel_after=None, wait_seconds=None))
    found["redirect"] = await outcome(up.get_json("v1/redirect"))
    await up.aclose()
    refused = client(run.free_port())
    found["create, connection refused"] = await outcome(
        refused.create_prediction("v1/models/bench/x/predictions", {"input": {}}, prefer=None,
                                  cancel_after=None, wait_seconds=None))
    await refused.aclose()
    return found


async def checks() -> list[dict[str, Any]]:
    import logging

    logging.getLogger("app").setLevel(logging.CRITICAL)  # the client's own warnings: expected here
    server, port = await misbehaving_server()
    found = []
    async with server:
        for name in ("httpx (default transport)", "httpx-aiohttp (own session, DummyCookieJar)",
                     "httpx-aiohttp (its default session)", "GatewayAiohttpTransport (bench/transports.py)"):
            found.append(await check_transport(name, port))
    return found


# ----------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--duration", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--checks", action="store_true", help="only the correctness checks")
    args = parser.parse_args()
    args.duration = args.duration or (2 if args.quick else 5)
    missing = [m for m in ("aiohttp", "httpx_aiohttp") if not _importable(m)]
    if missing:
        raise SystemExit("bench/transports.py needs: pip install aiohttp httpx-aiohttp")
    result: dict[str, Any] = {}
    print("Correctness of each transport under the gateway's UpstreamClient:")
    result["checks"] = asyncio.run(checks())
    for found in result["checks"]:
        print(f"  {found['transport']}")
        for key, value in found.items():
            if key != "transport":
                print(f"    {key}: {value}")
    if args.checks:
        return 0
    result["json"] = json_micro()
    print(f"\nJSON loads+dumps of a {result['json']['body_bytes']}-byte prediction: json "
          f"{result['json']['json_us']} us, orjson {result['json']['orjson_us']} us")
    wrk, _ = run.ensure_tools()
    result["throughput"] = throughput(args, wrk)
    print("\nConcurrency 64, medians (p99 in ms; cpu% = the pass-through's processes, 100 = one core; ! = errors):")
    print(summarise(result["throughput"]))
    result["versions"] = run.versions(run.ensure_tools()[1])
    result["machine"] = run.machine()
    (run.BENCH / "transports-latest.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(f"Written to {run.BENCH / 'transports-latest.json'}")
    return 0


def _importable(name: str) -> bool:
    with contextlib.suppress(ImportError):
        __import__(name)
        return True
    return False


if __name__ == "__main__":
    sys.exit(main())
