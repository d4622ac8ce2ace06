"""Admin routes under /admin/v1: tokens, groups and usage, for the holder of GATEWAY_ADMIN_TOKEN."""

from __future__ import annotations

import hmac
from collections.abc import Callable, Coroutine
from datetime import date, datetime
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any, Literal

import httpx
import orjson
from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy.ext.asyncio import AsyncSession

from app.accounting import service as accounting
from app.accounting import usage as usage_report
from app.accounting.pricing import ONE_PPM, to_micros, usd_text
from app.columns import INTEGER_MAX, utcnow
from app.deps import StateDep, get_state, presented_secret, public_base
from app.errors import BadRequest, Conflict, Forbidden, NotFound, Unauthenticated, ValidationFailed
from app.groups import service as group_service
from app.groups.models import TokenGroup
from app.predictions import rewrite
from app.predictions import search as prediction_search
from app.tokens import service as token_service
from app.tokens.models import ApiToken
from app.webhooks import service as webhook_service


async def require_admin(request: Request, state: StateDep) -> None:
    """The admin token, compared in constant time; the whole API is absent without one."""
    configured = state.settings.admin_token
    if configured is None:
        raise NotFound("The requested resource could not be found")
    secret = presented_secret(request)
    if secret is None:
        raise Unauthenticated()
    if not hmac.compare_digest(secret.encode(), configured.get_secret_value().encode()):
        raise Forbidden("This token may not use the admin API")


class AdminRoute(APIRoute):
    """An admin route, refused before anything else is read: the framework parses a declared
    JSON body ahead of every dependency, so a stranger's unreadable body would get a 422 (and
    learn the route exists) instead of a 401."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def admin_only(request: Request) -> Response:
            await require_admin(request, await get_state(request))
            return await handler(request)

        return admin_only


router = APIRouter(route_class=AdminRoute)


Glob = Annotated[str, Field(min_length=1, max_length=255)]


# Well inside what the ledger's 64-bit counters of micro-dollars hold (about 9.2e12 USD).
MAX_BUDGET_USD = Decimal(10**12)


class TokenLimits(BaseModel):
    """Limits a token can carry; in an update, a key present with null removes that limit."""

    model_config = ConfigDict(extra="forbid")

    models: list[Glob] | None = Field(default=None, max_length=100)
    budget_usd: Decimal | None = None
    budget_period: Literal["total", "month"] | None = None
    rpm_limit: int | None = Field(default=None, ge=1, le=INTEGER_MAX)
    max_in_flight: int | None = Field(default=None, ge=1, le=INTEGER_MAX)
    expires_at: datetime | None = None
    group: str | None = Field(default=None, min_length=1, max_length=100)  # name or id

    @field_validator("budget_usd", mode="before")
    @classmethod
    def _exact(cls, value: Any) -> Any:
        if value is None or isinstance(value, Decimal):
            return value
        try:
            amount = Decimal(str(value))
        except InvalidOperation:
            raise ValueError("must be a decimal amount of USD") from None
        if not amount.is_finite() or amount < 0:
            raise ValueError("must be a non-negative amount")
        if amount > MAX_BUDGET_USD:
            raise ValueError(f"must be at most {MAX_BUDGET_USD:,} USD")
        return amount

    @field_validator("expires_at")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("must include a time zone, e.g. 2027-01-01T00:00:00Z")
        return value

    def columns(self) -> dict[str, Any]:
        """The token columns for the fields that were given."""
        mapping = {"models": "model_globs", "budget_usd": "budget_micros", "budget_period": "budget_period",
                   "rpm_limit": "rpm_limit", "max_in_flight": "max_in_flight", "expires_at": "expires_at"}
        values: dict[str, Any] = {}
        for field in self.model_fields_set & mapping.keys():
            value = getattr(self, field)
            if field == "budget_usd" and value is not None:
                value = to_micros(value)
            elif field == "budget_period":
                value = "month" if value == "month" else None
            values[mapping[field]] = value
        return values


class TokenCreate(TokenLimits):
    """A token to create; `budget_usd` is an exact decimal string or number."""

    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9._@-]*$")


def _json(content: Any, status_code: int = 200) -> Response:
    return Response(orjson.dumps(content), status_code=status_code, media_type="application/json")


def token_view(token: ApiToken) -> dict[str, Any]:
    """A token as admins see it: everything but its hash."""
    return {
        "id": token.id,
        "name": token.name,
        "prefix": token.display_prefix,
        "models": token.model_globs,
        "group": token.group.name if token.group else None,
        **accounting.budget_view(token, utcnow()),
        "created_at": token.created_at.isoformat(),
        "expires_at": token.expires_at.isoformat() if token.expires_at else None,
        "revoked_at": token.revoked_at.isoformat() if token.revoked_at else None,
    }


@router.get("/tokens")
async def list_tokens(state: StateDep, search: Annotated[str | None, Query(max_length=100)] = None) -> Response:
    """Every token, or those whose name contains `search`, without secrets or hashes."""
    async with state.read_sessions() as session:
        tokens = await token_service.list_all(session, search)
    return _json({"results": [token_view(t) for t in tokens]})


async def _token(session: AsyncSession, name_or_id: str) -> ApiToken:
    token = await token_service.find(session, name_or_id)
    if token is None:
        raise NotFound("No such token")
    return token


@router.get("/tokens/{name_or_id}")
async def get_token(name_or_id: str, state: StateDep) -> Response:
    """One token with its budget, spent, reserved and remaining."""
    async with state.read_sessions() as session:
        return _json(token_view(await _token(session, name_or_id)))


@router.patch("/tokens/{name_or_id}")
async def update_token(name_or_id: str, body: TokenLimits, state: StateDep) -> Response:
    """Change a token's limits or group; a key given as null removes that limit or group."""
    async with state.sessions() as session:
        token = await _token(session, name_or_id)
        changes = body.columns()
        if "group" in body.model_fields_set:
            group = await _named_group(session, body.group)
            changes["group_id"] = group.id if group else None
        token = await token_service.update_limits(session, token, changes)
    state.token_cache.forget(token.token_hash)
    return _json(token_view(token))


