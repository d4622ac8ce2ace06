"""The Replicate Files API: upload, list, get and delete a token's files, and signed downloads."""

from __future__ import annotations

import logging
import mimetypes
import re
import unicodedata
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import orjson
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response, StreamingResponse
from starlette.requests import ClientDisconnect

from app.deps import CallerDep, PublicBaseDep, StateDep, require_caller
from app.errors import (
    BadRequest,
    NotFound,
    PayloadTooLarge,
    UnsupportedMediaType,
    ValidationFailed,
)
from app.files import service
from app.files.multipart import FieldTooLarge, MalformedMultipart, MultipartReader, boundary_of
from app.state import GatewayState
from app.storage import Stored, TooLarge

log = logging.getLogger(__name__)

MAX_FIELD_BYTES = 64 * 1024
MAX_PARTS = 16
MAX_NAME_CHARS = 255
_MEDIA_TYPE = re.compile(
    r"[\w!#$&^.+-]{1,100}/[\w!#$&^.+-]{1,100}"
    r"(?:\s*;\s*[\w!#$&^.+-]{1,100}=(?:[\w!#$&^.+-]{1,100}|\"[^\"\\,\x00-\x1f]{0,100}\"))*\Z"
)

_authenticated = APIRouter(dependencies=[Depends(require_caller)])
# Download URLs are capabilities handed to the upstream, which has no gateway token.
_capability = APIRouter()


def _json(content: Any, status_code: int = 200) -> Response:
    return Response(orjson.dumps(content), status_code=status_code, media_type="application/json")


def _file_not_found() -> NotFound:
    return NotFound("File not found")


def _invalid(field: str, description: str, kind: str = "invalid") -> ValidationFailed:
    return ValidationFailed([{"type": kind, "field": field, "description": description}])


@dataclass
class _Upload:
    stored: Stored
    filename: str | None
    content_type: str | None
    fields: dict[str, bytes]


async def _receive(request: Request, state: GatewayState, boundary: bytes) -> _Upload:
    """Stream the `content` part into storage and collect the small fields around it."""
    reader = MultipartReader(request.stream(), boundary, max_parts=MAX_PARTS)
    limit = state.settings.max_file_bytes
    stored: Stored | None = None
    filename: str | None = None
    content_type: str | None = None
    fields: dict[str, bytes] = {}
    try:
        try:
            while (part := await reader.next_part()) is not None:
                if part.name == "content":
                    if stored is not None:
                        raise _invalid("content", "must be sent once")
                    async with aclosing(reader.read_body()) as chunks:
                        stored = await state.storage.write(chunks, max_bytes=limit)
                    filename, content_type = part.filename, part.content_type
                else:
                    # Every other part is read whole, so each is bounded; unknown ones are dropped.
                    value = await reader.read_all(MAX_FIELD_BYTES)
                    fields.setdefault(part.name, value)
        except TooLarge:
            raise PayloadTooLarge(f"Files must be at most {limit} bytes in size") from None
        except FieldTooLarge:
            raise PayloadTooLarge(f"Form fields must be at most {MAX_FIELD_BYTES} bytes") from None
        except MalformedMultipart as exc:
            raise BadRequest(f"The multipart/form-data body is malformed: {exc}") from None
        except ClientDisconnect:
            raise BadRequest("The upload ended before it was complete") from None
        if stored is None:
            raise _invalid("content", "content is required", "required")
        return _Upload(stored=stored, filename=filename, content_type=content_type, fields=fields)
    except BaseException:
        if stored is not None:
            await state.storage.delete(stored.key)
        raise


def _text_field(fields: dict[str, bytes], name: str) -> str | None:
    raw = fields.get(name)
    if raw is None:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _invalid(name, "must be UTF-8 text") from None


def _name(upload: _Upload) -> str:
    given = _text_field(upload.fields, "filename")
    name = given if given else (upload.filename or "file")
    field = "filename" if given else "content"
    if len(name) > MAX_NAME_CHARS:
        raise _invalid(field, f"the file name must be at most {MAX_NAME_CHARS} characters")
    if any(unicodedata.category(c) == "Cc" for c in name):
        raise _invalid(field, "the file name must not contain control characters")
    return name


