"""Create, change and delete token groups, and the checks a group puts on each create."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from decimal import Decimal, InvalidOperation
from fnmatch import fnmatchcase
from typing import Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from app.accounting.pricing import ONE_PPM, usd_text
from app.columns import utcnow
from app.errors import Forbidden
from app.groups.models import MAX_MULTIPLIER_PPM, TokenGroup
from app.tokens.models import ApiToken
from app.tokens.service import new_id
from app.upstream.registry import Upstream

UPDATABLE = frozenset({"name", "upstreams", "model_globs", "price_multiplier_ppm"})
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,99}$"  # as a token's name


class GroupNameTaken(ValueError):
    """A group with that name already exists."""


class GroupInUse(ValueError):
    """Tokens still belong to the group."""


def parse_multiplier(value: Any) -> int:
    """A price multiplier such as "1.5" as exact parts per million; ValueError unless it is a
    decimal above 0 and at most 100 with no more than six decimals."""
    if isinstance(value, bool) or not isinstance(value, int | float | str | Decimal):
        raise ValueError("must be a decimal number such as 1.5")
    try:
        # Through str(): a JSON or TOML float keeps the digits that were written.
        amount = Decimal(str(value).strip())
    except InvalidOperation:
        raise ValueError("must be a decimal number such as 1.5") from None
    if not amount.is_finite():
        raise ValueError("must be a decimal number such as 1.5")
    ppm = amount * ONE_PPM
    if ppm != ppm.to_integral_value():
        raise ValueError("must have at most six decimals")
    if not 0 < ppm <= MAX_MULTIPLIER_PPM:
        raise ValueError(f"must be more than 0 and at most {MAX_MULTIPLIER_PPM // ONE_PPM}")
    return int(ppm)


def multiplier_text(ppm: int) -> str:
    """A multiplier in parts per million as an exact decimal string, e.g. "1.500000"."""
    return usd_text(ppm)


def unknown_upstreams(names: Sequence[str], known: Collection[str]) -> list[int]:
    """The positions in `names` of upstreams that are not configured."""
    return [i for i, name in enumerate(names) if name not in known]


def check_model(group: TokenGroup | None, model: str | None) -> None:
    """Raise 403 unless the token's group lets it run `model` (None: a bare version id)."""
    if group is None or group.model_globs is None:
        return
    if model is None:
        raise Forbidden(
            f"This token's group {group.name} is limited to some models; "
            "give the version as owner/name:version_id"
        )
    if not any(fnmatchcase(model, glob) for glob in group.model_globs):
        raise Forbidden(f"This token's group {group.name} may not run {model}")


def allowed_upstreams(group: TokenGroup | None, candidates: list[Upstream], model: str | None) -> list[Upstream]:
    """The candidates the token's group may use, in their order; 403 when none is left."""
    if group is None or group.upstreams is None:
        return candidates
    allowed = [upstream for upstream in candidates if upstream.name in group.upstreams]
    if not allowed:
        raise Forbidden(f"This token's group may not use any upstream serving {model or 'this version'}")
    return allowed


def multiplier_of(group: TokenGroup | None) -> int:
    """The multiplier a create is priced with now, in parts per million."""
    return ONE_PPM if group is None else group.price_multiplier_ppm


def group_view(group: TokenGroup, tokens: int) -> dict[str, Any]:
    """A group as admins see it, with how many tokens belong to it."""
    return {
        "id": group.id,
        "name": group.name,
        "upstreams": group.upstreams,
        "models": group.model_globs,
        "price_multiplier": multiplier_text(group.price_multiplier_ppm),
        "tokens": tokens,
        "created_at": group.created_at.isoformat(),
    }


async def create(
    session: AsyncSession,
    *,
    name: str,
    upstreams: list[str] | None = None,
    model_globs: list[str] | None = None,
    price_multiplier_ppm: int = ONE_PPM,
) -> TokenGroup:
    """Create a group; GroupNameTaken when the name is in use."""
    row = TokenGroup(id=new_id(), name=name, upstreams=upstreams, model_globs=model_globs,
                     price_multiplier_ppm=price_multiplier_ppm, created_at=utcnow())
    session.add(row)
    try:
        await session.commit()
    except IntegrityError as exc:
        await session.rollback()
        raise GroupNameTaken(name) from exc
    return row


async def find(session: AsyncSession, name_or_id: str) -> TokenGroup | None:
    """A group by its name or id."""
    query = select(TokenGroup).where(or_(TokenGroup.name == name_or_id, TokenGroup.id == name_or_id))
    return (await session.scalars(query)).first()


async def list_all(session: AsyncSession) -> list[TokenGroup]:
    """Every group, by name."""
    return list((await session.scalars(select(TokenGroup).order_by(TokenGroup.name))).all())


async def token_counts(session: AsyncSession) -> dict[str, int]:
    """How many tokens (revoked ones too) belong to each group, by group id."""
    query = (select(ApiToken.group_id, func.count(ApiToken.id))
             .where(ApiToken.group_id.is_not(None)).group_by(ApiToken.group_id))
    return {group_id: int(count) for group_id, count in (await session.execute(query)).all() if group_id}


async def update_group(session: AsyncSession, group: TokenGroup, changes: dict[str, Any]) -> TokenGroup:
    """Change a group; running predictions keep the multiplier they were created with."""
    unknown = set(changes) - UPDATABLE
    if unknown:
        raise ValueError(f"cannot update {', '.join(sorted(unknown))}")
    if changes:
        try:
            await session.execute(update(TokenGroup).where(TokenGroup.id == group.id).values(**changes))
            await session.commit()
        except IntegrityError as exc:
            await session.rollback()
            raise GroupNameTaken(str(changes.get("name"))) from exc
    refreshed = await session.get(TokenGroup, group.id, populate_existing=True)
    if refreshed is None:
        raise LookupError(group.id)
    return refreshed


async def delete(session: AsyncSession, group: TokenGroup) -> None:
    """Delete a group no token belongs to; GroupInUse otherwise."""
    member = await session.scalar(select(ApiToken.id).where(ApiToken.group_id == group.id).limit(1))
    if member is not None:
        raise GroupInUse(group.name)
    await session.delete(group)
    try:
        await session.commit()
    except IntegrityError as exc:
        # A token joined it since the check: the reference refuses the delete.
        await session.rollback()
        raise GroupInUse(group.name) from exc
