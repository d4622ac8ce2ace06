"""The Replicate HTTP API: predictions, account and the read-only model calls clients make."""

from __future__ import annotations

import asyncio
import hmac
import re
from collections.abc import Coroutine, Mapping
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import parse_qs, quote, urlsplit

import orjson
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from app.accounting import service as accounting
from app.columns import utcnow
from app.deps import CallerDep, PublicBaseDep, StateDep, require_caller
from app.errors import (
    BadRequest,
    NotFound,
    UnsupportedMediaType,
    ValidationFailed,
    invalid_fields_from,
)
from app.files.service import resolve_inputs as resolve_file_inputs
from app.groups import service as groups
from app.predictions import catalog, rewrite, stream
from app.predictions.headers import valid_cancel_after, wait_seconds
from app.predictions.models import Prediction
from app.predictions.service import CreateTarget, PredictionService
from app.tokens.models import ApiToken
from app.tokens.service import WITH_GROUP
from app.upstream.client import UpstreamClient, UpstreamFailure
from app.webhooks import guard

SYNC_MARGIN_SECONDS = 0.3
MAX_CURSOR_LENGTH = 1000
STREAM_HEADERS = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_PREDICTION_ID = re.compile(r"^[a-z0-9]{1,64}$")
_VERSION_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,255}\Z")

router = APIRouter(dependencies=[Depends(require_caller)])


class PredictionCreate(BaseModel):
    """A create body; unknown keys are accepted and not forwarded."""

    model_config = ConfigDict(extra="allow")

    input: dict[str, Any]
    version: str | None = None
    stream: bool | None = None
    webhook: str | None = Field(default=None, max_length=2048)
    webhook_events_filter: list[Literal["start", "output", "logs", "completed"]] | None = None
    webhook_completed: str | None = Field(default=None, max_length=2048)

    @field_validator("webhook", "webhook_completed")
    @classmethod
    def _deliverable_url(cls, value: str | None) -> str | None:
        # The same syntax checks delivery applies, so a bad URL is refused now, not dead later.
        if value is not None:
            try:
                guard.parse_url(value)
            except guard.DestinationRefused:
                raise ValueError("must be an absolute http(s) URL with no user info or fragment") from None
        return value


def _json(content: Any, status_code: int = 200) -> Response:
    return Response(orjson.dumps(content), status_code=status_code, media_type="application/json")


def _service(state: StateDep) -> PredictionService:
    service: PredictionService = state.predictions
    return service


def _segment(value: str, what: str) -> str:
    if not _SEGMENT.match(value):
        raise NotFound(f"The requested {what} could not be found")
    return value


def _prediction_id(value: str) -> str:
    if not _PREDICTION_ID.match(value):
        raise NotFound("The requested prediction could not be found")
    return value


