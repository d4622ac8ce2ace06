"""Dashboard pages under /dashboard, and the /p/{id} links older prediction URLs used."""

from __future__ import annotations

import re
from collections.abc import Callable, Coroutine
from datetime import UTC, date, datetime, timedelta
from typing import Annotated, Any
from urllib.parse import parse_qs, urlencode

from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.routing import APIRoute
from pydantic import ValidationError

from app.accounting import service as accounting
from app.accounting import usage as usage_report
from app.accounting.pricing import usd_text
from app.admin.router import TokenCreate, TokenLimits
from app.columns import utcnow
from app.dashboard import auth, queries, render
from app.deps import StateDep
from app.errors import BadRequest, GatewayError, NotFound, Unauthenticated, invalid_fields_from
from app.predictions import search as prediction_search
from app.predictions.models import STATUSES, Prediction
from app.state import GatewayState
from app.tokens import service as token_service
from app.tokens.models import ApiToken

DEFAULT_DAYS = 30
MAX_DAYS = 366
_PREDICTION_ID = re.compile(r"^[a-z0-9]{1,64}$")
_NEXT = re.compile(r"^/dashboard(/[A-Za-z0-9._~/-]*)?(\?[A-Za-z0-9._~=&%+-]*)?$")


class SignInRequired(Exception):
    """No live session: pages send the browser to the sign-in form."""


def _html(body: str, status_code: int = 200) -> HTMLResponse:
    return HTMLResponse(body, status_code=status_code, headers=render.SECURITY_HEADERS)


def _redirect(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303, headers={"Cache-Control": "no-store"})


def _to_sign_in(request: Request) -> Response:
    wanted = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    if request.method != "GET" or not _NEXT.match(wanted) or wanted.startswith("/dashboard/login"):
        return _redirect("/dashboard/login")
    return _redirect("/dashboard/login?" + urlencode({"next": wanted}))


def _error_page(status: int, heading: str, detail: str) -> Response:
    return _html(render.render("error.html", {"title": heading, "heading": heading, "detail": detail,
                                              "viewer": None}), status)


class DashboardRoute(APIRoute):
    """A page route: no session sends the browser to sign in; errors become readable pages."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def page(request: Request) -> Response:
            try:
                return await handler(request)
            except SignInRequired:
                return _to_sign_in(request)
            except GatewayError as exc:
                return _error_page(exc.status, exc.title, exc.detail)
            except RequestValidationError:
                return _error_page(400, "Bad Request", "The address has a value this page cannot use.")

        return page


async def signed_in(request: Request, state: StateDep) -> auth.Viewer:
    """The live viewer, or SignInRequired."""
    viewer = await auth.viewer(request, state)
    if viewer is None:
        raise SignInRequired()
    return viewer


ViewerDep = Annotated[auth.Viewer, Depends(signed_in)]
pages = APIRouter(route_class=DashboardRoute)
router = APIRouter()


def _page(state: GatewayState, viewer: auth.Viewer, template: str, *, title: str, nav: str = "",
          status: int = 200, **context: Any) -> HTMLResponse:
    return _html(render.render(template, {
        "title": title, "nav": nav, "viewer": viewer, "csrf": auth.csrf_token(state, viewer.session), **context,
    }), status)


async def _form(request: Request) -> dict[str, str]:
    """A urlencoded form's fields (the last value of each)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/x-www-form-urlencoded":
        raise BadRequest("Send the form as application/x-www-form-urlencoded")
    try:
        fields = parse_qs((await request.body()).decode(), keep_blank_values=True, max_num_fields=50)
    except (UnicodeDecodeError, ValueError):
        raise BadRequest("The form could not be read") from None
    return {key: values[-1] for key, values in fields.items()}


async def _posted(request: Request, state: GatewayState, viewer: auth.Viewer) -> dict[str, str]:
    """A form posted within the viewer's session: same site, with the session's CSRF token."""
    auth.check_origin(request, state.settings)
    form = await _form(request)
    auth.check_csrf(auth.csrf_token(state, viewer.session), form.get("csrf"))
    return form


