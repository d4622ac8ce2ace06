"""What the running app shares between requests: settings, database and upstream."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from app.config import Settings
from app.db import HotReads, ReportReads
from app.expiring import ExpiringCache
from app.storage import LocalStorage
from app.tokens.cache import TokenCache
from app.webhooks.signing import TOLERANCE_SECONDS

if TYPE_CHECKING:
    from app.predictions.service import PredictionService
    from app.upstream.registry import Registry


# As long as an upstream webhook's signature stays valid, either side of now.
INBOUND_MEMORY_SECONDS = 2 * TOLERANCE_SECONDS


@dataclass
class GatewayState:
    """Made once in the lifespan and reached through `request.app.state.gateway`."""

    settings: Settings
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    read_sessions: async_sessionmaker[AsyncSession]
    hot_reads: HotReads
    report_reads: ReportReads
    registry: Registry
    key: bytes
    predictions: PredictionService
    storage: LocalStorage
    token_cache: TokenCache
    # Set when the server begins its graceful shutdown: open event streams end with an error.
    draining: bool = False
    # Signed upstream webhooks heard lately, by webhook-id (app/webhooks/router.py).
    inbound_heard: ExpiringCache[str, bool] = field(
        default_factory=lambda: ExpiringCache[str, bool](ttl=INBOUND_MEMORY_SECONDS, max_entries=10_000))
