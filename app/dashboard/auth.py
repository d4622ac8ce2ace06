"""Dashboard sign-in: signed session cookies, CSRF tokens bound to them, live re-checks."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import orjson
from fastapi import Request
from starlette.responses import Response

from app.columns import utcnow
from app.config import Settings
from app.errors import Forbidden, Unauthenticated
from app.state import GatewayState
from app.tokens import service as token_service
from app.tokens.models import ApiToken

COOKIE = "gw_dashboard"
LOGIN_COOKIE = "gw_dashboard_login"
COOKIE_PATH = "/dashboard"
SESSION_SECONDS = 12 * 3600
LOGIN_SECONDS = 3600
ADMIN = "admin"


@dataclass(frozen=True)
class Viewer:
    """Who is signed in: the admin, or one team token (which sees only its own rows)."""

    token: ApiToken | None  # None for the admin
    session: str

    @property
    def is_admin(self) -> bool:
        """Whether this is the admin's session."""
        return self.token is None

    @property
    def token_id(self) -> str | None:
        """The token every query is limited to, or None for the admin."""
        return self.token.id if self.token is not None else None


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(key: bytes, purpose: bytes, data: bytes) -> str:
    return _b64(hmac.new(key, b"dashboard-" + purpose + b":" + data, hashlib.sha256).digest())


def _admin_binding(settings: Settings) -> bytes:
    # Admin sessions are signed over the admin token's digest: changing GATEWAY_ADMIN_TOKEN
    # ends every admin session at once.
    configured = settings.admin_token
    return hashlib.sha256(configured.get_secret_value().encode()).digest() if configured else b""


def issue(state: GatewayState, subject: str, now: float | None = None) -> str:
    """A session cookie value naming `subject` (ADMIN or a token id) until it expires."""
    expires = int((now if now is not None else time.time()) + SESSION_SECONDS)
    payload = orjson.dumps([subject, expires, secrets.token_urlsafe(9)])
    binding = _admin_binding(state.settings) if subject == ADMIN else b""
    return f"{_b64(payload)}.{_mac(state.key, b'session' + binding, payload)}"


def _subject(state: GatewayState, value: str, now: float) -> str | None:
    try:
        body, signature = value.split(".", 1)
        payload = _unb64(body)
        subject, expires, _ = orjson.loads(payload)
    except (ValueError, TypeError, orjson.JSONDecodeError):
        return None
    if not isinstance(subject, str) or not isinstance(expires, int) or expires <= now:
        return None
    binding = _admin_binding(state.settings) if subject == ADMIN else b""
    if not hmac.compare_digest(signature, _mac(state.key, b"session" + binding, payload)):
        return None
    return subject


async def viewer(request: Request, state: GatewayState) -> Viewer | None:
    """The signed-in viewer, re-checked now: the admin token still configured, or the team token
    still neither revoked nor expired."""
    value = request.cookies.get(COOKIE)
    if not value or len(value) > 512:
        return None
    subject = _subject(state, value, time.time())
    if subject is None:
        return None
    if subject == ADMIN:
        return Viewer(token=None, session=value) if state.settings.admin_token is not None else None
    async with state.sessions() as session:
        token = await session.get(ApiToken, subject)
    if token is None or token.revoked_at is not None:
        return None
    if token.expires_at is not None and token.expires_at <= utcnow():
        return None
    return Viewer(token=token, session=value)


async def sign_in(state: GatewayState, secret: str) -> str | None:
    """The session subject for a presented admin or team token, or None (never saying which
    part was wrong)."""
    configured = state.settings.admin_token
    if configured is not None and hmac.compare_digest(secret.encode(), configured.get_secret_value().encode()):
        return ADMIN
    if not secret.startswith(token_service.TOKEN_PREFIX) or len(secret) > 512:
        return None
    try:
        async with state.sessions() as session:
            token = await token_service.authenticate(session, secret, state.key)
    except Unauthenticated:
        return None
    return token.id


def csrf_token(state: GatewayState, session_value: str) -> str:
    """The CSRF token for forms posted within this session."""
    return _mac(state.key, b"csrf", session_value.encode())


def login_csrf(state: GatewayState, nonce: str) -> str:
    """The CSRF token of the sign-in form, bound to the pre-session cookie's nonce."""
    return _mac(state.key, b"login", nonce.encode())


def new_login_nonce() -> str:
    """A fresh nonce for the pre-session cookie."""
    return secrets.token_urlsafe(18)


def is_https(request: Request, settings: Settings) -> bool:
    """Whether the dashboard is served over https (so its cookies get `Secure`)."""
    return request.url.scheme == "https" or (settings.public_url or "").startswith("https://")


def set_cookie(response: Response, request: Request, settings: Settings, name: str, value: str,
               max_age: int) -> None:
    """An HttpOnly, SameSite=Lax cookie for the dashboard path; Secure over https."""
    response.set_cookie(name, value, max_age=max_age, path=COOKIE_PATH, httponly=True,
                        samesite="lax", secure=is_https(request, settings))


def clear_cookie(response: Response, request: Request, settings: Settings, name: str) -> None:
    """Remove a dashboard cookie."""
    response.delete_cookie(name, path=COOKIE_PATH, httponly=True, samesite="lax",
                           secure=is_https(request, settings))


def check_origin(request: Request, settings: Settings) -> None:
    """Refuse a form posted from another site, when the browser says where it came from."""
    source = request.headers.get("origin") or request.headers.get("referer")
    if not source:
        return
    allowed = {request.headers.get("host", "").lower(), request.url.netloc.lower()}
    if settings.public_url:
        allowed.add(urlsplit(settings.public_url).netloc.lower())
    if urlsplit(source).netloc.lower() not in allowed:
        raise Forbidden("This form was sent from another site")


def check_csrf(expected: str, presented: str | None) -> None:
    """The form's CSRF token matches, or 403."""
    if not presented or not hmac.compare_digest(presented.encode(), expected.encode()):
        raise Forbidden("This form has expired or did not come from the dashboard; reload the page and try again")
