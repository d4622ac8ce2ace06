"""The dashboard benchmark: a million predictions, every page timed as admin and as a team token.

    python bench/dashboard.py                                   # SQLite only
    python bench/dashboard.py --postgres postgresql://postgres@127.0.0.1:5432/postgres

It seeds a fresh SQLite file (and, given --postgres, a database `bench_dashboard` it creates on
that server and drops at the end) with --rows predictions (default 1,000,000) spread over 90 days,
200 tokens of very different activity, 40 models and mixed statuses, with their ledger entries,
token counters and daily rollup as the gateway would have written them. It then starts the
gateway (`python -m app serve`) on 127.0.0.1, signs in through the dashboard's form as the admin
and as the busiest team token, and requests each page --requests times (after two warm-ups),
printing the median and p95 in milliseconds. The target is under 300 ms for every page.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import math
import os
import random
import re
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.db import migrate  # noqa: E402
from app.predictions import cursor as cursors  # noqa: E402
from app.predictions.search import ADMIN_CURSOR_SCOPE  # noqa: E402

HOST = "127.0.0.1"
ADMIN = "bench-admin-token"
SECRET_KEY = "bench-dashboard-secret-key"  # noqa: S105  (a throwaway database's key)
TOKENS = 200
MODELS = 40
DAYS = 90
RUNNING = 300  # unfinished predictions, all recent
CHUNK = 50_000
ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"
PREDICTION_COLUMNS = (
    "id", "token_id", "upstream", "upstream_id", "submission", "model", "version", "status", "input",
    "output", "error", "logs", "metrics", "streamable", "created_at", "started_at", "completed_at",
    "updated_at", "cost_micros", "cost_note", "estimate_micros", "bill_failures", "submit_deadline",
    "next_poll_at", "poll_attempts", "webhook_sequence", "outputs_archived", "public_base",
)
LEDGER_COLUMNS = ("prediction_id", "token_id", "kind", "amount_micros", "note", "created_at")
TOKEN_COLUMNS = ("id", "name", "display_prefix", "token_hash", "spent_micros", "reserved_micros", "in_flight",
                 "rate_window", "rate_count", "created_at")
DAILY_COLUMNS = ("day", "token_id", "model", "predictions", "succeeded", "failed", "canceled", "cost_micros")


# ---- data ------------------------------------------------------------------------------------

def _rid(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(n))


class Seed:
    """The generated rows, made chunk by chunk in id order (so the primary key grows at the end)."""

    def __init__(self, rows: int, now: datetime, rng_seed: int = 7) -> None:
        self.rows = rows
        self.now = now
        self.rng = random.Random(rng_seed)  # noqa: S311  (made-up data, reproducible)
        rng = self.rng
        self.key = hashlib.sha256(SECRET_KEY.encode()).digest()
        self.models = [(f"{'llm' if i % 5 == 0 else 'studio'}-{i:02d}/model-{i:02d}", 1_000 * (1 + i % 12))
                       for i in range(MODELS)]
        self.tokens = [{"id": _rid(rng, 26), "name": f"team-{i:03d}"} for i in range(TOKENS)]
        # A few very busy tokens, a long tail of quiet ones; each uses a handful of models.
        self.weights = [1 / (i + 1) ** 1.1 for i in range(TOKENS)]
        self.token_models = [rng.sample(range(MODELS), rng.randint(2, 6)) for _ in range(TOKENS)]
        self.spent: Counter[str] = Counter()
        self.reserved: Counter[str] = Counter()
        self.in_flight: Counter[str] = Counter()
        self.daily: dict[tuple[str, str, str], list[int]] = defaultdict(lambda: [0, 0, 0, 0, 0])

    def secret_hash(self, secret: str) -> str:
        """The stored hash of a token secret (the gateway's HMAC)."""
        import hmac

        return hmac.new(self.key, secret.encode(), hashlib.sha256).hexdigest()

    def chunks(self) -> Iterator[tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]]:
        """(prediction rows, ledger rows) in chunks; the last RUNNING predictions are unfinished."""
        rng = self.rng
        span = DAYS * 86_400
        for start in range(0, self.rows, CHUNK):
            predictions: list[tuple[Any, ...]] = []
            ledger: list[tuple[Any, ...]] = []
            owners = rng.choices(range(TOKENS), weights=self.weights, k=min(CHUNK, self.rows - start))
            for offset, owner in enumerate(owners):
                i = start + offset
                token_id = self.tokens[owner]["id"]
                model, price = self.models[rng.choice(self.token_models[owner])]
                running = i >= self.rows - RUNNING
                created = self.now - timedelta(seconds=rng.uniform(1, 120) if running else rng.uniform(120, span))
                pid = f"b{i:09d}{_rid(rng, 16)}"
                roll = rng.random()
                status = ("processing" if running else "succeeded" if roll < 0.86 else "failed" if roll < 0.95
                          else "canceled" if roll < 0.985 else "aborted")
                rejected = status == "failed" and rng.random() < 0.05
                llm = model.startswith("llm")
                output: Any = None
                if status == "succeeded":
                    output = ["Once", " upon", " a", " time"] if llm else [
                        f"https://replicate.delivery/bench/{pid}/out-{k}.webp" for k in range(rng.randint(1, 2))]
                cost = None if running else (price if status == "succeeded" else 0)
                finished = None if running else created + timedelta(seconds=rng.uniform(1, 40))
                predictions.append((
                    pid, token_id, "default", None if rejected else "u" + pid,
                    "rejected" if rejected else "accepted", model, None, status,
                    json.dumps({"prompt": f"a picture of thing {i}", "seed": i % 1000}),
                    json.dumps(output) if output is not None else None,
                    "something went wrong" if status in ("failed", "aborted") else None,
                    "step 1/3\nstep 2/3\nstep 3/3\ndone\n" if finished else "step 1/3\n",
                    json.dumps({"predict_time": round(rng.uniform(0.5, 30), 3)}) if finished else None,
                    False, created, created + timedelta(seconds=0.5), finished, finished or created,
                    cost, None, price, False, created + timedelta(seconds=40),
                    self.now + timedelta(days=1) if running else None, 0, 0, False, None,
                ))
                ledger.append((pid, token_id, "reservation", price, None, created))
                if running:
                    self.reserved[token_id] += price
                    self.in_flight[token_id] += 1
                    continue
                charged = status == "succeeded"
                ledger.append((pid, token_id, "settlement" if charged else "release",
                               price, None, finished))
                if charged:
                    self.spent[token_id] += price
                if not rejected:
                    counts = self.daily[(created.date().isoformat(), token_id, model)]
                    counts[0] += 1
                    counts[{"succeeded": 1, "canceled": 3}.get(status, 2)] += 1
                    counts[4] += cost or 0
            yield predictions, ledger

    def token_rows(self, created: datetime) -> list[tuple[Any, ...]]:
        """Token rows with counters equal to their ledger (hash of a secret per name)."""
        return [(t["id"], t["name"], "gw_bench", self.secret_hash(self.secret(t["name"])),
                 self.spent[t["id"]], self.reserved[t["id"]], self.in_flight[t["id"]], 0, 0, created)
                for t in self.tokens]

    def daily_rows(self) -> list[tuple[Any, ...]]:
        """The rollup rows."""
        return [(day, token_id, model, *counts) for (day, token_id, model), counts in self.daily.items()]

    @staticmethod
    def secret(name: str) -> str:
        """The bench's known secret of a token."""
        return "gw_" + hashlib.sha256(name.encode()).hexdigest()[:43]


