"""Issue, hash, authenticate and revoke gateway tokens."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from datetime import datetime
from fnmatch import fnmatchcase
from typing import Any

from sqlalchemy import Select, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import joinedload

from app.columns import utcnow
from app.errors import Unauthenticated
from app.files.models import StoredFile
from app.groups.models import TokenGroup
from app.predictions.models import Prediction
from app.tokens.models import ApiToken, InstanceKey

TOKEN_PREFIX = "gw_"  # noqa: S105  (a public prefix, not a secret)
INSTANCE_KEY_ID = 1
# Every token is loaded with its group in the same query: creates need the group's limits.
WITH_GROUP = joinedload(ApiToken.group)


# Lowercase base32's characters in the order of the values they stand for (unlike RFC 4648's
# order), so ids keep Replicate's alphabet and still sort by value. Ids are written ten bits,
# two characters, at a time: half the time of base64's pure-Python base32 encoder.
_ALPHABET = "234567abcdefghijklmnopqrstuvwxyz"
_PAIRS = tuple(first + second for first in _ALPHABET for second in _ALPHABET)
_TEN_BIT_SHIFTS = tuple(range(120, -1, -10))


def new_id() -> str:
    """A Replicate-shaped id: 26 lowercase base32 characters, the creation millisecond (50 bits)
    then 80 random bits.

    Ids made later sort later, so each new row lands on the last pages of the indexes keyed by
    it instead of on a random page: with random ids, every create dirtied its own page of the
    prediction key and of the ledger's, and each dirty page is written at commit."""
    value = (time.time_ns() // 1_000_000) << 80 | int.from_bytes(secrets.token_bytes(10), "big")
    pairs = _PAIRS
    return "".join([pairs[value >> shift & 1023] for shift in _TEN_BIT_SHIFTS])


def new_secret_token() -> str:
    """A fresh gateway token: a recognisable prefix and 32 random bytes."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(raw_token: str, key: bytes) -> str:
    """The keyed hash under which a token is stored."""
    return hmac.new(key, raw_token.encode(), hashlib.sha256).hexdigest()


def instance_key(secret: str) -> bytes:
    """The hashing and signing key made from a secret (GATEWAY_SECRET_KEY or the stored one)."""
    return hashlib.sha256(secret.encode()).digest()


async def load_instance_key(session: AsyncSession, configured: str | None) -> bytes:
    """The hashing and signing key: GATEWAY_SECRET_KEY, else one generated once per database."""
    if configured:
        return instance_key(configured)
    row = await session.get(InstanceKey, INSTANCE_KEY_ID)
    if row is None:
        try:
            # A concurrent first start may insert the same row; the loser reads the winner's key.
            async with session.begin_nested():
                session.add(InstanceKey(id=INSTANCE_KEY_ID, key=secrets.token_urlsafe(48)))
            await session.commit()
        except IntegrityError:
            await session.rollback()
        row = await session.get(InstanceKey, INSTANCE_KEY_ID)
        if row is None:
            raise RuntimeError("the instance key could not be stored")
    return instance_key(row.key)


class TokenNameTaken(ValueError):
    """A token with that name already exists."""


@dataclass(frozen=True)
class IssuedToken:
    """A newly created token; `secret` is shown once and never stored."""

    row: ApiToken
    secret: str


async def create(
    session: AsyncSession,
    *,
    key: bytes,
    name: str,
    model_globs: list[str] | None = None,
    budget_micros: int | None = None,
    expires_at: datetime | None = None,
    budget_period: str | None = None,
    rpm_limit: int | None = None,
    max_in_flight: int | None = None,
    group: TokenGroup | None = None,
) -> IssuedToken:
    """Create a token and return it with its one-time secret."""
    secret = new_secret_token()
    row = ApiToken(
        id=new_id(),
        name=name,
        display_prefix=secret[: len(TOKEN_PREFIX) + 6],
        token_hash=hash_token(secret, key),
        model_globs=model_globs or None,
        budget_micros=budget_micros,
        budget_period=budget_period,
        rpm_limit=rpm_limit,
        max_in_flight=max_in_flight,
        expires_at=expires_at,
        created_at=utcnow(),
        group=group,
    )
    session.add(row)
    try:
        await session.commit()
    except IntegrityError as exc:
        await session.rollback()
        raise TokenNameTaken(name) from exc
    return IssuedToken(row=row, secret=secret)


UPDATABLE = frozenset({"budget_micros", "budget_period", "rpm_limit", "max_in_flight", "model_globs", "expires_at",
                       "group_id"})


async def update_limits(session: AsyncSession, token: ApiToken, changes: dict[str, Any]) -> ApiToken:
    """Change a token's limits; its counters are never rewritten, so concurrent admissions and
    settlements are not clobbered."""
    unknown = set(changes) - UPDATABLE
    if unknown:
        raise ValueError(f"cannot update {', '.join(sorted(unknown))}")
    if changes:
        await session.execute(update(ApiToken).where(ApiToken.id == token.id).values(**changes))
        await session.commit()
    refreshed = await session.get(ApiToken, token.id, populate_existing=True, options=[WITH_GROUP])
    if refreshed is None:
        raise LookupError(token.id)
    return refreshed


class TokenInUse(ValueError):
    """The token has predictions or files; revoke it instead of deleting it."""


async def delete(session: AsyncSession, token: ApiToken) -> None:
    """Delete a token that never made a prediction (the ledger is never rewritten)."""
    used = await session.scalar(select(Prediction.id).where(Prediction.token_id == token.id).limit(1))
    uploaded = await session.scalar(select(StoredFile.id).where(StoredFile.token_id == token.id).limit(1))
    if used is not None or uploaded is not None:
        raise TokenInUse(token.name)
    await session.delete(token)
    await session.commit()


async def list_all(session: AsyncSession, search: str | None = None) -> list[ApiToken]:
    """Every token, oldest first; `search` matches part of the name literally."""
    query = select(ApiToken).options(WITH_GROUP).order_by(ApiToken.created_at)
    if search:
        escaped = search[:100].replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        query = query.where(ApiToken.name.like(f"%{escaped}%", escape="\\"))
    return list((await session.scalars(query)).all())


async def find(session: AsyncSession, name_or_id: str) -> ApiToken | None:
    """A token by its name or id."""
    query = (select(ApiToken).options(WITH_GROUP)
             .where(or_(ApiToken.name == name_or_id, ApiToken.id == name_or_id)))
    return (await session.scalars(query)).first()


async def revoke(session: AsyncSession, token: ApiToken) -> None:
    """Revoke a token; it stops working at once."""
    if token.revoked_at is None:
        token.revoked_at = utcnow()
        await session.commit()


async def authenticate(session: AsyncSession, raw_token: str, key: bytes) -> ApiToken:
    """The live token for a presented secret, with its group, or Unauthenticated."""
    return ensure_live(await find_by_hash(session, hash_token(raw_token, key)))


def by_hash(digest: str) -> Select[Any]:
    """The query for the token (with its group) stored under a keyed hash."""
    return select(ApiToken).options(WITH_GROUP).where(ApiToken.token_hash == digest)


def hash_matches(token: ApiToken | None, digest: str) -> ApiToken | None:
    """The token when its stored hash equals `digest` (compared in constant time)."""
    if token is None or not hmac.compare_digest(token.token_hash, digest):
        return None
    return token


async def find_by_hash(session: AsyncSession, digest: str) -> ApiToken | None:
    """The token stored under a keyed hash, live or not."""
    return hash_matches((await session.scalars(by_hash(digest))).first(), digest)


def ensure_live(token: ApiToken | None) -> ApiToken:
    """The token itself when it may be used now, or Unauthenticated."""
    if token is None:
        raise Unauthenticated()
    if token.revoked_at is not None:
        raise Unauthenticated("This token has been revoked")
    if token.expires_at is not None and token.expires_at <= utcnow():
        raise Unauthenticated("This token has expired")
    return token


def may_use_model(token: ApiToken, model: str) -> bool:
    """Whether the token's model globs allow `owner/name`."""
    globs = token.model_globs
    return not globs or any(fnmatchcase(model, glob) for glob in globs)
