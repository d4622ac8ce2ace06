"""The `replicate-gateway` command: serve, migrate, demo, tokens, groups and usage."""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import re
import sys
from collections.abc import Sequence
from datetime import UTC, date, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

import httpx
import orjson
from sqlalchemy.engine import Connection

from app.accounting import usage as usage_report
from app.accounting.pricing import ONE_PPM, to_micros
from app.admin.router import token_view
from app.config import Settings, get_settings
from app.db import make_engine, make_sessionmaker, migrate, run_sync
from app.groups import service as group_service
from app.tokens import service as token_service

DEMO_UPSTREAM_URL = "http://demo-upstream/replicate"
GC_YOUNG_THRESHOLD = 20_000  # allocations between young collections (CPython default: 700)


def _print(text: str) -> None:
    sys.stdout.write(text if text.endswith("\n") else text + "\n")


def _fail(message: str) -> int:
    sys.stderr.write(f"replicate-gateway: {message}\n")
    return 2


def _usd(value: str) -> int:
    try:
        amount = Decimal(value)
    except InvalidOperation:
        raise argparse.ArgumentTypeError(f"not an amount of USD: {value}") from None
    if not amount.is_finite() or amount < 0:
        raise argparse.ArgumentTypeError("the amount must be a non-negative number")
    return to_micros(amount)


CLEAR = "none"


def _count(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"not a positive whole number: {value}")
    return int(value)


def _or_clear(parse: Any) -> Any:
    """A parser that also takes `none`, meaning "remove this limit"."""
    def parse_or_clear(value: str) -> Any:
        return CLEAR if value.lower() == CLEAR else parse(value)
    return parse_or_clear


def _timestamp(value: str) -> datetime:
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {value}") from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


def _group_name(value: str) -> str:
    if not re.match(group_service.NAME_PATTERN, value):
        raise argparse.ArgumentTypeError(f"not a group name (letters, digits and ._@-): {value}")
    return value


