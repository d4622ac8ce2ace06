"""The hottest prediction routes served straight from ASGI, without the framework's routing and dependency solving."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from app.deps import get_state, public_base, require_caller
from app.errors import error_response
from app.predictions import router as routes

# Clients poll a prediction every fraction of a second and create in bursts: these three calls are
# nearly all of a gateway's traffic. They run the very route functions the framework would, with
# the same caller check, public base and error rendering; only the framework's per-request work
# (its middleware stack, matching some sixty routes, solving dependencies) is left out.
_GET = re.compile(r"(/replicate)?/v1/predictions/([^/]+)\Z")
_CREATE = re.compile(r"(/replicate)?/v1/predictions\Z")
_CREATE_FOR_MODEL = re.compile(r"(/replicate)?/v1/models/([^/]+)/([^/]+)/predictions\Z")

Handler = Callable[[Request, re.Match[str]], Awaitable[Response]]


@dataclass(frozen=True)
class RouteLabel:
    """What routing would leave in `scope["route"]`: the template the metrics label requests by."""

    path_format: str


async def _get(request: Request, match: re.Match[str]) -> Response:
    state = await get_state(request)
    caller = await require_caller(request, state)
    return await routes.get_prediction(match[2], state, caller, await public_base(request, state))


async def _create(request: Request, _: re.Match[str]) -> Response:
    state = await get_state(request)
    caller = await require_caller(request, state)
    return await routes.create_prediction(request, state, caller, await public_base(request, state))


async def _create_for_model(request: Request, match: re.Match[str]) -> Response:
    state = await get_state(request)
    caller = await require_caller(request, state)
    return await routes.create_model_prediction(
        match[2], match[3], request, state, caller, await public_base(request, state)
    )


# Labelled as the framework labels routes of an included router: without the mount prefix.
_ROUTES: dict[str, tuple[tuple[re.Pattern[str], Handler, RouteLabel], ...]] = {
    "GET": ((_GET, _get, RouteLabel("/predictions/{prediction_id}")),),
    "POST": (
        (_CREATE, _create, RouteLabel("/predictions")),
        (_CREATE_FOR_MODEL, _create_for_model, RouteLabel("/models/{owner}/{name}/predictions")),
    ),
}


class FastLane:
    """Serve GET of a prediction and the two create routes directly; pass everything else on."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            for pattern, handler, label in _ROUTES.get(scope["method"], ()):
                match = pattern.match(scope["path"])
                if match is not None:
                    scope["route"] = label
                    request = Request(scope, receive)
                    try:
                        response = await handler(request, match)
                    except Exception as exc:
                        response = await error_response(request, exc)
                    await response(scope, receive, send)
                    return
        await self.app(scope, receive, send)