async def _read_create(request: Request) -> PredictionCreate:
    content_type = request.headers.get("content-type", "").lower()
    if content_type.startswith("multipart/"):
        raise UnsupportedMediaType("Send the prediction as a JSON body (Content-Type: application/json)")
    raw = await request.body()
    if not raw.strip():
        raise ValidationFailed([{"type": "required", "field": "input", "description": "input is required"}])
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BadRequest("The request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise ValidationFailed([{"type": "type", "field": "body", "description": "must be a JSON object"}])
    try:
        return PredictionCreate.model_validate(data)
    except ValidationError as exc:
        raise ValidationFailed(invalid_fields_from(exc.errors())) from None


def _version_target(version: str) -> CreateTarget:
    """`owner/name:id`, `owner/name` or a bare version id, as the create endpoint accepts them."""
    ref, _, version_id = version.partition(":")
    if "/" in ref:
        owner, _, name = ref.partition("/")
        if not (_SEGMENT.match(owner) and _SEGMENT.match(name)) or (version_id and not _VERSION_ID.match(version_id)):
            raise ValidationFailed([{"type": "format", "field": "version", "description": "is not a valid version"}])
        if not version_id:
            return CreateTarget(f"v1/models/{owner}/{name}/predictions", model=f"{owner}/{name}")
        return CreateTarget("v1/predictions", model=f"{owner}/{name}", version=version_id)
    if version_id or not _VERSION_ID.match(ref):
        raise ValidationFailed([{"type": "format", "field": "version", "description": "is not a valid version"}])
    return CreateTarget("v1/predictions", model=None, version=ref)


async def _create(
    request: Request, state: StateDep, caller: CallerDep, public: str, target: CreateTarget,
    body: PredictionCreate,
) -> Response:
    loop = asyncio.get_running_loop()
    wait = wait_seconds(request.headers.get("prefer"))
    # Python's client times out at N + 0.5 s: answer inside N s, whatever the upstream does.
    deadline = loop.time() + wait - SYNC_MARGIN_SECONDS if wait else None
    if not state.settings.allow_http_webhooks:
        _require_https_webhooks(body)
    cancel_after = request.headers.get("cancel-after")
    if cancel_after is not None and not valid_cancel_after(cancel_after):
        raise ValidationFailed([{"type": "format", "field": "Cancel-After",
                                 "description": "must be a duration such as 30s, 5m or 1h30m"}])
    # Gateway file URLs in the input become something the upstream can read.
    forwarded: dict[str, Any] = {"input": await resolve_file_inputs(state, caller.token, body.input, public)}
    if target.upstream_path == "v1/predictions":
        forwarded["version"] = target.version
    if body.stream is not None:
        forwarded["stream"] = body.stream
    idempotency_key = request.headers.get("idempotency-key")
    if idempotency_key is not None and not _IDEMPOTENCY_KEY.match(idempotency_key):
        raise ValidationFailed([{"type": "format", "field": "Idempotency-Key",
                                 "description": "must be 1 to 255 printable ASCII characters"}])
    upstream_wait = max(1, wait - 1) if wait else None
    recorded_as: asyncio.Future[Prediction] | None = loop.create_future() if deadline is not None else None
    creating = _service(state).create(
        token=caller.token, caller_secret=caller.secret, target=target, body=forwarded,
        prefer=f"wait={upstream_wait}" if upstream_wait else None, wait=upstream_wait,
        cancel_after=cancel_after,
        idempotency_key=idempotency_key,
        # `webhook_completed` alone is a webhook for the completed event; beside a `webhook` it
        # is a second receiver of that event (the Python client still sends it).
        webhook=body.webhook or body.webhook_completed,
        webhook_events_filter=(list(dict.fromkeys(body.webhook_events_filter))
                               if body.webhook_events_filter is not None
                               else (["completed"] if body.webhook_completed and not body.webhook else None)),
        webhook_completed=body.webhook_completed if body.webhook else None,
        public_base=public,
        caller_input=body.input,
        recorded_as=recorded_as,
    )
    if deadline is None or recorded_as is None:
        prediction, replayed = await creating
    else:
        prediction, replayed = await _created_within(state, creating, recorded_as, deadline)
    if deadline is not None and not prediction.is_terminal:
        prediction = await _service(state).wait_until_final(prediction, deadline=deadline)
    # Clients poll only after "starting"; any other unfinished status would end run() with no output.
    status_override = "starting" if wait and not prediction.is_terminal else None
    answer = rewrite.to_client(prediction, public, state.key, status_override=status_override)
    response = _json(answer, 201)
    if status_override is not None:
        # Replicate's documented answer to a sync create that ran out of time: where to poll.
        response.headers["Location"] = answer["urls"]["get"]
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return response


def _require_https_webhooks(body: PredictionCreate) -> None:
    for field in ("webhook", "webhook_completed"):
        url = getattr(body, field)
        if url is not None and url[:5].lower() == "http:":
            raise ValidationFailed([{"type": "format", "field": field,
                                     "description": "must be an https URL (this gateway does not send webhooks over http)"}])


async def _created_within(
    state: StateDep, creating: Coroutine[Any, Any, tuple[Prediction, bool]],
    recorded_as: asyncio.Future[Prediction], deadline: float,
) -> tuple[Prediction, bool]:
    """The create's outcome, or, if the upstream has not answered it by the sync deadline, the
    prediction as recorded (`starting`): the create goes on and records its own outcome, which
    the client's polls then find. Relays can take longer to accept a create than the client
    waits for its answer (the Python client gives up at N + 0.5 s)."""
    task = asyncio.ensure_future(creating)
    loop = asyncio.get_running_loop()
    try:
        return await asyncio.wait_for(asyncio.shield(task), max(deadline - loop.time(), 0))
    except TimeoutError:
        if not recorded_as.done():
            # Not recorded yet (the database is slow): nothing to answer with but the outcome.
            return await task
        _service(state).continue_in_background(task)
        return recorded_as.result(), False
    except asyncio.CancelledError:
        task.cancel()
        raise


def _respond(prediction: Prediction, public: str, state: StateDep) -> Response:
    return _json(rewrite.to_client(prediction, public, state.key))


@router.post("/models/{owner}/{name}/predictions", status_code=201)
async def create_model_prediction(
    owner: str, name: str, request: Request, state: StateDep, caller: CallerDep, public: PublicBaseDep
) -> Response:
    """Create a prediction with an official model's latest version."""
    owner, name = _segment(owner, "model"), _segment(name, "model")
    target = CreateTarget(f"v1/models/{owner}/{name}/predictions", model=f"{owner}/{name}")
    return await _create(request, state, caller, public, target, await _read_create(request))


@router.post("/predictions", status_code=201)
async def create_prediction(
    request: Request, state: StateDep, caller: CallerDep, public: PublicBaseDep
) -> Response:
    """Create a prediction for a version (`id`, `owner/name` or `owner/name:id`)."""
    body = await _read_create(request)
    if not body.version:
        raise ValidationFailed([{"type": "required", "field": "version", "description": "version is required"}])
    return await _create(request, state, caller, public, _version_target(body.version), body)


@router.post("/deployments/{owner}/{name}/predictions", status_code=201)
async def create_deployment_prediction(
    owner: str, name: str, request: Request, state: StateDep, caller: CallerDep, public: PublicBaseDep
) -> Response:
    """Create a prediction on a deployment; the token's model globs apply to its name."""
    owner, name = _segment(owner, "deployment"), _segment(name, "deployment")
    target = CreateTarget(
        f"v1/deployments/{owner}/{name}/predictions", model=f"{owner}/{name}", deployment=f"{owner}/{name}"
    )
    return await _create(request, state, caller, public, target, await _read_create(request))


@router.get("/predictions/{prediction_id}")
async def get_prediction(
    prediction_id: str, state: StateDep, caller: CallerDep, public: PublicBaseDep
) -> Response:
    """Get a prediction; a finished one is served from the ledger."""
    service = _service(state)
    prediction = await service.get(caller.token, _prediction_id(prediction_id))
    body = service.rendered(prediction, public, lambda row: orjson.dumps(rewrite.to_client(row, public, state.key)))
    return Response(body, media_type="application/json")


@router.post("/predictions/{prediction_id}/cancel")
async def cancel_prediction(
    prediction_id: str, state: StateDep, caller: CallerDep, public: PublicBaseDep
) -> Response:
    """Cancel a prediction; a finished one is returned unchanged."""
    prediction = await _service(state).cancel(caller.token, _prediction_id(prediction_id))
    return _respond(prediction, public, state)


@router.get("/predictions")
async def list_predictions(
    request: Request, state: StateDep, caller: CallerDep, public: PublicBaseDep
) -> Response:
    """List the caller's predictions, newest first, 100 a page; `created_after` (inclusive) and
    `created_before` (ISO 8601) narrow it, and `source=web` finds none (all came by the API)."""
    params = request.query_params
    source = params.get("source")
    if source is not None and source != "web":
        raise BadRequest("source can only be web")
    after, before = _moment(params, "created_after"), _moment(params, "created_before")
    if source == "web":
        return _json({"previous": None, "next": None, "results": []})
    rows, next_cursor, previous_cursor = await _service(state).page(
        caller.token, key=state.key, cursor_text=params.get("cursor"), created_after=after, created_before=before,
    )
    # Each page link keeps the filters, as given.
    kept = "".join(f"&{name}={quote(params[name], safe='')}" for name in ("created_after", "created_before")
                   if name in params)
    base = f"{public}/v1/predictions?cursor="
    return _json({
        "previous": base + previous_cursor + kept if previous_cursor else None,
        "next": base + next_cursor + kept if next_cursor else None,
        "results": [rewrite.to_client(row, public, state.key) for row in rows],
    })


def _moment(params: Mapping[str, str], name: str) -> datetime | None:
    """A query parameter's ISO 8601 date-time (UTC if it names no zone), or None if absent."""
    text = params.get(name)
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text)
        # In UTC, as the database compares it: a zone can push year 1 or 9999 off the calendar.
        return (moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)).astimezone(UTC)
    except (ValueError, OverflowError):
        raise BadRequest(f"{name} must be an ISO 8601 date-time, such as 2025-01-01T00:00:00Z") from None


