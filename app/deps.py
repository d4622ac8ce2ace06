"""Request dependencies: the shared state, the caller's token and the public base URL."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request

from app.errors import Unauthenticated
from app.state import GatewayState
from app.tokens import service as token_service
from app.tokens.models import ApiToken

_SCHEMES = ("bearer", "token")


# Dependencies are `async def` even without an await: FastAPI runs plain functions in a thread pool.
async def get_state(request: Request) -> GatewayState:
    """The app's shared state, made in the lifespan."""
    state: GatewayState = request.app.state.gateway
    return state


StateDep = Annotated[GatewayState, Depends(get_state)]


@dataclass(frozen=True)
class Caller:
    """The authenticated token and the secret it presented (kept only for redaction)."""

    token: ApiToken
    secret: str


def presented_secret(request: Request) -> str | None:
    """The token from `Authorization: Bearer <t>` or `Token <t>` (scheme case-insensitive)."""
    header = request.headers.get("authorization")
    if not header:
        return None
    scheme, _, value = header.strip().partition(" ")
    value = value.strip()
    if scheme.lower() not in _SCHEMES or not value or len(value) > 512:
        return None
    return value


async def require_caller(request: Request, state: StateDep) -> Caller:
    """The live gateway token behind this request, or 401."""
    secret = presented_secret(request)
    if secret is None:
        raise Unauthenticated()
    digest = token_service.hash_token(secret, state.key)
    token = state.token_cache.get(digest)
    if token is None:
        async def load() -> ApiToken | None:
            return token_service.hash_matches(await state.hot_reads.first(token_service.by_hash(digest)), digest)

        token = await state.token_cache.get_or_load(digest, load)
    return Caller(token=token_service.ensure_live(token), secret=secret)


CallerDep = Annotated[Caller, Depends(require_caller)]


# Building `request.url` cost a tenth of a cached GET's CPU, and a gateway sees few distinct
# hosts: each base is worked out once per scheme, Host header (or server address) and prefix.
_BASES: dict[tuple[Any, ...], str] = {}
_MAX_BASES = 1024


async def public_base(request: Request, state: StateDep) -> str:
    """The gateway's external base URL, prefix included (`https://gw/replicate`)."""
    if state.settings.public_url:
        return state.settings.public_url
    scope = request.scope
    prefix = "/replicate" if scope["path"].startswith("/replicate/") else ""
    host = next((value for name, value in scope["headers"] if name == b"host"), None)
    key = (scope.get("scheme"), host, scope.get("server") if host is None else None, prefix)
    base = _BASES.get(key)
    if base is None:
        if len(_BASES) >= _MAX_BASES:
            _BASES.clear()
        base = _BASES[key] = f"{request.url.scheme}://{request.url.netloc}{prefix}"
    return base


PublicBaseDep = Annotated[str, Depends(public_base)]
