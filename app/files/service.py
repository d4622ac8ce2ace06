"""Files owned by a token, and the resolution of gateway file URLs found in prediction inputs."""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import re
import time
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlencode, urlsplit

from sqlalchemy import Select, delete, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from app import paging
from app.columns import utcnow
from app.errors import ValidationFailed
from app.files.models import StoredFile
from app.predictions.rewrite import rfc3339
from app.state import GatewayState
from app.storage import LocalStorage, Stored
from app.tokens.models import ApiToken
from app.tokens.service import new_id

log = logging.getLogger(__name__)

FILE_LIFETIME = timedelta(hours=24)
LIST_LIMIT = 100
INLINE_MAX_BYTES = 10 * 1024 * 1024
SIGNED_URL_TTL_SECONDS = 3600
# Signed URLs expire on this grid, so resolving the same input twice within it (an idempotent
# retry) gives the same URL.
_EXPIRY_GRID_SECONDS = 600
_PURGE_BATCH = 100

_FILE_ID = re.compile(r"[a-z2-7]{26}\Z")
_SIGNATURE = re.compile(r"[A-Za-z0-9_-]{43}\Z")
_EXPIRY = re.compile(r"[0-9]{1,12}\Z")
_FILES_PATH = "/v1/files/"

FieldPath = tuple[str | int, ...]


def valid_file_id(file_id: str) -> bool:
    """Whether `file_id` has the shape of an id this gateway mints."""
    return bool(_FILE_ID.match(file_id))


def to_client(row: StoredFile, public_base: str) -> dict[str, Any]:
    """The Replicate file object for a row."""
    return {
        "id": row.id,
        "name": row.name,
        "content_type": row.content_type,
        "size": row.size,
        "etag": f'"{row.md5}"',
        "checksums": {"sha256": row.sha256, "md5": row.md5},
        "metadata": row.file_metadata or {},
        "created_at": rfc3339(row.created_at),
        "expires_at": rfc3339(row.expires_at),
        "urls": {"get": f"{public_base}/v1/files/{row.id}"},
    }


def _live(row: StoredFile, now: datetime) -> bool:
    return row.expires_at is None or row.expires_at > now


async def create(
    session: AsyncSession, *, token: ApiToken, name: str, content_type: str, stored: Stored,
    metadata: dict[str, Any],
) -> StoredFile:
    """Record an upload whose bytes are already in storage."""
    now = utcnow()
    row = StoredFile(
        id=new_id(), token_id=token.id, name=name, content_type=content_type, size=stored.size,
        sha256=stored.sha256, md5=stored.md5, file_metadata=metadata, storage_key=stored.key,
        created_at=now, expires_at=now + FILE_LIFETIME,
    )
    session.add(row)
    await session.commit()
    return row


async def get_owned(session: AsyncSession, token: ApiToken, file_id: str) -> StoredFile | None:
    """The token's live file with this id, or None (missing, another token's, or expired)."""
    if not valid_file_id(file_id):
        return None
    row = await session.get(StoredFile, file_id)
    if row is None or row.token_id != token.id or not _live(row, utcnow()):
        return None
    return row


async def get_live(session: AsyncSession, file_id: str) -> StoredFile | None:
    """Any token's live file with this id, or None."""
    if not valid_file_id(file_id):
        return None
    row = await session.get(StoredFile, file_id)
    return row if row is not None and _live(row, utcnow()) else None


async def page_owned(
    session: AsyncSession, token: ApiToken, *, key: bytes, cursor_text: str | None,
) -> paging.Page[StoredFile]:
    """A page of the token's live files, newest first, LIST_LIMIT a page."""
    async def fetch(statement: Select[Any]) -> list[StoredFile]:
        return list((await session.scalars(statement)).all())

    now = utcnow()
    query = select(StoredFile).where(
        StoredFile.token_id == token.id, or_(StoredFile.expires_at.is_(None), StoredFile.expires_at > now)
    )
    return await paging.newest_first(
        query, StoredFile.created_at, StoredFile.id, cursor_text=cursor_text, token_id=token.id, key=key,
        size=LIST_LIMIT, fetch=fetch, position_of=lambda row: (row.created_at, row.id),
    )


async def remove(session: AsyncSession, storage: LocalStorage, row: StoredFile) -> None:
    """Delete a file's row, then its bytes."""
    await session.execute(delete(StoredFile).where(StoredFile.id == row.id))
    await session.commit()
    await storage.delete(row.storage_key)


async def purge_expired(session: AsyncSession, storage: LocalStorage, token: ApiToken) -> int:
    """Delete some of the token's expired files, rows and bytes; returns how many."""
    now = utcnow()
    # Every file expires FILE_LIFETIME after its creation, so the (token_id, created_at) index
    # finds them.
    result = await session.scalars(
        select(StoredFile)
        .where(StoredFile.token_id == token.id, StoredFile.created_at < now - FILE_LIFETIME,
               StoredFile.expires_at <= now)
        .limit(_PURGE_BATCH)
    )
    rows = list(result)
    if not rows:
        return 0
    await session.execute(delete(StoredFile).where(StoredFile.id.in_([r.id for r in rows])))
    await session.commit()
    for row in rows:
        await storage.delete(row.storage_key)
    return len(rows)


