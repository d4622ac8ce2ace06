"""Copy succeeded predictions' output files to our storage before the upstream's copies expire."""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from fnmatch import fnmatchcase
from typing import Any

import httpx
from sqlalchemy import Select, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.columns import utcnow
from app.config import Settings
from app.outbound import outbound_client
from app.outputs.models import OutputFile
from app.predictions.models import Prediction
from app.storage import LocalStorage, TooLarge
from app.tokens.service import new_id

log = logging.getLogger(__name__)

BATCH_SIZE = 20
# Relays' output URLs expire after about an hour; later than this there is nothing left to copy.
ARCHIVE_WINDOW = timedelta(hours=3)
LATE_ANSWER_SLACK = timedelta(hours=1)
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]")


def output_token(file_id: str, key: bytes) -> str:
    """The unguessable part of an archived output's URL."""
    return hmac.new(key, b"output:" + file_id.encode(), hashlib.sha256).hexdigest()[:40]


def output_url(base: str, file_id: str, key: bytes, name: str) -> str:
    """The stable gateway URL of an archived output (no token needed, as npm fetches it)."""
    return f"{base}/v1/outputs/{file_id}.{output_token(file_id, key)}/{name}"


def file_name(url: str) -> str:
    """A safe file name for an output, from the last segment of its URL."""
    name = _SAFE_NAME.sub("_", httpx.URL(url).path.rsplit("/", 1)[-1])[:100].strip("._")
    return name or "output"


def output_urls(output: Any) -> list[str]:
    """The http(s) URLs among a prediction's outputs, in order."""
    items = output if isinstance(output, list) else [output]
    return [i for i in items if isinstance(i, str) and i.startswith(("https://", "http://"))]


def due_for_archiving(now: datetime, lifetime: timedelta) -> Select[Any]:
    """The next batch of predictions that succeeded within the archive window and are not yet
    settled, soonest completed first."""
    since = now - ARCHIVE_WINDOW
    # A prediction ends within its lifetime of its creation (the reconciler sees to it), so only
    # those created since then, with slack for late answers, can be due: the status index then
    # walks the recent ones, not every prediction that ever succeeded (2 to 6 s a pass at a
    # million on SQLite).
    return (
        select(Prediction).where(
            Prediction.status == "succeeded",
            Prediction.created_at >= since - lifetime - LATE_ANSWER_SLACK,
            Prediction.outputs_archived.is_(False),
            Prediction.completed_at >= since,
        ).order_by(Prediction.completed_at).limit(BATCH_SIZE)
    )


class OutputArchiver:
    """Finds succeeded predictions whose model is to be kept and copies their files."""

    def __init__(
        self,
        *,
        sessions: async_sessionmaker[AsyncSession],
        storage: LocalStorage,
        settings: Settings,
        key: bytes,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._sessions = sessions
        self._storage = storage
        self._settings = settings
        self._key = key
        upstream_hosts = [httpx.URL(u.url).host for u in settings.effective_upstreams()]
        self._hosts = [*settings.output_hosts, *(host for host in upstream_hosts if host)]
        self._http = outbound_client(
            transport=transport, timeout=httpx.Timeout(60.0, connect=settings.connect_timeout),
        )

    async def aclose(self) -> None:
        """Close the download client."""
        await self._http.aclose()

    def _wanted(self, model: str) -> bool:
        return any(fnmatchcase(model, glob) for glob in self._settings.durable_outputs)

    def _allowed(self, url: str) -> bool:
        # Only the upstream's own output hosts are fetched, never an arbitrary URL from an output.
        host = httpx.URL(url).host.lower()
        return any(fnmatchcase(host, pattern.lower()) for pattern in self._hosts)

    async def run_once(self) -> int:
        """Archive what is due; the number of predictions whose files were copied."""
        if not self._settings.durable_outputs:
            return 0
        due = due_for_archiving(utcnow(), timedelta(seconds=self._settings.max_prediction_seconds))
        async with self._sessions() as session:
            candidates = list((await session.scalars(due)).all())
        copied = 0
        for prediction in candidates:
            if await self._claim(prediction.id) and self._wanted(prediction.model):
                copied += await self._archive(prediction)
        return copied

    async def _claim(self, prediction_id: str) -> bool:
        # outputs_archived means "archiving settled": copied, or nothing to copy.
        async with self._sessions() as session:
            result = await session.execute(
                update(Prediction)
                .where(Prediction.id == prediction_id, Prediction.outputs_archived.is_(False))
                .values(outputs_archived=True)
            )
            await session.commit()
        return result.rowcount == 1  # type: ignore[attr-defined, no-any-return]

    async def _archive(self, prediction: Prediction) -> int:
        base = prediction.public_base or self._settings.public_url
        sources = [url for url in output_urls(prediction.output) if self._allowed(url)]
        if base is None or not sources:
            return 0
        replacements: dict[str, str] = {}
        try:
            for position, source in enumerate(sources):
                replacements[source] = await self._copy(prediction.id, source, position, base)
        except (httpx.HTTPError, TooLarge, OSError) as exc:
            log.warning("outputs.archive_failed", extra={"prediction_id": prediction.id, "error": type(exc).__name__})
            permanent = isinstance(exc, TooLarge) or (
                isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code < 500)
            if permanent:
                return 0  # stays settled: retrying cannot make it fit or appear
            async with self._sessions() as session:
                await session.execute(update(Prediction).where(Prediction.id == prediction.id)
                                      .values(outputs_archived=False))
                await session.commit()
            return 0
        output = prediction.output
        rewritten = ([replacements.get(i, i) if isinstance(i, str) else i for i in output]
                     if isinstance(output, list) else replacements.get(output, output))
        async with self._sessions() as session:
            await session.execute(update(Prediction).where(Prediction.id == prediction.id)
                                  .values(output=rewritten, updated_at=utcnow()))
            await session.commit()
        log.info("outputs.archived", extra={"prediction_id": prediction.id, "files": len(replacements)})
        return 1

    async def _copy(self, prediction_id: str, source: str, position: int, base: str) -> str:
        async with self._http.stream("GET", source) as response:
            response.raise_for_status()
            content_type = response.headers.get("content-type", "application/octet-stream")[:255]

            async def chunks() -> AsyncIterator[bytes]:
                async for chunk in response.aiter_bytes():
                    yield chunk

            stored = await self._storage.write(chunks(), max_bytes=self._settings.max_output_bytes)
        file_id = new_id()
        async with self._sessions() as session:
            session.add(OutputFile(
                id=file_id, prediction_id=prediction_id, source_url=source,
                source_url_sha256=hashlib.sha256(source.encode()).hexdigest(),
                storage_key=stored.key, content_type=content_type, size=stored.size, position=position,
            ))
            try:
                await session.commit()
            except IntegrityError:
                await session.rollback()
                await self._storage.delete(stored.key)
                existing = (await session.scalars(select(OutputFile).where(
                    OutputFile.prediction_id == prediction_id,
                    OutputFile.source_url_sha256 == hashlib.sha256(source.encode()).hexdigest(),
                ))).one()
                file_id = existing.id
        return output_url(base, file_id, self._key, file_name(source))
