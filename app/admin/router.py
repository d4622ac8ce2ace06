"""Admin routes under /admin/v1: tokens and usage, for the holder of GATEWAY_ADMIN_TOKEN."""

from __future__ import annotations

import hmac
from datetime import date, datetime
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.accounting import usage as usage_report
from app.accounting.pricing import to_micros, usd_text
from app.deps import StateDep, presented_secret
from app.errors import BadRequest, Forbidden, NotFound, Unauthenticated
from app.tokens import service as token_service
from app.tokens.models import ApiToken


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


router = APIRouter(dependencies=[Depends(require_admin)])


class TokenCreate(BaseModel):
    """A token to create; `budget_usd` is an exact decimal string or number."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9._@-]*$")
    models: list[Annotated[str, Field(min_length=1, max_length=255)]] | None = Field(default=None, max_length=100)
    budget_usd: Decimal | None = None
    expires_at: datetime | None = None

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
        return amount

    @field_validator("expires_at")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("must include a time zone, e.g. 2027-01-01T00:00:00Z")
        return value


def _json(content: Any, status_code: int = 200) -> Response:
    return Response(orjson.dumps(content), status_code=status_code, media_type="application/json")


def token_view(token: ApiToken) -> dict[str, Any]:
    """A token as admins see it: everything but its hash."""
    return {
        "id": token.id,
        "name": token.name,
        "prefix": token.display_prefix,
        "models": token.model_globs,
        "budget_usd": usd_text(token.budget_micros) if token.budget_micros is not None else None,
        "created_at": token.created_at.isoformat(),
        "expires_at": token.expires_at.isoformat() if token.expires_at else None,
        "revoked_at": token.revoked_at.isoformat() if token.revoked_at else None,
    }


@router.get("/tokens")
async def list_tokens(state: StateDep) -> Response:
    """Every token, without secrets or hashes."""
    async with state.sessions() as session:
        tokens = await token_service.list_all(session)
    return _json({"results": [token_view(t) for t in tokens]})


@router.post("/tokens", status_code=201)
async def create_token(body: TokenCreate, state: StateDep) -> Response:
    """Create a token; the response is the only place its secret ever appears."""
    async with state.sessions() as session:
        try:
            issued = await token_service.create(
                session, key=state.key, name=body.name, model_globs=body.models,
                budget_micros=to_micros(body.budget_usd) if body.budget_usd is not None else None,
                expires_at=body.expires_at,
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
    return _json(token_view(token))


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
    try:
        async with state.sessions() as session:
            result = await usage_report.report(session, since=since, until=until, group_by=group_by or [])
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
    if report_format == "csv":
        return Response(usage_report.as_csv(result), media_type="text/csv")
    return _json(result)
