"""Enqueue client webhook deliveries in the transaction of the state change that causes them."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncSession

from app.predictions.models import Prediction


async def record_events(
    session: AsyncSession,
    prediction: Prediction,
    *,
    previous_status: str | None,
    key: bytes,
    now: datetime,
) -> None:
    """Write the deliveries this change calls for; `previous_status` is None on the first one."""
    return None
