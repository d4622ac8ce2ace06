"""The token group table: shared limits and a price multiplier for the tokens in a group."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, CheckConstraint, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from app.accounting.pricing import ONE_PPM
from app.columns import UTCDateTime, utcnow
from app.db import Base

MAX_MULTIPLIER_PPM = 100 * ONE_PPM  # a sane upper bound: a typo such as 150 for 1.50 is refused


class TokenGroup(Base):
    """A named set of limits that every token in it obeys on top of its own."""

    __tablename__ = "token_group"
    __table_args__ = (
        CheckConstraint(
            f"price_multiplier_ppm > 0 AND price_multiplier_ppm <= {MAX_MULTIPLIER_PPM}",
            name="price_multiplier_ppm_range",
        ),
    )

    id: Mapped[str] = mapped_column(String(26), primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    # NULL means every configured upstream, or every model; a list limits them.
    upstreams: Mapped[list[str] | None] = mapped_column(JSON, default=None)
    model_globs: Mapped[list[str] | None] = mapped_column(JSON, default=None)
    # Exact: an integer in parts per million, so 1.5 is 1_500_000 and never a binary float.
    price_multiplier_ppm: Mapped[int] = mapped_column(Integer, default=ONE_PPM, server_default=str(ONE_PPM))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
