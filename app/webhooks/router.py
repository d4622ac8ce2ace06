"""Webhook routes: the team's signing secret (authenticated) and the upstream's inbound hints (public)."""

from __future__ import annotations

import logging

import orjson
from fastapi import APIRouter, BackgroundTasks, Depends, Request
from fastapi.responses import Response

from app.deps import CallerDep, StateDep, require_caller
from app.errors import BadRequest, NotFound, Unauthenticated
from app.predictions.service import PredictionService
from app.webhooks import inbound
from app.webhooks.signing import team_secret, verify

log = logging.getLogger(__name__)

router = APIRouter(dependencies=[Depends(require_caller)])
# Public: the upstream calls it with no gateway token; the URL's capability token is the check.
inbound_router = APIRouter()

_SIGNATURE_HEADERS = ("webhook-id", "webhook-timestamp", "webhook-signature")


@router.get("/webhooks/default/secret")
async def get_webhook_secret(state: StateDep, caller: CallerDep) -> Response:
    """The caller's team signing secret, with which every webhook it receives is signed."""
    body = {"key": team_secret(state.key, caller.token.id)}
    return Response(orjson.dumps(body), media_type="application/json")


async def _refresh(service: PredictionService, prediction_id: str) -> None:
    try:
        await service.refresh(prediction_id)
    except Exception as exc:
        log.error("webhooks.inbound_refresh_failed", extra={"prediction_id": prediction_id,
                                                            "error": type(exc).__name__})


@inbound_router.post("/webhooks/inbound/{ref}", status_code=204)
async def receive_upstream_webhook(
    ref: str, request: Request, state: StateDep, background: BackgroundTasks
) -> Response:
    """An upstream webhook: verified when a secret is set, then only a hint to poll the upstream."""
    prediction_id = inbound.prediction_for(state.key, ref)
    if prediction_id is None:
        # A wrong token answers exactly like an unknown prediction.
        raise NotFound("The requested resource could not be found")
    secret = state.settings.upstream_webhook_secret
    if secret is not None:
        if not all(request.headers.get(name) for name in _SIGNATURE_HEADERS):
            raise BadRequest("The webhook signature headers are missing")
        # The raw bytes as received: re-encoded JSON would not match the signature.
        if not verify(secret.get_secret_value(), request.headers, await request.body()):
            raise Unauthenticated("The webhook signature is invalid or too old")
        # One sent again (a retry, or a replay while its signature is valid) is a no-op, not
        # another GET to the upstream.
        message_id = request.headers["webhook-id"]
        if state.inbound_heard.get(message_id):
            return Response(status_code=204)
        state.inbound_heard.put(message_id, True)
    # The payload is never read: the state recorded comes from our own GET to the upstream.
    background.add_task(_refresh, state.predictions, prediction_id)
    return Response(status_code=204)