def _admin(viewer: auth.Viewer) -> None:
    if not viewer.is_admin:
        raise NotFound("The requested page could not be found")


def _day(value: str | None, what: str) -> date | None:
    if not value:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise BadRequest(f"{what} must be a day such as 2026-11-21") from None


def _range(request: Request, default_days: int = DEFAULT_DAYS) -> tuple[date, date]:
    until = _day(request.query_params.get("until"), "To") or datetime.now(UTC).date()
    since = _day(request.query_params.get("since"), "From") or until - timedelta(days=default_days - 1)
    if since > until:
        raise BadRequest("The range starts after it ends")
    if (until - since).days >= MAX_DAYS:
        raise BadRequest(f"Choose a range of at most {MAX_DAYS} days")
    return since, until


# ---- sign-in ---------------------------------------------------------------------------------

def _safe_next(value: str | None) -> str:
    return value if value and _NEXT.match(value) and not value.startswith("/dashboard/login") else "/dashboard"


def _login_page(request: Request, state: GatewayState, *, error: str | None = None,
                status: int = 200) -> Response:
    nonce = request.cookies.get(auth.LOGIN_COOKIE)
    fresh = not nonce or len(nonce) > 64
    if fresh:
        nonce = auth.new_login_nonce()
    assert nonce is not None  # noqa: S101  (for the type checker)
    body = render.render("login.html", {
        "title": "Sign in", "viewer": None, "error": error, "csrf": auth.login_csrf(state, nonce),
        "next": _safe_next(request.query_params.get("next")),
    })
    response = _html(body, status)
    if fresh:
        auth.set_cookie(response, request, state.settings, auth.LOGIN_COOKIE, nonce, auth.LOGIN_SECONDS)
    return response


@pages.get("/dashboard/login")
async def login_form(request: Request, state: StateDep) -> Response:
    """The sign-in form."""
    if await auth.viewer(request, state) is not None:
        return _redirect(_safe_next(request.query_params.get("next")))
    return _login_page(request, state)


@pages.post("/dashboard/login")
async def login(request: Request, state: StateDep) -> Response:
    """Sign in with the admin token or a team token; the cookie holds a signed session, never
    the token."""
    auth.check_origin(request, state.settings)
    form = await _form(request)
    nonce = request.cookies.get(auth.LOGIN_COOKIE) or ""
    if not nonce:
        return _login_page(request, state, status=400,
                           error="Your browser did not keep the sign-in cookie; allow cookies for this site and try again.")
    auth.check_csrf(auth.login_csrf(state, nonce), form.get("csrf"))
    subject = await auth.sign_in(state, form.get("token", "").strip())
    if subject is None:
        return _login_page(request, state, status=401,
                           error="Sign-in failed: that token is not valid for this gateway.")
    response = _redirect(_safe_next(form.get("next")))
    auth.set_cookie(response, request, state.settings, auth.COOKIE, auth.issue(state, subject),
                    auth.SESSION_SECONDS)
    auth.clear_cookie(response, request, state.settings, auth.LOGIN_COOKIE)
    return response


@pages.post("/dashboard/logout")
async def logout(request: Request, state: StateDep, viewer: ViewerDep) -> Response:
    """Sign out: the session cookie is removed."""
    await _posted(request, state, viewer)
    response = _redirect("/dashboard/login")
    auth.clear_cookie(response, request, state.settings, auth.COOKIE)
    return response


# ---- overview --------------------------------------------------------------------------------

@pages.get("/dashboard")
async def overview(request: Request, state: StateDep, viewer: ViewerDep) -> Response:
    """Spend and predictions per day as charts, and per token and per model, over a range."""
    since, until = _range(request)
    async with state.read_sessions() as session:
        result = await queries.overview(session, token_id=viewer.token_id, since=since, until=until)
    return _page(state, viewer, "overview.html", title="Overview", nav="overview", o=result,
                 cost_chart=render.chart(result.days, money=True),
                 count_chart=render.chart(result.days, money=False))


