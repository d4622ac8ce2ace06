"""What the running app shares between requests: settings, database and upstream."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from app.config import Settings
from app.db import HotReads
from app.storage import LocalStorage
from app.tokens.cache import TokenCache

if TYPE_CHECKING:
    from app.predictions.service import PredictionService
    from app.upstream.registry import Registry


@dataclass
class GatewayState:
    """Made once in the lifespan and reached through `request.app.state.gateway`."""

    settings: Settings
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    read_sessions: async_sessionmaker[AsyncSession]
    hot_reads: HotReads
    registry: Registry
    key: bytes
    predictions: PredictionService
    storage: LocalStorage
    token_cache: TokenCache