@router.delete("/tokens/{name_or_id}", status_code=204)
async def delete_token(name_or_id: str, state: StateDep) -> Response:
    """Delete a token that never made a prediction; one with a ledger must be revoked instead."""
    async with state.sessions() as session:
        token = await _token(session, name_or_id)
        state.token_cache.forget(token.token_hash)
        try:
            await token_service.delete(session, token)
        except token_service.TokenInUse:
            raise Conflict("This token has predictions or files; revoke it instead") from None
    return Response(status_code=204)


@router.post("/tokens", status_code=201)
async def create_token(body: TokenCreate, state: StateDep) -> Response:
    """Create a token; the response is the only place its secret ever appears."""
    async with state.sessions() as session:
        limits = body.columns()
        group = await _named_group(session, body.group)
        try:
            issued = await token_service.create(
                session, key=state.key, name=body.name, model_globs=limits.get("model_globs"),
                budget_micros=limits.get("budget_micros"), expires_at=body.expires_at,
                budget_period=limits.get("budget_period"), rpm_limit=body.rpm_limit,
                max_in_flight=body.max_in_flight, group=group,
            )
        except token_service.TokenNameTaken:
            raise BadRequest(f"A token named {body.name} already exists") from None
    return _json({**token_view(issued.row), "token": issued.secret}, 201)


@router.post("/tokens/{name_or_id}/revoke")
async def revoke_token(name_or_id: str, state: StateDep) -> Response:
    """Revoke a token by name or id; it stops working at once."""
    async with state.sessions() as session:
        token = await token_service.find(session, name_or_id)
        if token is None:
            raise NotFound("No such token")
        await token_service.revoke(session, token)
    state.token_cache.forget(token.token_hash)
    return _json(token_view(token))


async def _named_group(session: AsyncSession, name_or_id: str | None) -> TokenGroup | None:
    """The group a token body names (None for none); 422 when there is no such group."""
    if name_or_id is None:
        return None
    group = await group_service.find(session, name_or_id)
    if group is None:
        raise ValidationFailed([{"type": "not_found", "field": "group",
                                 "description": f"there is no group named {name_or_id}"}])
    return group


UpstreamName = Annotated[str, Field(min_length=1, max_length=64)]


