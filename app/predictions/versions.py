"""Which model each version id belongs to, learned from upstream answers and kept in the ledger."""

from __future__ import annotations

import logging
import re
from collections import OrderedDict

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.columns import utcnow
from app.db import Transactions
from app.predictions.models import ModelVersion

log = logging.getLogger(__name__)

CACHE_SIZE = 10_000
_MODEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}/[A-Za-z0-9][A-Za-z0-9._-]{0,99}\Z")
_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
# What relays answer in `version` for predictions of models they serve by name: not a version.
_NOT_VERSIONS = frozenset({"hidden"})


class KnownVersions:
    """Version id to `owner/name`, as upstreams have shown them, shared by every process.

    The official clients send `run("owner/name:id")` as the bare id, so without this a token
    limited to some models could not run any version; with it, a version any token has run
    (or looked up) through the gateway is known by its model from then on."""

    def __init__(self, transactions: Transactions, read_sessions: async_sessionmaker[AsyncSession]) -> None:
        self._transactions = transactions
        self._read_sessions = read_sessions
        self._models: OrderedDict[str, str] = OrderedDict()

    def cached(self, version: str) -> str | None:
        """The version's model as this process knows it, without a database read."""
        return self._models.get(version)

    async def model_of(self, version: str) -> str | None:
        """The version's model, read from the ledger if this process has not seen it; None if
        no upstream has shown it yet."""
        model = self._models.get(version)
        if model is not None:
            return model
        async with self._read_sessions() as session:
            model = await session.scalar(select(ModelVersion.model).where(ModelVersion.version == version))
        if model is not None:
            self._remember(version, model)
        return model

    async def learn(self, model: str, versions: list[str]) -> None:
        """Keep that each of `versions` belongs to `model` (an upstream said so); a failed write
        is logged, not raised."""
        if not _MODEL.match(model):
            return
        new = [v for v in dict.fromkeys(versions)
               if v not in _NOT_VERSIONS and _VERSION.match(v) and self._models.get(v) != model]
        if not new:
            return
        for version in new:
            self._remember(version, model)

        def keep(connection: Connection) -> None:
            for version in new:
                connection.execute(_upsert(connection.dialect.name, version, model))

        try:
            await self._transactions.run(keep)
        except (SQLAlchemyError, OSError) as exc:
            # The database being away must not fail a create or a read that has succeeded.
            log.warning("versions.not_kept", extra={"error": type(exc).__name__})

    def _remember(self, version: str, model: str) -> None:
        self._models[version] = model
        self._models.move_to_end(version)
        if len(self._models) > CACHE_SIZE:
            self._models.popitem(last=False)


def _upsert(dialect: str, version: str, model: str) -> postgresql.Insert | sqlite.Insert:
    """Insert the pair, or correct the model of a version already kept (the newest answer wins)."""
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    statement = insert(ModelVersion).values(version=version, model=model, learned_at=utcnow())
    return statement.on_conflict_do_update(index_elements=[ModelVersion.version],
                                           set_={"model": model, "learned_at": utcnow()})
