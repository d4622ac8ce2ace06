"""The hottest prediction routes served in front of the framework, without its routing and dependency solving."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from app.deps import get_state, public_base, require_caller
from app.errors import error_response
from app.foreground import Foreground
from app.middleware import announced_too_large, body_too_large, limited
from app.observability import REQUEST_ID, Metrics, RequestIds
from app.predictions import router as routes
from app.serving import Respond

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


FastRoute = tuple[Handler, re.Match[str], RouteLabel]


class FastLane:
    """Serve GET of a prediction and the two create routes directly, with what the front layers
    do for every request (request id, counting, the body limit); pass everything else on.

    `route` and `answer` also let the HTTP server (app/serving.py) send these answers itself,
    without ASGI's messages, as the same bytes."""

    def __init__(
        self, app: ASGIApp, *, metrics: Metrics, foreground: Foreground, request_ids: RequestIds,
        max_body_bytes: int,
    ) -> None:
        self.app = app
        self._metrics = metrics
        self.foreground = foreground
        self._request_ids = request_ids
        self._max_body_bytes = max_body_bytes

    @staticmethod
    def route(scope: Scope) -> FastRoute | None:
        """The route that serves this request here, if any."""
        for pattern, handler, label in _ROUTES.get(scope["method"], ()):
            match = pattern.match(scope["path"])
            if match is not None:
                return handler, match, label
        return None

    async def answer(self, scope: Scope, receive: Receive, route: FastRoute, respond: Respond) -> None:
        """Run the route (errors rendered as problems) as the request `scope`, read by `receive`,
        and hand its answer to `respond`, which sends it."""
        handler, match, label = route
        scope["route"] = label
        request_id = self._request_ids.for_request(scope["headers"])
        context = REQUEST_ID.set(request_id)
        status = 500
        self.foreground.started()
        try:
            request = Request(scope, limited(receive, self._max_body_bytes))
            try:
                if announced_too_large(scope["headers"], self._max_body_bytes):
                    raise body_too_large(self._max_body_bytes)
                response = await handler(request, match)
            except Exception as exc:
                response = await error_response(request, exc)
            status = response.status_code
            await respond(status, [*response.raw_headers, (b"x-request-id", request_id.encode())],
                          bytes(response.body))
        finally:
            self.foreground.finished()
            REQUEST_ID.reset(context)
            self._metrics.count_request(scope["method"], label.path_format, status)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            route = self.route(scope)
            if route is not None:
                async def respond(status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
                    await send({"type": "http.response.start", "status": status, "headers": headers})
                    await send({"type": "http.response.body", "body": body})

                await self.answer(scope, receive, route, respond)
                return
        await self.app(scope, receive, send)