class GroupLimits(BaseModel):
    """What a group limits; null means every upstream, every model, or a multiplier of 1."""

    model_config = ConfigDict(extra="forbid")

    upstreams: list[UpstreamName] | None = Field(default=None, min_length=1, max_length=100)
    models: list[Glob] | None = Field(default=None, min_length=1, max_length=100)
    price_multiplier: Decimal | None = None

    @field_validator("price_multiplier", mode="before")
    @classmethod
    def _exact_multiplier(cls, value: Any) -> Any:
        if value is None:
            return None
        group_service.parse_multiplier(value)  # its ValueError becomes a 422 naming the field
        return Decimal(str(value).strip())

    def columns(self, known_upstreams: set[str]) -> dict[str, Any]:
        """The group columns for the fields that were given; 422 for an unknown upstream."""
        values: dict[str, Any] = {}
        fields = self.model_fields_set
        if "upstreams" in fields:
            if self.upstreams is not None:
                unknown = group_service.unknown_upstreams(self.upstreams, known_upstreams)
                if unknown:
                    raise ValidationFailed([
                        {"type": "unknown_upstream", "field": f"upstreams.{i}",
                         "description": f"no upstream named {self.upstreams[i]} is configured"}
                        for i in unknown
                    ])
            values["upstreams"] = self.upstreams
        if "models" in fields:
            values["model_globs"] = self.models
        if "price_multiplier" in fields:
            values["price_multiplier_ppm"] = (ONE_PPM if self.price_multiplier is None
                                              else group_service.parse_multiplier(self.price_multiplier))
        return values


GroupName = Annotated[str, Field(min_length=1, max_length=100, pattern=group_service.NAME_PATTERN)]


class GroupCreate(GroupLimits):
    """A group to create."""

    name: GroupName


class GroupUpdate(GroupLimits):
    """Changes to a group; `name` renames it."""

    name: GroupName | None = None


def _configured(state: StateDep) -> set[str]:
    return {upstream.name for upstream in state.registry.all}


async def _group(session: AsyncSession, name_or_id: str) -> TokenGroup:
    group = await group_service.find(session, name_or_id)
    if group is None:
        raise NotFound("No such group")
    return group


@router.get("/groups")
async def list_groups(state: StateDep) -> Response:
    """Every group with its limits, multiplier and number of tokens."""
    async with state.read_sessions() as session:
        groups = await group_service.list_all(session)
        counts = await group_service.token_counts(session)
    return _json({"results": [group_service.group_view(g, counts.get(g.id, 0)) for g in groups]})


@router.post("/groups", status_code=201)
async def create_group(body: GroupCreate, state: StateDep) -> Response:
    """Create a group; its upstreams must be configured ones."""
    values = body.columns(_configured(state))
    async with state.sessions() as session:
        try:
            group = await group_service.create(session, name=body.name, **values)
        except group_service.GroupNameTaken:
            raise BadRequest(f"A group named {body.name} already exists") from None
    return _json(group_service.group_view(group, 0), 201)


@router.get("/groups/{name_or_id}")
async def get_group(name_or_id: str, state: StateDep) -> Response:
    """One group."""
    async with state.read_sessions() as session:
        group = await _group(session, name_or_id)
        counts = await group_service.token_counts(session)
    return _json(group_service.group_view(group, counts.get(group.id, 0)))


@router.patch("/groups/{name_or_id}")
async def update_group(name_or_id: str, body: GroupUpdate, state: StateDep) -> Response:
    """Change a group; running predictions keep the multiplier they were created with."""
    values = body.columns(_configured(state))
    if "name" in body.model_fields_set:
        if body.name is None:
            raise ValidationFailed([{"type": "required", "field": "name", "description": "cannot be null"}])
        values["name"] = body.name
    async with state.sessions() as session:
        try:
            group = await group_service.update_group(session, await _group(session, name_or_id), values)
        except group_service.GroupNameTaken:
            raise BadRequest(f"A group named {body.name} already exists") from None
        counts = await group_service.token_counts(session)
    state.token_cache.clear()  # cached tokens carry their group: none may keep the old one
    return _json(group_service.group_view(group, counts.get(group.id, 0)))


