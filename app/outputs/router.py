"""Archived outputs, served at capability URLs without a token (the npm client sends none)."""

from __future__ import annotations

import hmac

from fastapi import APIRouter
from fastapi.responses import Response, StreamingResponse

from app.deps import StateDep
from app.errors import NotFound
from app.outputs.archiver import output_token
from app.outputs.models import OutputFile

router = APIRouter()


@router.get("/outputs/{ref}/{name}")
async def get_output(ref: str, name: str, state: StateDep) -> Response:  # noqa: ARG001  (name is for people)
    """An archived output file's bytes."""
    file_id, _, capability = ref.partition(".")
    if not file_id.isalnum() or not hmac.compare_digest(capability.encode(), output_token(file_id, state.key).encode()):
        raise NotFound("The requested output could not be found")
    async with state.sessions() as session:
        stored = await session.get(OutputFile, file_id)
    if stored is None or not await state.storage.exists(stored.storage_key):
        raise NotFound("The requested output could not be found")
    return StreamingResponse(
        state.storage.read_chunks(stored.storage_key), media_type=stored.content_type,
        headers={"Content-Length": str(stored.size), "Cache-Control": "private, max-age=86400"},
    )