@router.get("/account")
async def get_account(caller: CallerDep, state: StateDep) -> Response:
    """The caller's identity (the gateway token, never the upstream account), its group and budget."""
    # The counters move with every create and settlement: read them now, not from the auth cache.
    async with state.read_sessions() as session:
        token = await session.get(ApiToken, caller.token.id, options=[WITH_GROUP]) or caller.token
    return _json({
        "type": "organization", "username": token.name, "name": token.name, "github_url": None,
        "group": token.group.name if token.group else None,
        **accounting.budget_view(token, utcnow()),
    })


def _reader(state: StateDep, caller: CallerDep, model: str) -> tuple[UpstreamClient, str]:
    """The upstream a create of `model` by this caller would go to, and the model's name there:
    the first its group may use whose circuit is not open (the first of them if all are)."""
    candidates = state.registry.candidates(model)
    if not candidates:
        raise NotFound(f"No upstream serves {model}")
    candidates = groups.allowed_upstreams(caller.token.group, candidates, model)
    upstream = next((u for u in candidates if u.breaker.state != "open"), candidates[0])
    return upstream.client, upstream.upstream_model(model)


def _page_link(link: Any, pages: str) -> str | None:
    """An upstream's `next` or `previous` link as the same page of ours (its cursor kept), or None:
    clients request these verbatim, with their token, so none may lead anywhere but here."""
    if not isinstance(link, str):
        return None
    cursors = parse_qs(urlsplit(link).query).get("cursor")
    return f"{pages}?cursor={quote(cursors[0], safe='')}" if cursors else None