@pages.get("/dashboard/")
async def overview_slash() -> Response:
    """The overview, at its canonical address."""
    return _redirect("/dashboard")


# ---- tokens ----------------------------------------------------------------------------------

def _state_of(token: ApiToken) -> str:
    if token.revoked_at is not None:
        return "revoked"
    if token.expires_at is not None and token.expires_at <= utcnow():
        return "expired"
    return "active"


def _limits_form(token: ApiToken | None) -> dict[str, Any]:
    if token is None:
        return {"budget_period": "total"}
    return {
        "budget_usd": usd_text(token.budget_micros) if token.budget_micros is not None else "",
        "budget_period": token.budget_period or "total",
        "rpm_limit": token.rpm_limit, "max_in_flight": token.max_in_flight,
        "models": " ".join(token.model_globs or []),
        "expires_at": token.expires_at.strftime("%Y-%m-%dT%H:%M") if token.expires_at else "",
    }


def _limits_input(form: dict[str, str]) -> dict[str, Any]:
    """The form's limit fields as the admin API takes them; an empty field is no limit."""
    def blank(name: str) -> str | None:
        value = form.get(name, "").strip()
        return value or None

    expires = blank("expires_at")
    if expires and not re.search(r"(Z|[+-]\d\d:\d\d)$", expires):
        expires += "+00:00"  # the form's field is a UTC wall-clock time
    models = [m for m in re.split(r"[\s,]+", form.get("models", "")) if m]
    return {"budget_usd": blank("budget_usd"), "budget_period": blank("budget_period") or "total",
            "rpm_limit": blank("rpm_limit"), "max_in_flight": blank("max_in_flight"),
            "models": models or None, "expires_at": expires}


def _problems(exc: ValidationError) -> list[str]:
    return [f"{f['field']}: {f['description']}" for f in invalid_fields_from(exc.errors())]


async def _tokens_page(request: Request, state: GatewayState, viewer: auth.Viewer, *,
                       form: dict[str, Any] | None = None, errors: list[str] | None = None,
                       status: int = 200) -> Response:
    after = request.query_params.get("after") if request.method == "GET" else None
    async with state.read_sessions() as session:
        tokens, next_after = await queries.tokens_page(session, after=after, only=viewer.token_id)
        recent = await queries.recent_spend(session, [t.id for t in tokens],
                                            datetime.now(UTC).date() - timedelta(days=DEFAULT_DAYS - 1))
    now = utcnow()
    return _page(state, viewer, "tokens.html", title="Tokens", nav="tokens", status=status, tokens=tokens,
                 next_after=next_after, after=after, recent=recent,
                 budgets={t.id: accounting.budget_view(t, now) for t in tokens},
                 states={t.id: _state_of(t) for t in tokens},
                 form=form or _limits_form(None), errors=errors)


@pages.get("/dashboard/tokens")
async def tokens(request: Request, state: StateDep, viewer: ViewerDep) -> Response:
    """Tokens by name, 50 a page (a team token sees only itself), and the create form."""
    return await _tokens_page(request, state, viewer)


@pages.post("/dashboard/tokens")
async def create_token(request: Request, state: StateDep, viewer: ViewerDep) -> Response:
    """Create a token; the answer is the only place its secret is ever shown."""
    form = await _posted(request, state, viewer)
    _admin(viewer)
    shown = {**form, "csrf": None}
    try:
        body = TokenCreate.model_validate({"name": form.get("name", "").strip(), **_limits_input(form)})
    except ValidationError as exc:
        return await _tokens_page(request, state, viewer, form=shown, errors=_problems(exc), status=422)
    limits = body.columns()
    async with state.sessions() as session:
        try:
            issued = await token_service.create(
                session, key=state.key, name=body.name, model_globs=limits.get("model_globs"),
                budget_micros=limits.get("budget_micros"), expires_at=body.expires_at,
                budget_period=limits.get("budget_period"), rpm_limit=body.rpm_limit,
                max_in_flight=body.max_in_flight,
            )
        except token_service.TokenNameTaken:
            return await _tokens_page(request, state, viewer, form=shown, status=409,
                                      errors=[f"A token named {body.name} already exists."])
    return _page(state, viewer, "token_created.html", title=f"Token {body.name} created", nav="tokens",
                 status=201, t=issued.row, secret=issued.secret)