@router.delete("/groups/{name_or_id}", status_code=204)
async def delete_group(name_or_id: str, state: StateDep) -> Response:
    """Delete a group no token belongs to (409 otherwise: move or revoke its tokens first)."""
    async with state.sessions() as session:
        try:
            await group_service.delete(session, await _group(session, name_or_id))
        except group_service.GroupInUse:
            raise Conflict("Tokens belong to this group; move them to another group first") from None
    return Response(status_code=204)


@router.get("/usage")
async def get_usage(
    state: StateDep,
    since: date | None = None,
    until: date | None = None,
    group_by: Annotated[list[str] | None, Query()] = None,
    report_format: Annotated[str, Query(alias="format")] = "json",
) -> Response:
    """Predictions and exact cost, grouped as the `usage` command groups them; JSON or CSV."""
    if report_format not in ("json", "csv"):
        raise BadRequest("format must be json or csv")
    keys = group_by or []
    # Checked here, not by catching the report's ValueError: the query's own libraries raise
    # ValueErrors too, and their text is not for callers.
    unknown = [key for key in keys if key not in usage_report.GROUP_KEYS]
    if unknown:
        raise BadRequest(f"cannot group by {', '.join(unknown)}")
    if report_format == "csv":
        text = await state.report_reads.run(lambda connection: usage_report.csv_text(
            *usage_report.grouped(connection, since=since, until=until, group_by=keys)))
        return Response(text, media_type="text/csv")
    result = await state.report_reads.run(
        lambda connection: usage_report.report(connection, since=since, until=until, group_by=keys))
    return _json(result)


@router.get("/predictions")
async def list_predictions(
    request: Request,
    state: StateDep,
    token: Annotated[str | None, Query(max_length=100)] = None,
    model: Annotated[str | None, Query(max_length=255)] = None,
    status: Annotated[str | None, Query(max_length=16)] = None,
    since: date | None = None,
    until: date | None = None,
    cursor: Annotated[str | None, Query(max_length=512)] = None,
) -> Response:
    """Every token's predictions, newest first, 100 a page, filtered by token (name or id),
    model (owner/name), status and day range; with each one's cost and ledger state."""
    async with state.read_sessions() as session:
        owner = await _token(session, token) if token else None
        rows, next_cursor = await prediction_search.search(
            session, key=state.key, token_id=owner.id if owner else None, model=model, status=status,
            since=since, until=until, cursor_text=cursor,
        )
        names = await prediction_search.token_names(session, {row.token_id for row in rows})
    public = await public_base(request, state)
    results = [
        {**rewrite.to_client(row, public, state.key), "token": names.get(row.token_id),
         "submission": row.submission, "cost_usd": usd_text(row.cost_micros or 0),
         "estimate_usd": usd_text(row.estimate_micros), "cost_note": row.cost_note,
         "price_multiplier": group_service.multiplier_text(row.price_multiplier_ppm)}
        for row in rows
    ]
    next_url = None
    if next_cursor:
        query = {k: v for k, v in request.query_params.items() if k != "cursor"}
        next_url = str(request.url.replace_query_params(**query, cursor=next_cursor))
    return _json({"next": next_url, "results": results})


@router.get("/webhooks/deliveries")
async def list_webhook_deliveries(
    request: Request,
    state: StateDep,
    status: Literal["pending", "delivered", "dead"] | None = None,
    before: Annotated[int | None, Query(ge=1, le=INTEGER_MAX)] = None,
) -> Response:
    """Webhook deliveries, newest first, 100 a page (`next`), optionally only one status; each
    shows its URL's host only, never the path or query a receiver may put secrets in."""
    async with state.read_sessions() as session:
        results, next_before = await webhook_service.page(session, status=status, before=before)
    next_url = None
    if next_before is not None:
        query = {k: v for k, v in request.query_params.items() if k != "before"}
        next_url = str(request.url.replace_query_params(**query, before=next_before))
    return _json({"next": next_url, "results": results})


@router.get("/upstreams")
async def list_upstreams(state: StateDep) -> Response:
    """Each upstream's routing settings and circuit-breaker state; never its key."""
    return _json({"results": [
        {
            "name": upstream.name,
            "host": httpx.URL(upstream.config.url).host,
            "models": upstream.config.models,
            "priority": upstream.config.priority,
            "weight": upstream.config.weight,
            "circuit": upstream.breaker.state,
            "consecutive_failures": upstream.breaker.failures,
        }
        for upstream in state.registry.all
    ]})