def _content_type(upload: _Upload, name: str) -> str:
    given = _text_field(upload.fields, "type")
    if given:
        if not _MEDIA_TYPE.match(given.strip()):
            raise _invalid("type", "must be a media type such as image/png")
        return given.strip()
    part_type = (upload.content_type or "").strip()
    if part_type and _MEDIA_TYPE.match(part_type):
        return part_type
    return mimetypes.guess_type(name)[0] or "application/octet-stream"


def _metadata(upload: _Upload) -> dict[str, Any]:
    # Python sends a plain field, npm a file part named "blob": both arrive here as bytes.
    raw = upload.fields.get("metadata")
    if raw is None or not raw.strip():
        return {}
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise _invalid("metadata", "must be a JSON object")
    return value


@_authenticated.post("/files", status_code=201)
async def create_file(request: Request, state: StateDep, caller: CallerDep, public: PublicBaseDep) -> Response:
    """Upload a file (multipart/form-data, part `content`) that predictions can take as input."""
    boundary = boundary_of(request.headers.get("content-type", ""))
    if boundary is None:
        raise UnsupportedMediaType("Send the file as multipart/form-data with a part named content")
    upload = await _receive(request, state, boundary)
    try:
        name = _name(upload)
        content_type = _content_type(upload, name)
        metadata = _metadata(upload)
        async with state.sessions() as session:
            row = await service.create(session, token=caller.token, name=name, content_type=content_type,
                                       stored=upload.stored, metadata=metadata)
    except BaseException:
        await state.storage.delete(upload.stored.key)
        raise
    try:
        async with state.sessions() as session:
            await service.purge_expired(session, state.storage, caller.token)
    except Exception:  # housekeeping: the upload itself succeeded
        log.warning("files.purge_failed", exc_info=True)
    return _json(service.to_client(row, public), 201)


@_authenticated.get("/files")
async def list_files(request: Request, state: StateDep, caller: CallerDep, public: PublicBaseDep) -> Response:
    """The caller's files, newest first, a page at a time (`cursor`)."""
    async with state.sessions() as session:
        page = await service.page_owned(session, caller.token, key=state.key,
                                        cursor_text=request.query_params.get("cursor"))
    base = f"{public}/v1/files?cursor="
    return _json({
        "next": base + page.next_cursor if page.next_cursor else None,
        "previous": base + page.previous_cursor if page.previous_cursor else None,
        "results": [service.to_client(r, public) for r in page.rows],
    })


@_authenticated.get("/files/{file_id}")
async def get_file(file_id: str, state: StateDep, caller: CallerDep, public: PublicBaseDep) -> Response:
    """One of the caller's files; another token's answers exactly like a missing one."""
    async with state.sessions() as session:
        row = await service.get_owned(session, caller.token, file_id)
    if row is None:
        raise _file_not_found()
    return _json(service.to_client(row, public))


@_authenticated.delete("/files/{file_id}", status_code=204)
async def delete_file(file_id: str, state: StateDep, caller: CallerDep) -> Response:
    """Delete one of the caller's files, its bytes included."""
    async with state.sessions() as session:
        row = await service.get_owned(session, caller.token, file_id)
        if row is None:
            raise _file_not_found()
        await service.remove(session, state.storage, row)
    return Response(status_code=204)


# A route per method: one route with both gives its two operations in the served OpenAPI
# document the same operation id.
@_capability.get("/files/{file_id}/download")
@_capability.head("/files/{file_id}/download")
async def download_file(file_id: str, request: Request, state: StateDep) -> Response:
    """A file's bytes, for whoever holds an unexpired signed URL (no token needed)."""
    expiry = request.query_params.get("expiry", "")
    signature = request.query_params.get("signature", "")
    async with state.sessions() as session:
        row = await service.get_live(session, file_id)
    if row is None or not service.download_allowed(state.key, row, expiry, signature) \
            or not await state.storage.exists(row.storage_key):
        raise _file_not_found()
    headers = {
        # Set directly: a media_type would gain "; charset=utf-8" for text types.
        "content-type": row.content_type,
        "content-length": str(row.size),
        # The type was chosen by the uploader: never let a browser render it as this origin.
        "x-content-type-options": "nosniff",
        "content-security-policy": "sandbox",
        "cache-control": "private, no-store",
    }
    if request.method == "HEAD":
        return Response(headers=headers)
    return StreamingResponse(state.storage.read_chunks(row.storage_key), headers=headers)


router = APIRouter()
router.include_router(_authenticated)
router.include_router(_capability)