def download_signature(key: bytes, token_id: str, file_id: str, expiry: int) -> str:
    """The capability part of a download URL: HMAC-SHA256 over owner, file and expiry."""
    digest = hmac.new(key, f"{token_id} {file_id} {expiry}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def signed_download_url(public_base: str, key: bytes, token_id: str, file_id: str, ttl_seconds: int) -> str:
    """A URL that serves the file's bytes without a token for at least `ttl_seconds`."""
    deadline = int(time.time()) + ttl_seconds
    expiry = -(-deadline // _EXPIRY_GRID_SECONDS) * _EXPIRY_GRID_SECONDS
    query = urlencode({"expiry": expiry, "signature": download_signature(key, token_id, file_id, expiry)})
    return f"{public_base}/v1/files/{file_id}/download?{query}"


def download_allowed(key: bytes, row: StoredFile, expiry: str, signature: str) -> bool:
    """Whether a download URL's expiry is in the future and its signature is this file's."""
    if not _EXPIRY.match(expiry) or not _SIGNATURE.match(signature) or int(expiry) <= time.time():
        return False
    expected = download_signature(key, row.token_id, row.id, int(expiry))
    return hmac.compare_digest(expected.encode(), signature.encode())


def _url_heads(*bases: str | None) -> set[str]:
    """Everything that may stand before `/v1/files/{id}` in one of this gateway's file URLs."""
    heads: set[str] = set()
    for base in bases:
        if not base:
            continue
        parts = urlsplit(base)
        origin = f"{parts.scheme}://{parts.netloc}".lower()
        heads.update({base.rstrip("/").lower(), origin, origin + "/replicate"})
    return heads


def _find_file_urls(value: Any, heads: set[str]) -> list[tuple[FieldPath, str]]:
    """(path, file id) of every string that is exactly a gateway file URL, in document order."""
    found: list[tuple[FieldPath, str]] = []
    # An explicit stack: inputs may nest deeper than Python's recursion limit.
    stack: list[tuple[FieldPath, Any]] = [((), value)]
    while stack:
        path, node = stack.pop()
        if isinstance(node, dict):
            stack.extend(reversed([((*path, k), v) for k, v in node.items()]))
        elif isinstance(node, list):
            stack.extend(reversed([((*path, i), v) for i, v in enumerate(node)]))
        elif isinstance(node, str) and _FILES_PATH in node:
            head, _, file_id = node.rpartition(_FILES_PATH)
            if head.lower() in heads and file_id and not any(c in file_id for c in "/?#"):
                found.append((path, file_id))
    return found


def _replace(value: Any, replacements: list[tuple[FieldPath, str]]) -> Any:
    """A copy of `value` with the strings at these paths replaced; the input is not changed."""
    copies: dict[int, Any] = {}

    def own(container: Any) -> Any:
        copied = copies.get(id(container))
        if copied is None:
            copied = dict(container) if isinstance(container, dict) else list(container)
            copies[id(container)] = copied
        return copied

    if any(not path for path, _ in replacements):
        return replacements[0][1]
    root = own(value)
    for path, new in replacements:
        original, copied = value, root
        for step in path[:-1]:
            child = original[step]
            child_copy = own(child)
            copied[step] = child_copy
            original, copied = child, child_copy
        copied[path[-1]] = new
    return root


def _field(path: FieldPath) -> str:
    return ".".join(["input", *(str(step) for step in path)])


async def resolve_inputs(state: GatewayState, token: ApiToken, value: Any, public_base: str) -> Any:
    """The input with every gateway file URL the token owns replaced by something the upstream
    can read; every other value is returned as it is."""
    public_url = state.settings.public_url
    found = _find_file_urls(value, _url_heads(public_base, public_url))
    if not found:
        return value
    ids = {file_id for _, file_id in found if valid_file_id(file_id)}
    rows: dict[str, StoredFile] = {}
    if ids:
        async with state.sessions() as session:
            result = await session.scalars(
                select(StoredFile).where(StoredFile.id.in_(ids), StoredFile.token_id == token.id)
            )
            now = utcnow()
            rows = {row.id: row for row in result if _live(row, now)}
    missing = [path for path, file_id in found if file_id not in rows]
    if missing:
        raise ValidationFailed([{"type": "file", "field": _field(path), "description": "file not found"}
                                for path in missing])
    if public_url:
        return _replace(value, [
            (path, signed_download_url(public_url, state.key, token.id, file_id, SIGNED_URL_TTL_SECONDS))
            for path, file_id in found
        ])
    return _replace(value, await _data_uris(state, found, rows))


async def _data_uris(
    state: GatewayState, found: list[tuple[FieldPath, str]], rows: dict[str, StoredFile]
) -> list[tuple[FieldPath, str]]:
    """Each found file as a `data:` URI, refusing more than INLINE_MAX_BYTES of files in all."""
    if sum(row.size for row in rows.values()) > INLINE_MAX_BYTES:
        description = (f"files inlined into one input must total at most {INLINE_MAX_BYTES} bytes; "
                       "set GATEWAY_PUBLIC_URL so the upstream can download larger files")
        raise ValidationFailed([{"type": "file", "field": _field(path), "description": description}
                                for path, _ in found])
    encoded: dict[str, str] = {}
    for file_id, row in rows.items():
        try:
            content = await state.storage.read(row.storage_key)
        except FileNotFoundError:
            log.error("files.bytes_missing", extra={"file_id": file_id})
            raise ValidationFailed([{"type": "file", "field": _field(path), "description": "file not found"}
                                    for path, fid in found if fid == file_id]) from None
        media_type = "".join(row.content_type.split())
        encoded[file_id] = f"data:{media_type};base64,{base64.b64encode(content).decode()}"
    return [(path, encoded[file_id]) for path, file_id in found]