def _sqlite_value(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.astimezone(UTC).replace(tzinfo=None).strftime("%Y-%m-%d %H:%M:%S.%f")
    if isinstance(value, bool):
        return int(value)
    return value


def seed_sqlite(path: Path, seed: Seed) -> None:
    """Bulk-insert with executemany; secondary indexes are dropped and rebuilt afterwards."""
    migrate(f"sqlite:///{path}")
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=OFF")
    db.execute("PRAGMA synchronous=OFF")
    indexes = db.execute("SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL "
                         "AND tbl_name IN ('prediction', 'ledger_entry')").fetchall()
    for name, _ in indexes:
        db.execute(f"DROP INDEX {name}")
    db.execute("BEGIN")
    rows = 0
    for predictions, ledger in seed.chunks():
        db.executemany(f"INSERT INTO prediction ({', '.join(PREDICTION_COLUMNS)}) VALUES "  # noqa: S608
                       f"({', '.join('?' * len(PREDICTION_COLUMNS))})",
                       [tuple(_sqlite_value(v) for v in row) for row in predictions])
        db.executemany(f"INSERT INTO ledger_entry ({', '.join(LEDGER_COLUMNS)}) VALUES "  # noqa: S608
                       f"({', '.join('?' * len(LEDGER_COLUMNS))})",
                       [tuple(_sqlite_value(v) for v in row) for row in ledger])
        rows += len(predictions)
        print(f"\r  sqlite: {rows:,} predictions", end="", flush=True)
    db.executemany(f"INSERT INTO api_token ({', '.join(TOKEN_COLUMNS)}) VALUES "  # noqa: S608
                   f"({', '.join('?' * len(TOKEN_COLUMNS))})",
                   [tuple(_sqlite_value(v) for v in row) for row in seed.token_rows(seed.now - timedelta(days=DAYS + 1))])
    db.executemany(f"INSERT INTO usage_daily ({', '.join(DAILY_COLUMNS)}) VALUES "  # noqa: S608
                   f"({', '.join('?' * len(DAILY_COLUMNS))})", seed.daily_rows())
    db.execute("COMMIT")
    print("; building indexes", flush=True)
    for _, sql in indexes:
        db.execute(sql)
    db.execute("PRAGMA journal_mode=WAL")
    db.close()


async def _seed_postgres(url: str, seed: Seed) -> None:
    import asyncpg

    connection = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        rows = 0
        pending_tokens = True
        for predictions, ledger in seed.chunks():
            if pending_tokens:
                # The foreign keys need the tokens first; their counters are set at the end.
                await connection.copy_records_to_table(
                    "api_token", columns=TOKEN_COLUMNS,
                    records=seed.token_rows(seed.now - timedelta(days=DAYS + 1)))
                pending_tokens = False
            await connection.copy_records_to_table("prediction", columns=PREDICTION_COLUMNS, records=predictions)
            await connection.copy_records_to_table("ledger_entry", columns=LEDGER_COLUMNS, records=ledger)
            rows += len(predictions)
            print(f"\r  postgresql: {rows:,} predictions", end="", flush=True)
        print(flush=True)
        for row in seed.token_rows(seed.now):
            await connection.execute(
                "UPDATE api_token SET spent_micros = $2, reserved_micros = $3, in_flight = $4 WHERE id = $1",
                row[0], row[4], row[5], row[6])
        await connection.copy_records_to_table("usage_daily", columns=DAILY_COLUMNS, records=[
            (date.fromisoformat(r[0]), *r[1:]) for r in seed.daily_rows()])
        await connection.execute("ANALYZE")  # what autovacuum does after a bulk load
    finally:
        await connection.close()


async def _admin_sql(server_url: str, statement: str) -> None:
    import asyncpg

    connection = await asyncpg.connect(server_url)
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


@contextlib.contextmanager
def postgres_database(server_url: str, name: str = "bench_dashboard") -> Iterator[str]:
    """A database of our own on that server, dropped afterwards (never the one in the URL)."""
    url = server_url.rsplit("/", 1)[0] + "/" + name
    if url == server_url:
        raise SystemExit(f"give a URL of another database than {name}; the benchmark creates and drops {name}")
    asyncio.run(_admin_sql(server_url, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
    asyncio.run(_admin_sql(server_url, f"CREATE DATABASE {name}"))
    try:
        yield url
    finally:
        asyncio.run(_admin_sql(server_url, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


# ---- the gateway and the timings ------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
    return port


@contextlib.contextmanager
def gateway(database_url: str, workdir: Path) -> Iterator[str]:
    """`python -m app serve` on 127.0.0.1 with an admin token; stopped at the end."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update({
        "GATEWAY_DATABASE_URL": database_url, "GATEWAY_ADMIN_TOKEN": ADMIN, "GATEWAY_SECRET_KEY": SECRET_KEY,
        "GATEWAY_LOG_LEVEL": "WARNING", "GATEWAY_STORAGE_DIR": str(workdir / "storage"),
        # Nothing is sent upstream during the benchmark; the seeded unfinished predictions are
        # scheduled a day out so the reconciler leaves them alone.
        "GATEWAY_UPSTREAM_URL": f"http://{HOST}:9", "GATEWAY_MAX_PREDICTION_SECONDS": "86400",
    })
    log = (workdir / f"gateway-{port}.log").open("wb")
    process = subprocess.Popen([sys.executable, "-m", "app", "serve", "--host", HOST, "--port", str(port)],
                               cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the gateway exited: {(workdir / f'gateway-{port}.log').read_text()[-2000:]}")
            with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=0.5):
                break
            if time.monotonic() > deadline:
                raise RuntimeError("the gateway did not start")
            time.sleep(0.2)
        yield f"http://{HOST}:{port}"
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()


def sign_in(base: str, secret: str) -> httpx.Client:
    """A client signed in through the dashboard's own form."""
    client = httpx.Client(base_url=base, timeout=60)
    form = client.get("/dashboard/login")
    csrf = re.search(r'name="csrf" value="([^"]+)"', form.text)
    if csrf is None:
        raise RuntimeError(f"no sign-in form: {form.text[:300]}")
    answer = client.post("/dashboard/login", data={"token": secret, "csrf": csrf.group(1)})
    if answer.status_code != 303:
        raise RuntimeError(f"sign-in failed: {answer.status_code}")
    return client


def timed(client: httpx.Client, path: str, requests: int) -> tuple[float, float, int]:
    """Median and p95 (nearest rank) in ms over `requests` GETs, after two warm-ups; and the size."""
    for _ in range(2):
        answer = client.get(path)
        if answer.status_code != 200:
            raise RuntimeError(f"{path}: {answer.status_code} {answer.text[:300]}")
    times = []
    size = 0
    for _ in range(requests):
        started = time.perf_counter()
        answer = client.get(path)
        times.append((time.perf_counter() - started) * 1000)
        size = len(answer.content)
        if answer.status_code != 200:
            raise RuntimeError(f"{path}: {answer.status_code}")
    times.sort()
    return statistics.median(times), times[math.ceil(0.95 * len(times)) - 1], size


def deep_cursor(seed: Seed, database_url: str, fraction: float = 0.6) -> str:
    """A signed cursor at the prediction `fraction` of the way back through the whole list."""
    import asyncio as aio

    from app.db import make_engine
    from app.predictions.models import Prediction
    from sqlalchemy import select, text

    async def position() -> tuple[datetime, str]:
        engine = make_engine(database_url)
        try:
            async with engine.connect() as connection:
                count = (await connection.execute(text("SELECT count(*) FROM prediction"))).scalar_one()
                # One OFFSET, here in the benchmark only, to find a row deep in the list.
                row = (await connection.execute(
                    select(Prediction.created_at, Prediction.id)
                    .order_by(Prediction.created_at.desc(), Prediction.id.desc())
                    .offset(int(count * fraction)).limit(1))).one()
                return row[0], row[1]
        finally:
            await engine.dispose()

    created_at, pid = aio.run(position())
    return cursors.encode(cursors.Cursor(created_at, pid, False), ADMIN_CURSOR_SCOPE, seed.key)


def scenarios(seed: Seed, database_url: str, team: dict[str, str], sample: dict[str, str]) -> list[tuple[str, str, str]]:
    """(viewer, page, path) for every page the benchmark times."""
    today = seed.now.date()
    month = f"since={(today - timedelta(days=29)).isoformat()}&until={today.isoformat()}"
    quarter = f"since={(today - timedelta(days=DAYS - 1)).isoformat()}&until={today.isoformat()}"
    cursor = deep_cursor(seed, database_url)
    busy_model = seed.models[seed.token_models[0][0]][0]
    pages = []
    for viewer in ("admin", "team"):
        pages += [
            (viewer, "overview, last 30 days (default)", "/dashboard"),
            (viewer, "overview, 90 days", f"/dashboard?{quarter}"),
            (viewer, "tokens", "/dashboard/tokens"),
            (viewer, "predictions, first page", "/dashboard/predictions"),
            (viewer, "predictions, deep page (cursor)", f"/dashboard/predictions?cursor={cursor}"),
            (viewer, "predictions, model + failed", f"/dashboard/predictions?model={busy_model}&status=failed"),
            (viewer, "prediction page", f"/dashboard/predictions/{sample[viewer]}"),
            (viewer, "usage CSV, a month by day/token/model",
             f"/dashboard/usage.csv?{month}&group_by=day&group_by=token&group_by=model"),
        ]
    pages.insert(6, ("admin", "predictions, token + failed",
                     f"/dashboard/predictions?token={team['name']}&status=failed"))
    # Not dashboard pages, but they read the same ledger: Prometheus asks for the metrics every
    # few seconds, and the admin API's usage report is the dashboard's CSV for scripts.
    pages += [
        ("admin", "metrics (a Prometheus scrape)", "/metrics"),
        ("api", "admin API usage, all time, by token and model", "/admin/v1/usage?group_by=token&group_by=model"),
        ("api", "admin API usage CSV, a month by day/token/model",
         f"/admin/v1/usage?{month}&group_by=day&group_by=token&group_by=model&format=csv"),
    ]
    return pages


def run(database: str, database_url: str, seed: Seed, workdir: Path, requests: int) -> list[dict[str, Any]]:
    team = seed.tokens[0]  # the busiest token
    results = []
    with gateway(database_url, workdir) as base:
        clients = {"admin": sign_in(base, ADMIN), "team": sign_in(base, seed.secret(team["name"])),
                   "api": httpx.Client(base_url=base, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60)}
        listing = clients["team"].get("/dashboard/predictions?status=succeeded").text
        sample = {"team": re.findall(r'href="/dashboard/predictions/([a-z0-9]+)"', listing)[0]}
        sample["admin"] = sample["team"]
        for viewer, page, path in scenarios(seed, database_url, team, sample):
            median, p95, size = timed(clients[viewer], path, requests)
            results.append({"database": database, "viewer": viewer, "page": page, "median_ms": round(median, 1),
                            "p95_ms": round(p95, 1), "bytes": size})
            print(f"  {database:10} {viewer:5} {page:42} median {median:7.1f} ms  p95 {p95:7.1f} ms  "
                  f"{size / 1024:7.1f} KiB", flush=True)
        for client in clients.values():
            client.close()
    return results


def table(results: list[dict[str, Any]]) -> str:
    """The results as a Markdown table, with the 300 ms target checked."""
    lines = ["| database | viewer | page | median ms | p95 ms | under 300 ms |", "|---|---|---|---:|---:|---|"]
    for r in results:
        lines.append(f"| {r['database']} | {r['viewer']} | {r['page']} | {r['median_ms']:.1f} | {r['p95_ms']:.1f} "
                     f"| {'yes' if r['p95_ms'] < 300 else 'NO'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000, help="predictions to seed")
    parser.add_argument("--requests", type=int, default=20, help="timed requests per page")
    parser.add_argument("--postgres", metavar="URL", help="also run on PostgreSQL (a server URL; "
                        "the benchmark creates and drops the database bench_dashboard there)")
    parser.add_argument("--keep", metavar="DIR", help="keep the SQLite file and logs in DIR")
    args = parser.parse_args(argv)
    now = datetime.now(UTC)
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-dashboard-") as tmp:
        workdir = Path(args.keep) if args.keep else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        path = workdir / "dashboard.db"
        path.unlink(missing_ok=True)
        started = time.monotonic()
        print(f"Seeding {args.rows:,} predictions into SQLite ({path})", flush=True)
        seed_sqlite(path, seed := Seed(args.rows, now))
        print(f"  seeded in {time.monotonic() - started:.0f} s, {path.stat().st_size / 2**20:.0f} MiB", flush=True)
        results += run("sqlite", f"sqlite:///{path}", seed, workdir, args.requests)
        if args.postgres:
            with postgres_database(args.postgres) as url:
                started = time.monotonic()
                print(f"Seeding {args.rows:,} predictions into PostgreSQL", flush=True)
                migrate(url)
                seed = Seed(args.rows, now)
                asyncio.run(_seed_postgres(url, seed))
                print(f"  seeded in {time.monotonic() - started:.0f} s", flush=True)
                results += run("postgresql", url, seed, workdir, args.requests)
    print()
    print(table(results))
    slow = [r for r in results if r["p95_ms"] >= 300]
    print(f"\n{len(results) - len(slow)} of {len(results)} pages under 300 ms at p95")
    return 1 if slow else 0


if __name__ == "__main__":
    raise SystemExit(main())