async def _visible_token(state: GatewayState, viewer: auth.Viewer, token_id: str) -> ApiToken:
    if viewer.token_id is not None and token_id != viewer.token_id:
        raise NotFound("The requested token could not be found")
    async with state.read_sessions() as session:
        token = await session.get(ApiToken, token_id[:64])
    if token is None:
        raise NotFound("The requested token could not be found")
    return token


async def _token_page(request: Request, state: GatewayState, viewer: auth.Viewer, token: ApiToken, *,
                      form: dict[str, Any] | None = None, errors: list[str] | None = None,
                      status: int = 200) -> Response:
    notice = {"updated": "The limits were saved.", "revoked": "The token was revoked."}.get(
        request.query_params.get("done", ""))
    return _page(state, viewer, "token.html", title=f"Token {token.name}", nav="tokens", status=status,
                 t=token, token_state=_state_of(token), b=accounting.budget_view(token, utcnow()),
                 form=form or _limits_form(token), errors=errors, notice=notice)


@pages.get("/dashboard/tokens/{token_id}")
async def token_detail(token_id: str, request: Request, state: StateDep, viewer: ViewerDep) -> Response:
    """One token: its limits and spend; the admin can change or revoke it here."""
    return await _token_page(request, state, viewer, await _visible_token(state, viewer, token_id))


@pages.post("/dashboard/tokens/{token_id}")
async def update_token(token_id: str, request: Request, state: StateDep, viewer: ViewerDep) -> Response:
    """Change a token's limits; an empty field removes that limit."""
    form = await _posted(request, state, viewer)
    _admin(viewer)
    token = await _visible_token(state, viewer, token_id)
    try:
        changes = TokenLimits.model_validate(_limits_input(form)).columns()
    except ValidationError as exc:
        return await _token_page(request, state, viewer, token, form=form, errors=_problems(exc), status=422)
    async with state.sessions() as session:
        await token_service.update_limits(session, token, changes)
    state.token_cache.forget(token.token_hash)
    return _redirect(f"/dashboard/tokens/{token.id}?done=updated")


@pages.post("/dashboard/tokens/{token_id}/revoke")
async def revoke_token(token_id: str, request: Request, state: StateDep, viewer: ViewerDep) -> Response:
    """Revoke a token; it stops working at once."""
    await _posted(request, state, viewer)
    _admin(viewer)
    token = await _visible_token(state, viewer, token_id)
    async with state.sessions() as session:
        row = await session.get(ApiToken, token.id)
        if row is not None:
            await token_service.revoke(session, row)
    state.token_cache.forget(token.token_hash)
    return _redirect(f"/dashboard/tokens/{token.id}?done=revoked")


# ---- predictions -----------------------------------------------------------------------------

@pages.get("/dashboard/predictions")
async def predictions(request: Request, state: StateDep, viewer: ViewerDep) -> Response:
    """Predictions newest first, 100 a page through a signed cursor, filtered by token, model,
    status and day range."""
    params = request.query_params
    filters = {k: params.get(k, "").strip()[:255] for k in ("token", "model", "status", "since", "until")}
    if filters["status"] and filters["status"] not in STATUSES:
        raise BadRequest(f"status must be one of {', '.join(sorted(STATUSES))}")
    since, until = _day(filters["since"], "From"), _day(filters["until"], "To")
    notice = None
    rows: list[Prediction] = []
    next_cursor = None
    names: dict[str, str] = {}
    async with state.read_sessions() as session:
        owner: str | None = viewer.token_id
        if viewer.is_admin and filters["token"]:
            found = await token_service.find(session, filters["token"][:100])
            owner = found.id if found else None
            if found is None:
                notice = f"No token is named {filters['token']}."
        if notice is None:
            rows, next_cursor = await prediction_search.search(
                session, key=state.key, token_id=owner, model=filters["model"] or None,
                status=filters["status"] or None, since=since, until=until,
                cursor_text=params.get("cursor", "")[:512] or None,
            )
            names = await queries.token_names(session, list({row.token_id for row in rows}))
    kept = {k: v for k, v in filters.items() if v and (k != "token" or viewer.is_admin)}
    first_url = "/dashboard/predictions?" + urlencode(kept) if params.get("cursor") else None
    next_url = "/dashboard/predictions?" + urlencode({**kept, "cursor": next_cursor}) if next_cursor else None
    return _page(state, viewer, "predictions.html", title="Predictions", nav="predictions", rows=rows,
                 names=names, f=filters, statuses=sorted(STATUSES), notice=notice,
                 next_url=next_url, first_url=first_url)