def _version_ids(data: dict[str, Any], rest: str) -> list[str]:
    """The version ids a model's description (its latest version) or a versions page shows.

    Not a single version's lookup: its id is the caller's, and an upstream that answers any id
    (relays without the endpoint may) would let a caller tie any version to a model it may run."""
    if rest == "/versions":
        found = data.get("results")
        versions = found if isinstance(found, list) else []
    else:
        versions = [data.get("latest_version")]
    return [v["id"] for v in versions if isinstance(v, dict) and isinstance(v.get("id"), str)]


async def _forward_read(state: StateDep, caller: CallerDep, public: str, model: str, rest: str,
                        *, cursor: str | None = None) -> Response:
    client, theirs = _reader(state, caller, model)
    query = f"?cursor={quote(cursor, safe='')}" if cursor else ""
    try:
        data = await client.get_json(f"v1/models/{theirs}{rest}{query}")
    except UpstreamFailure as failure:
        raise failure.error from None
    if not rest and theirs != model and isinstance(data, dict):
        # The model as the caller names it, not as the upstream does.
        data["owner"], data["name"] = model.split("/")
    if isinstance(data, dict):
        await _service(state).versions.learn(model, _version_ids(data, rest))
    clean = catalog.cleaner(client, public)
    if rest == "/versions":
        pages = f"{public}/v1/models/{model}/versions"
        links = data if isinstance(data, dict) else {}
        return _json(catalog.versions_page(data, clean, next_link=_page_link(links.get("next"), pages),
                                           previous_link=_page_link(links.get("previous"), pages)))
    return _json(catalog.model_object(data, clean))