def _multiplier(value: str) -> int:
    try:
        return group_service.parse_multiplier(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a price multiplier ({exc}): {value}") from None


def _day(value: str) -> date:
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD): {value}") from None


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every sub-command."""
    parser = argparse.ArgumentParser(prog="replicate-gateway", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    for name, text in (("serve", "apply pending migrations, then serve"),
                       ("demo", "serve with a built-in simulated upstream")):
        command = commands.add_parser(name, help=text)
        command.add_argument("--host", default="127.0.0.1")
        command.add_argument("--port", type=int, default=8000)
    commands.add_parser("migrate", help="apply pending database migrations")

    tokens = commands.add_parser("tokens", help="create, list and revoke gateway tokens")
    token_commands = tokens.add_subparsers(dest="tokens_command", required=True)
    create = token_commands.add_parser("create", help="create a token (the secret is shown once)")
    create.add_argument("name")
    create.add_argument("--budget", type=_usd, metavar="USD")
    create.add_argument("--budget-period", choices=("total", "month"), default="total")
    create.add_argument("--rpm", type=_count, metavar="N", help="predictions it may create a minute")
    create.add_argument("--max-in-flight", type=_count, metavar="N", help="predictions running at once")
    create.add_argument("--models", nargs="+", metavar="GLOB", help="owner/name globs it may run")
    create.add_argument("--expires-at", type=_timestamp, metavar="ISO")
    create.add_argument("--group", metavar="NAME", help="the token group it belongs to")
    create.add_argument("--json", action="store_true")
    change = token_commands.add_parser("update", help="change a token's limits (`none` removes one)")
    change.add_argument("name_or_id")
    change.add_argument("--budget", type=_or_clear(_usd), metavar="USD|none")
    change.add_argument("--budget-period", choices=("total", "month"))
    change.add_argument("--rpm", type=_or_clear(_count), metavar="N|none")
    change.add_argument("--max-in-flight", type=_or_clear(_count), metavar="N|none")
    models = change.add_mutually_exclusive_group()
    models.add_argument("--models", nargs="+", metavar="GLOB")
    models.add_argument("--all-models", action="store_true", help="remove the model limit")
    change.add_argument("--expires-at", type=_or_clear(_timestamp), metavar="ISO|none")
    change.add_argument("--group", metavar="NAME|none", help="move it to a group (`none`: out of any)")
    change.add_argument("--json", action="store_true")
    listing = token_commands.add_parser("list", help="list tokens")
    listing.add_argument("--json", action="store_true")
    revoke = token_commands.add_parser("revoke", help="revoke a token by name or id")
    revoke.add_argument("name_or_id")

    _add_group_commands(commands)

    usage = commands.add_parser("usage", help="predictions and cost, grouped")
    usage.add_argument("--since", type=_day, metavar="YYYY-MM-DD")
    usage.add_argument("--until", type=_day, metavar="YYYY-MM-DD")
    usage.add_argument("--group-by", nargs="+", action="extend", default=[],
                       choices=usage_report.GROUP_KEYS)
    usage.add_argument("--format", choices=("table", "csv", "json"), default="table")
    return parser


def _add_group_commands(commands: Any) -> None:
    groups = commands.add_parser("groups", help="create, list, update and delete token groups")
    group_commands = groups.add_subparsers(dest="groups_command", required=True)
    create = group_commands.add_parser("create", help="create a group")
    create.add_argument("name", type=_group_name)
    create.add_argument("--upstreams", nargs="+", metavar="NAME", help="upstreams its tokens may use")
    create.add_argument("--models", nargs="+", metavar="GLOB", help="owner/name globs its tokens may run")
    create.add_argument("--price-multiplier", type=_multiplier, metavar="X", help="e.g. 1.5 (default 1)")
    create.add_argument("--json", action="store_true")
    change = group_commands.add_parser("update", help="change a group")
    change.add_argument("name_or_id")
    change.add_argument("--name", type=_group_name, help="rename it")
    upstreams = change.add_mutually_exclusive_group()
    upstreams.add_argument("--upstreams", nargs="+", metavar="NAME")
    upstreams.add_argument("--all-upstreams", action="store_true", help="remove the upstream limit")
    models = change.add_mutually_exclusive_group()
    models.add_argument("--models", nargs="+", metavar="GLOB")
    models.add_argument("--all-models", action="store_true", help="remove the model limit")
    change.add_argument("--price-multiplier", type=_multiplier, metavar="X")
    change.add_argument("--json", action="store_true")
    listing = group_commands.add_parser("list", help="list groups")
    listing.add_argument("--json", action="store_true")
    delete = group_commands.add_parser("delete", help="delete a group no token belongs to")
    delete.add_argument("name_or_id")


async def _with_session(settings: Settings, work: Any) -> Any:
    engine = make_engine(settings.database_url)
    try:
        async with make_sessionmaker(engine)() as session:
            return await work(session)
    finally:
        await engine.dispose()


def _tokens(settings: Settings, args: argparse.Namespace) -> int:
    secret = settings.secret_key.get_secret_value() if settings.secret_key else None

    async def create(session: Any) -> int:
        key = await token_service.load_instance_key(session, secret)
        group = None
        if args.group is not None:
            group = await group_service.find(session, args.group)
            if group is None:
                return _fail(f"no group named {args.group!r}")
        try:
            issued = await token_service.create(
                session, key=key, name=args.name, model_globs=args.models,
                budget_micros=args.budget, expires_at=args.expires_at,
                budget_period="month" if args.budget_period == "month" else None,
                rpm_limit=args.rpm, max_in_flight=args.max_in_flight, group=group,
            )
        except token_service.TokenNameTaken:
            return _fail(f"a token named {args.name!r} already exists")
        if args.json:
            _print(orjson.dumps({"id": issued.row.id, "name": issued.row.name, "token": issued.secret}).decode())
        else:
            _print(f"Created token {issued.row.name} ({issued.row.id}). It is shown only now:\n{issued.secret}")
        return 0

    async def listing(session: Any) -> int:
        rows = [token_view(t) for t in await token_service.list_all(session)]
        if args.json:
            _print(orjson.dumps(rows).decode())
            return 0
        _print(f"{'NAME':24} {'ID':26} {'PREFIX':10} {'STATE':8} MODELS")
        for row in rows:
            state = "revoked" if row["revoked_at"] else "active"
            _print(f"{row['name']:24} {row['id']:26} {row['prefix']:10} {state:8} {','.join(row['models'] or ['*'])}")
        return 0

    async def revoke(session: Any) -> int:
        token = await token_service.find(session, args.name_or_id)
        if token is None:
            return _fail(f"no token named {args.name_or_id!r}")
        await token_service.revoke(session, token)
        _print(f"Revoked token {token.name} ({token.id}).")
        return 0

    async def change(session: Any) -> int:
        token = await token_service.find(session, args.name_or_id)
        if token is None:
            return _fail(f"no token named {args.name_or_id!r}")
        changes: dict[str, Any] = {}
        for option, column in (("budget", "budget_micros"), ("rpm", "rpm_limit"),
                               ("max_in_flight", "max_in_flight"), ("expires_at", "expires_at")):
            value = getattr(args, option)
            if value is not None:
                changes[column] = None if value == CLEAR else value
        if args.budget_period is not None:
            changes["budget_period"] = "month" if args.budget_period == "month" else None
        if args.models:
            changes["model_globs"] = args.models
        elif args.all_models:
            changes["model_globs"] = None
        if args.group is not None and args.group.lower() == CLEAR:
            changes["group_id"] = None
        elif args.group is not None:
            group = await group_service.find(session, args.group)
            if group is None:
                return _fail(f"no group named {args.group!r}")
            changes["group_id"] = group.id
        token = await token_service.update_limits(session, token, changes)
        view = token_view(token)
        _print(orjson.dumps(view).decode() if args.json else f"Updated token {token.name} ({token.id}).")
        return 0

    work = {"create": create, "list": listing, "revoke": revoke, "update": change}[args.tokens_command]
    result: int = run_sync(_with_session(settings, work))
    return result


def _groups(settings: Settings, args: argparse.Namespace) -> int:
    # Upstream names are checked against the configured ones, as the admin API checks them.
    known = {upstream.name for upstream in settings.effective_upstreams()}
    named = getattr(args, "upstreams", None) or []
    unknown = [named[i] for i in group_service.unknown_upstreams(named, known)]
    if unknown:
        return _fail(f"no upstream named {', '.join(map(repr, unknown))} is configured "
                     f"(configured: {', '.join(sorted(known))})")

    async def create(session: Any) -> int:
        try:
            group = await group_service.create(
                session, name=args.name, upstreams=args.upstreams, model_globs=args.models,
                price_multiplier_ppm=args.price_multiplier or ONE_PPM,
            )
        except group_service.GroupNameTaken:
            return _fail(f"a group named {args.name!r} already exists")
        view = group_service.group_view(group, 0)
        _print(orjson.dumps(view).decode() if args.json else f"Created group {group.name} ({group.id}).")
        return 0

    async def listing(session: Any) -> int:
        counts = await group_service.token_counts(session)
        rows = [group_service.group_view(g, counts.get(g.id, 0)) for g in await group_service.list_all(session)]
        if args.json:
            _print(orjson.dumps(rows).decode())
            return 0
        _print(f"{'NAME':24} {'ID':26} {'MULTIPLIER':10} {'TOKENS':6} {'UPSTREAMS':20} MODELS")
        for row in rows:
            _print(f"{row['name']:24} {row['id']:26} {row['price_multiplier']:10} {row['tokens']:<6} "
                   f"{','.join(row['upstreams'] or ['*']):20} {','.join(row['models'] or ['*'])}")
        return 0

    async def change(session: Any) -> int:
        group = await group_service.find(session, args.name_or_id)
        if group is None:
            return _fail(f"no group named {args.name_or_id!r}")
        changes: dict[str, Any] = {}
        if args.name is not None:
            changes["name"] = args.name
        if args.upstreams:
            changes["upstreams"] = args.upstreams
        elif args.all_upstreams:
            changes["upstreams"] = None
        if args.models:
            changes["model_globs"] = args.models
        elif args.all_models:
            changes["model_globs"] = None
        if args.price_multiplier is not None:
            changes["price_multiplier_ppm"] = args.price_multiplier
        try:
            group = await group_service.update_group(session, group, changes)
        except group_service.GroupNameTaken:
            return _fail(f"a group named {args.name!r} already exists")
        view = group_service.group_view(group, (await group_service.token_counts(session)).get(group.id, 0))
        _print(orjson.dumps(view).decode() if args.json else f"Updated group {group.name} ({group.id}).")
        return 0

    async def delete(session: Any) -> int:
        group = await group_service.find(session, args.name_or_id)
        if group is None:
            return _fail(f"no group named {args.name_or_id!r}")
        try:
            await group_service.delete(session, group)
        except group_service.GroupInUse:
            return _fail(f"tokens belong to group {group.name!r}; move them to another group first")
        _print(f"Deleted group {group.name} ({group.id}).")
        return 0

    work = {"create": create, "list": listing, "update": change, "delete": delete}[args.groups_command]
    result: int = run_sync(_with_session(settings, work))
    return result


def _usage(settings: Settings, args: argparse.Namespace) -> int:
    def text(connection: Connection) -> str:
        if args.format == "csv":
            return usage_report.csv_text(*usage_report.grouped(
                connection, since=args.since, until=args.until, group_by=args.group_by))
        result = usage_report.report(connection, since=args.since, until=args.until, group_by=args.group_by)
        return orjson.dumps(result).decode() if args.format == "json" else usage_report.as_table(result)

    async def work(session: Any) -> str:
        connection = await session.connection()
        result: str = await connection.run_sync(text)
        return result

    _print(run_sync(_with_session(settings, work)))
    return 0


def _serve(settings: Settings, host: str, port: int, *, demo: bool) -> int:
    import uvicorn

    from app.main import create_app
    from app.serving import DrainingServer, GatewayHttpProtocol

    migrate(settings.database_url)
    transport = None
    demo_app = None
    if demo:
        from app.demo.upstream import create_demo_upstream

        origin = settings.public_url or f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"  # noqa: S104
        url = httpx.URL(origin)
        demo_app = create_demo_upstream(output_base_url=f"{url.scheme}://{url.netloc.decode()}/demo")
        transport = httpx.ASGITransport(app=demo_app)
        settings = settings.model_copy(
            update={"upstream_url": DEMO_UPSTREAM_URL, "upstream_token": None, "upstreams": []})
        _announce_demo(settings, host, port)
    app = create_app(settings, upstream_transport=transport)
    if demo_app is not None:
        app.mount("/demo", demo_app)
    # What start-up made lives as long as the process: keep it out of every collection, and
    # collect the young generation less often (each pass costs the event loop a pause).
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, 20, 20)
    # uvicorn builds its access line's arguments for every response, even when the level then
    # drops it: it is asked for only when INFO lines are kept. No Server header names the stack.
    access_log = logging.getLogger("uvicorn.access").isEnabledFor(logging.INFO)
    config = uvicorn.Config(app, host=host, port=port, log_config=None, proxy_headers=False,
                            access_log=access_log, server_header=False,
                            loop="uvloop" if sys.platform != "win32" else "asyncio", http=GatewayHttpProtocol,
                            timeout_graceful_shutdown=settings.drain_seconds)
    server = DrainingServer(config, on_drain=app.drain)
    # uvicorn raises the signal that stopped it again once it has shut down: Ctrl-C's then
    # surfaces here, as with uvicorn.run.
    with contextlib.suppress(KeyboardInterrupt):
        server.run()
    return 0 if server.started else 1


def _announce_demo(settings: Settings, host: str, port: int) -> None:
    async def work(session: Any) -> Any:
        key = await token_service.load_instance_key(
            session, settings.secret_key.get_secret_value() if settings.secret_key else None
        )
        name = "demo-" + datetime.now(UTC).strftime("%Y%m%d-%H%M%S-%f")
        return await token_service.create(session, key=key, name=name)

    issued = run_sync(_with_session(settings, work))
    base = settings.public_url or f"http://{host}:{port}/replicate"
    _print(
        "replicate-gateway demo: a simulated upstream answers every model.\n"
        f"A token for this demo (shown only now): {issued.secret}\n"
        f"  export REPLICATE_API_TOKEN={issued.secret}\n"
        f"  export REPLICATE_BASE_URL={base}\n"
    )
    sys.stdout.flush()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line."""
    args = build_parser().parse_args(argv)
    settings = get_settings()
    if args.command in ("serve", "demo"):
        return _serve(settings, args.host, args.port, demo=args.command == "demo")
    if args.command == "migrate":
        migrate(settings.database_url)
        _print("The database is up to date.")
        return 0
    if args.command == "tokens":
        return _tokens(settings, args)
    if args.command == "groups":
        return _groups(settings, args)
    return _usage(settings, args)


if __name__ == "__main__":
    raise SystemExit(main())