@pages.get("/dashboard/predictions/{prediction_id}")
async def prediction(prediction_id: str, state: StateDep, viewer: ViewerDep) -> Response:
    """One prediction: input, status, error, logs, timings, cost, ledger and output previews."""
    if not _PREDICTION_ID.match(prediction_id):
        raise NotFound("The requested prediction could not be found")
    async with state.read_sessions() as session:
        row = await session.get(Prediction, prediction_id)
        if row is None or (viewer.token_id is not None and row.token_id != viewer.token_id):
            raise NotFound("The requested prediction could not be found")
        names = await queries.token_names(session, [row.token_id])
        entries = await queries.ledger(session, row.id)
    predict_time = (row.metrics or {}).get("predict_time")
    return _page(state, viewer, "prediction.html", title=f"Prediction {row.id}", nav="predictions", p=row,
                 token_name=names.get(row.token_id, row.token_id), ledger=entries,
                 previews=render.previews(row.output),
                 predict_time=predict_time if isinstance(predict_time, int | float) else None)


# ---- usage export ----------------------------------------------------------------------------

@pages.get("/dashboard/usage")
async def usage(request: Request, state: StateDep, viewer: ViewerDep) -> Response:
    """The usage export form."""
    since, until = _range(request)
    return _page(state, viewer, "usage.html", title="Usage export", nav="usage",
                 since=since.isoformat(), until=until.isoformat())


@router.get("/dashboard/usage.csv")
async def usage_csv(request: Request, state: StateDep) -> Response:
    """Usage as CSV, the usage report's columns and rows; 401 without a session."""
    viewer = await auth.viewer(request, state)
    if viewer is None:
        raise Unauthenticated("Sign in to the dashboard first")
    since, until = _range(request)
    group_by = [g for g in request.query_params.getlist("group_by") if g in usage_report.GROUP_KEYS] or ["day"]
    text = await state.report_reads.run(lambda connection: queries.usage_csv(
        connection, token_id=viewer.token_id, since=since, until=until, group_by=group_by))
    filename = f"usage-{since.isoformat()}-{until.isoformat()}.csv"
    return Response(text, media_type="text/csv; charset=utf-8", headers={
        **render.SECURITY_HEADERS, "Content-Disposition": f'attachment; filename="{filename}"'})


# ---- static and old links --------------------------------------------------------------------

@router.get("/dashboard/static/dashboard.css")
async def stylesheet() -> Response:
    """The dashboard's stylesheet."""
    return Response(render.stylesheet(), media_type="text/css; charset=utf-8",
                    headers={"Cache-Control": "public, max-age=3600", "X-Content-Type-Options": "nosniff"})


@router.get("/p/{prediction_id}")
@router.get("/replicate/p/{prediction_id}")
async def old_web_url(prediction_id: str) -> Response:
    """The `urls.web` form gateways used before the dashboard: a redirect to its page."""
    if not _PREDICTION_ID.match(prediction_id):
        raise NotFound("The requested prediction could not be found")
    return RedirectResponse(f"/dashboard/predictions/{prediction_id}", status_code=308)


router.include_router(pages)