@router.get("/models/{owner}/{name}")
async def get_model(
    owner: str, name: str, state: StateDep, caller: CallerDep, public: PublicBaseDep
) -> Response:
    """A model, as the upstream describes it, in Replicate's fields only."""
    owner, name = _segment(owner, "model"), _segment(name, "model")
    return await _forward_read(state, caller, public, f"{owner}/{name}", "")


@router.get("/models/{owner}/{name}/versions")
async def list_model_versions(
    owner: str, name: str, request: Request, state: StateDep, caller: CallerDep, public: PublicBaseDep
) -> Response:
    """A model's versions, as the upstream lists them (Replicate's fields only), a page at a time (`cursor`)."""
    owner, name = _segment(owner, "model"), _segment(name, "model")
    cursor = request.query_params.get("cursor")
    if cursor is not None and len(cursor) > MAX_CURSOR_LENGTH:
        raise BadRequest("The cursor is not one this gateway handed out")
    return await _forward_read(state, caller, public, f"{owner}/{name}", "/versions", cursor=cursor)


@router.get("/models/{owner}/{name}/versions/{version_id}")
async def get_model_version(
    owner: str, name: str, version_id: str, state: StateDep, caller: CallerDep, public: PublicBaseDep
) -> Response:
    """A version; when the upstream cannot describe it, a minimal one the clients accept."""
    owner, name = _segment(owner, "model"), _segment(name, "model")
    if not _VERSION_ID.match(version_id):
        raise NotFound("The requested version could not be found")
    client, theirs = _reader(state, caller, f"{owner}/{name}")
    try:
        data = await client.get_json(f"v1/models/{theirs}/versions/{version_id}")
    except UpstreamFailure:
        data = None
    if not isinstance(data, dict) or not isinstance(data.get("cog_version"), str) \
            or not isinstance(data.get("openapi_schema"), dict):
        # Relays document no versions endpoint, and Python's run("o/n:id") raises unless this
        # answers 200 with a cog_version and a schema (wire spec §13).
        data = {
            "id": version_id,
            "created_at": rewrite.rfc3339(datetime.now(UTC)),
            "cog_version": "0.9.0",
            "openapi_schema": {},
        }
    return _json(catalog.version_object(data, catalog.cleaner(client, public)))


# Stream URLs are capabilities: the npm client fetches them with no Authorization at all.
streams_router = APIRouter()


@streams_router.get("/streams/{ref}")
async def stream_prediction(ref: str, state: StateDep) -> Response:
    """Server-sent events for a prediction: output, logs, error and done; replayed once final."""
    prediction_id, _, capability = ref.partition(".")
    expected = rewrite.stream_token(prediction_id, state.key) if _PREDICTION_ID.match(prediction_id) else ""
    prediction = None
    if expected and hmac.compare_digest(capability.encode(), expected.encode()):
        prediction = await _service(state).by_stream_capability(prediction_id)
    if prediction is None:
        raise NotFound("The requested stream could not be found")
    service = _service(state)
    body = stream.events(prediction, lambda row, within: service.refreshed(row, within=within),
                         poll_interval=state.settings.stream_poll_interval,
                         keepalive_interval=state.settings.stream_keepalive_interval,
                         stopping=lambda: state.draining)
    return StreamingResponse(body, media_type="text/event-stream", headers=STREAM_HEADERS)
