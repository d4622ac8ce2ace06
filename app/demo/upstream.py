"""An in-process, Replicate-format relay that simulates predictions for `replicate-gateway demo`."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import math
import os
import re
import struct
import time
import zlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from fastapi import FastAPI, Request
from starlette.responses import Response

STARTING_SECONDS = 0.4
PROCESSING_SECONDS = 1.2
MAX_PREDICTIONS = 10_000
_STEPS = 10
_MAX_WAIT = 60.0
_TERMINAL = frozenset({"succeeded", "failed", "canceled"})
_WAIT = re.compile(r"(?:^|[,;\s])wait(?:\s*=\s*(\d+))?(?=$|[,;\s])", re.IGNORECASE)
_OUTPUT_ID = re.compile(r"^[a-z0-9]{1,64}$")
_DEFAULT_PROMPT = "Hello from the replicate-gateway demo"
_KNOWN_MODELS = (
    "demo/echo", "demo/llm-chat", "demo/image", "black-forest-labs/flux-schnell", "stability-ai/sdxl",
)


def version_id(model: str) -> str:
    """The fixed demo version id of a model."""
    return hashlib.sha256(b"replicate-gateway-demo:" + model.encode()).hexdigest()


_VERSIONS = {version_id(model): model for model in _KNOWN_MODELS}


def is_text_model(model: str) -> bool:
    """Whether a model simulates a token-streaming language model rather than an image model."""
    return "echo" in model.lower() or "llm" in model.lower()


def render_png(seed: str, size: int = 64) -> bytes:
    """A small RGB PNG with a diagonal gradient whose colours derive from `seed`."""
    digest = hashlib.sha256(seed.encode()).digest()
    start, end = digest[:3], digest[3:6]
    raw = bytearray()
    for y in range(size):
        raw.append(0)  # PNG filter type "None" for each scanline
        for x in range(size):
            t = (x + y) / (2 * size - 2)
            raw.extend(round(start[c] + (end[c] - start[c]) * t) for c in range(3))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(bytes(raw), 9)) + chunk(b"IEND", b"")


def _timestamp(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _clock(seconds: float) -> str:
    return f"{int(seconds) // 60:02d}:{int(seconds) % 60:02d}"


def _num_outputs(value: Any) -> int:
    try:
        count = int(value if value is not None else 1)
    except (TypeError, ValueError):
        count = 1
    return max(1, min(4, count))


def _words(prompt: Any) -> list[str]:
    words = str(prompt if prompt is not None else _DEFAULT_PROMPT).split()
    return [word + " " for word in words[:-1]] + words[-1:]


def _json(body: Any, status: int = 200, media_type: str = "application/json") -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type=media_type)


def _problem(status: int, title: str, detail: str) -> Response:
    return _json({"title": title, "detail": detail, "status": status}, status, "application/problem+json")


async def _payload(request: Request) -> dict[str, Any]:
    try:
        body = orjson.loads(await request.body())
    except orjson.JSONDecodeError:
        return {}
    return body if isinstance(body, dict) else {}


def version_object(model: str) -> dict[str, Any]:
    """The Cog version object, with an OpenAPI schema, for a model."""
    output: dict[str, Any] = {"title": "Output", "type": "array", "items": {"type": "string"}}
    if is_text_model(model):
        output |= {"x-cog-array-type": "iterator", "x-cog-array-display": "concatenate"}
    else:
        output["items"]["format"] = "uri"
    properties = {
        "prompt": {"type": "string", "title": "Prompt", "x-order": 0,
                   "description": "Text prompt; text models echo it back word by word."},
        "num_outputs": {"type": "integer", "title": "Num Outputs", "default": 1, "minimum": 1,
                        "maximum": 4, "x-order": 1, "description": "Number of images to generate."},
        "fail": {"type": "boolean", "title": "Fail", "default": False, "x-order": 2,
                 "description": "Make the simulated prediction fail."},
    }
    schemas = {"Input": {"type": "object", "title": "Input", "required": ["prompt"],
                         "properties": properties}, "Output": output}
    return {
        "id": version_id(model),
        "created_at": "2024-01-01T00:00:00.000000Z",
        "cog_version": "0.9.4",
        "openapi_schema": {"openapi": "3.0.2", "info": {"title": "Cog", "version": "0.1.0"},
                           "paths": {}, "components": {"schemas": schemas}},
    }


@dataclass
class _Prediction:
    id: str
    model: str
    version: str
    input: dict[str, Any]
    deployment: str | None
    created_wall: datetime
    created_mono: float
    stream_token: str
    canceled_at: float | None = None  # simulated seconds, so the record freezes where it stopped


class _DemoRelay:
    def __init__(self, output_base_url: str, speed: float) -> None:
        if speed <= 0:
            raise ValueError("speed must be positive")
        self.output_base_url = output_base_url.rstrip("/")
        self.speed = speed
        self.predictions: dict[str, _Prediction] = {}

    def elapsed(self, p: _Prediction) -> float:
        if p.canceled_at is not None:
            return p.canceled_at
        return (time.monotonic() - p.created_mono) * self.speed

    def at(self, p: _Prediction, simulated: float) -> datetime:
        return p.created_wall + timedelta(seconds=simulated / self.speed)

    def view(self, p: _Prediction) -> dict[str, Any]:
        elapsed = min(self.elapsed(p), STARTING_SECONDS + PROCESSING_SECONDS)
        progress = max(0.0, (elapsed - STARTING_SECONDS) / PROCESSING_SECONDS)
        if p.canceled_at is not None:
            status = "canceled"
        elif progress >= 1.0:
            status = "failed" if p.input.get("fail") is True else "succeeded"
        else:
            status = "processing" if progress > 0 else "starting"
        text = is_text_model(p.model)
        step_seconds = PROCESSING_SECONDS / _STEPS / self.speed
        logs = "".join(
            f"{i * 100 // _STEPS:3d}%|{'█' * i}{' ' * (_STEPS - i)}| {i}/{_STEPS} "
            f"[{_clock(i * step_seconds)}<{_clock((_STEPS - i) * step_seconds)}, {1 / step_seconds:.2f}it/s]\n"
            for i in range(1, int(progress * _STEPS) + 1)
        )
        output: list[str] | None = None
        if text and progress > 0:
            words = _words(p.input.get("prompt"))
            output = words[: math.ceil(progress * len(words))]
        elif status == "succeeded":
            output = [f"{self.output_base_url}/outputs/{p.id}/{i}.png"
                      for i in range(_num_outputs(p.input.get("num_outputs")))]
        error = "Simulated failure: the input asked for `fail`." if status == "failed" else None
        if error:
            logs += f"RuntimeError: {error}\n"
        metrics: dict[str, Any] | None = None
        if status in _TERMINAL:
            predict_time = round(max(0.0, elapsed - STARTING_SECONDS) / self.speed, 6)
            metrics = {"predict_time": predict_time, "total_time": round(elapsed / self.speed, 6)}
            if text:
                count = len(output or [])
                metrics |= {"input_token_count": len(_words(p.input.get("prompt"))),
                            "output_token_count": count,
                            "tokens_per_second": round(count / predict_time, 3) if predict_time else 0.0}
            else:
                metrics["image_count"] = len(output or [])
        api = f"https://api.replicate.com/v1/predictions/{p.id}"
        body: dict[str, Any] = {
            "id": p.id, "model": p.model, "version": p.version, "input": p.input, "logs": logs,
            "output": output, "data_removed": False, "error": error, "status": status,
            "source": "api", "created_at": _timestamp(p.created_wall),
            "started_at": _timestamp(self.at(p, STARTING_SECONDS)) if progress > 0 else None,
            "completed_at": _timestamp(self.at(p, elapsed)) if status in _TERMINAL else None,
            "urls": {"get": api, "cancel": api + "/cancel", "web": f"https://replicate.com/p/{p.id}",
                     "stream": f"https://stream.replicate.com/v1/streams/{p.stream_token}"},
        }
        if metrics is not None:
            body["metrics"] = metrics
        if p.deployment is not None:
            body["deployment"] = p.deployment
        return body

    async def answer_create(self, request: Request, model: str, version: str | None,
                            deployment: str | None = None) -> Response:
        inputs = (await _payload(request)).get("input")
        if not isinstance(inputs, dict):
            return _problem(422, "Input validation failed", "The body must be an object with an `input` object.")
        prediction_id = base64.b32encode(os.urandom(17)).decode()[:26].lower()
        token = base64.b32encode(os.urandom(20)).decode().lower()
        p = _Prediction(prediction_id, model, version or version_id(model), inputs, deployment,
                        datetime.now(UTC), time.monotonic(), token)
        self.predictions[prediction_id] = p
        while len(self.predictions) > MAX_PREDICTIONS:
            del self.predictions[next(iter(self.predictions))]
        body = self.view(p)
        match = _WAIT.search(request.headers.get("prefer", ""))
        if match:
            deadline = time.monotonic() + min(_MAX_WAIT, float(match.group(1) or _MAX_WAIT))
            # Small steps keep a sync-mode create close to the moment the prediction settles.
            while body["status"] not in _TERMINAL and (remaining := deadline - time.monotonic()) > 0:
                await asyncio.sleep(min(0.05, remaining))
                body = self.view(p)
        return _json(body, 201)


def create_demo_upstream(*, output_base_url: str, speed: float = 1.0) -> FastAPI:
    """Build the simulated relay; routes live under `/replicate/v1` and images under `/outputs`."""
    relay = _DemoRelay(output_base_url, speed)
    app = FastAPI(title="replicate-gateway demo upstream", docs_url=None, redoc_url=None, openapi_url=None)

    def missing(kind: str, key: str) -> Response:
        return _problem(404, "Not found", f"The requested {kind} {key!r} was not found.")

    @app.post("/replicate/v1/models/{owner}/{name}/predictions")
    async def create_for_model(owner: str, name: str, request: Request) -> Response:
        return await relay.answer_create(request, f"{owner}/{name}", None)

    @app.post("/replicate/v1/deployments/{owner}/{name}/predictions")
    async def create_for_deployment(owner: str, name: str, request: Request) -> Response:
        return await relay.answer_create(request, f"{owner}/{name}", None, deployment=f"{owner}/{name}")

    @app.post("/replicate/v1/predictions")
    async def create_for_version(request: Request) -> Response:
        version = (await _payload(request)).get("version")
        if not isinstance(version, str) or not version:
            return _problem(422, "Input validation failed", "The body must name a `version`.")
        # Clients may send "owner/name:version" as well as the bare version id.
        named, _, version = version.rpartition(":")
        return await relay.answer_create(request, named or _VERSIONS.get(version, "demo/unknown"), version)

    @app.get("/replicate/v1/predictions/{prediction_id}")
    async def get_prediction(prediction_id: str) -> Response:
        p = relay.predictions.get(prediction_id)
        return _json(relay.view(p)) if p else missing("prediction", prediction_id)

    @app.post("/replicate/v1/predictions/{prediction_id}/cancel")
    async def cancel_prediction(prediction_id: str) -> Response:
        p = relay.predictions.get(prediction_id)
        if p is None:
            return missing("prediction", prediction_id)
        elapsed = relay.elapsed(p)
        if relay.view(p)["status"] not in _TERMINAL:
            p.canceled_at = elapsed
        return _json(relay.view(p))

    @app.get("/replicate/v1/models/{owner}/{name}")
    async def get_model(owner: str, name: str) -> Response:
        model = f"{owner}/{name}"
        kind = "text" if is_text_model(model) else "image"
        return _json({
            "url": f"https://replicate.com/{model}", "owner": owner, "name": name,
            "description": f"A simulated {kind} model served by the replicate-gateway demo.",
            "visibility": "public", "github_url": None, "paper_url": None, "license_url": None,
            "run_count": sum(p.model == model for p in relay.predictions.values()),
            "cover_image_url": None, "default_example": None, "latest_version": version_object(model),
        })

    @app.get("/replicate/v1/models/{owner}/{name}/versions")
    async def list_versions(owner: str, name: str) -> Response:
        return _json({"next": None, "previous": None, "results": [version_object(f"{owner}/{name}")]})

    @app.get("/replicate/v1/models/{owner}/{name}/versions/{version}")
    async def get_version(owner: str, name: str, version: str) -> Response:
        model = f"{owner}/{name}"
        return _json(version_object(model)) if version == version_id(model) else missing("version", version)

    @app.get("/outputs/{prediction_id}/{filename}")
    async def get_output(prediction_id: str, filename: str) -> Response:
        index = filename.removesuffix(".png")
        if not _OUTPUT_ID.match(prediction_id) or index == filename or index not in {"0", "1", "2", "3"}:
            return missing("file", f"{prediction_id}/{filename}")
        # Images derive from the id alone, so they outlive the bounded prediction store.
        return Response(render_png(f"{prediction_id}/{index}"), media_type="image/png",
                        headers={"Cache-Control": "public, max-age=86400, immutable"})

    return app
