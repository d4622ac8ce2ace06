"""Settings, read once from GATEWAY_* environment variables and an optional TOML file."""

from __future__ import annotations

import os
import tomllib
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_UPSTREAM_URL = "https://api.replicate.com"
DEFAULT_POOL_SIZE = 10


class PriceRule(BaseModel):
    """One `[[prices]]` entry: a glob on `owner/name` and exact USD amounts."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str
    per_prediction: Decimal | None = None
    per_output: Decimal | None = None
    per_second: Decimal | None = None
    per_input_token: Decimal | None = None
    per_output_token: Decimal | None = None
    estimate: Decimal | None = None  # reserved at admission; default: see pricing.estimate_of
    bill_failures: bool = False  # charge failed and canceled predictions too

    @field_validator(
        "per_prediction", "per_output", "per_second", "per_input_token", "per_output_token",
        "estimate", mode="before",
    )
    @classmethod
    def _exact_decimal(cls, value: Any) -> Any:
        # TOML floats are binary; going through str() keeps what the operator wrote.
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float | str | Decimal):
            raise ValueError("must be a decimal number of USD")
        try:
            amount = Decimal(str(value))
        except InvalidOperation as exc:
            raise ValueError("must be a decimal number of USD") from exc
        if not amount.is_finite() or amount < 0:
            raise ValueError("must be a finite, non-negative amount")
        return amount


class UpstreamConfig(BaseModel):
    """One `[[upstreams]]` entry: where it is, what it serves and how it is reached."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    url: str
    token: SecretStr | None = None
    token_env: str | None = None  # the key read from this environment variable instead
    models: list[str] = Field(default_factory=lambda: ["*"])
    priority: int = 0  # higher goes first
    weight: float = Field(default=1.0, gt=0)  # share of creates among equal priorities
    connect_timeout: float | None = Field(default=None, gt=0)
    create_timeout: float | None = Field(default=None, gt=0)
    request_timeout: float | None = Field(default=None, gt=0)
    model_map: dict[str, str] = Field(default_factory=dict)  # our owner/name -> theirs
    bill_failures: bool = False
    # Declared when this upstream answers 500, 501 or 503 to a create only before accepting it,
    # so those are safe to fail over from (a proxy's 502, 504 or 52x never are).
    rejects_with_5xx: bool = False
    # What this upstream calls itself in its answers (e.g. "CometAPI"): hidden, as whole words, from
    # the model descriptions, errors and logs clients see. Its `name` is not, since a neutral name
    # ("primary") would mangle ordinary log text.
    brand_names: list[Annotated[str, Field(min_length=3, max_length=100)]] = Field(default_factory=list)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        value = value.strip().rstrip("/")
        if not value.startswith(("http://", "https://")) or "#" in value or "?" in value:
            raise ValueError("must be an absolute http(s) URL without query or fragment")
        return value

    def resolved_token(self) -> str | None:
        """The upstream key, from `token` or the environment variable `token_env`."""
        if self.token is not None:
            return self.token.get_secret_value()
        # An empty variable counts as unset, as compose's `${VAR:-}` gives.
        return (os.environ.get(self.token_env) or None) if self.token_env else None


class Settings(BaseSettings):
    """Every setting of the gateway; built once and passed to `create_app`."""

    # Inputs stay out of validation errors: several settings are secrets (URLs with passwords).
    model_config = SettingsConfigDict(env_prefix="GATEWAY_", env_file=".env", extra="ignore",
                                      hide_input_in_errors=True)

    database_url: str = "sqlite:///./gateway.db"
    # PostgreSQL connections this process keeps open (and never exceeds).
    database_pool_size: int = Field(default=DEFAULT_POOL_SIZE, ge=1, le=500)
    upstream_url: str = DEFAULT_UPSTREAM_URL
    upstream_token: SecretStr | None = None
    public_url: str | None = None
    admin_token: SecretStr | None = None
    secret_key: SecretStr | None = None
    config: Path | None = None

    connect_timeout: float = Field(default=5.0, gt=0)
    create_timeout: float = Field(default=30.0, gt=0)
    request_timeout: float = Field(default=10.0, gt=0)
    max_body_bytes: int = Field(default=1024 * 1024, gt=0)
    max_upstream_body_bytes: int = Field(default=16 * 1024 * 1024, gt=0)
    log_level: str = "INFO"
    default_estimate: Decimal = Field(default=Decimal(0), ge=0)  # USD held for unpriced models
    # USD reserved on top of the fixed parts of a per-second or per-token price with no
    # `estimate`. Not 0, so a burst of such creates cannot all fit one budget (P3).
    metered_estimate: Decimal = Field(default=Decimal("0.01"), ge=0)
    reconcile_interval: float = Field(default=2.0, gt=0)
    # On SIGTERM: how long requests still in progress may take before they are cut.
    drain_seconds: int = Field(default=70, ge=1)
    poll_backoff_max: float = Field(default=30.0, gt=0)
    max_prediction_seconds: float = Field(default=1800.0, gt=0)
    storage_dir: Path = Path("./data")
    max_file_bytes: int = Field(default=100 * 1024 * 1024, gt=0)
    stream_poll_interval: float = Field(default=0.5, gt=0)
    stream_keepalive_interval: float = Field(default=15.0, gt=0, lt=30)
    allow_private_webhooks: bool = False
    # Webhook bodies are signed but not encrypted: plain http only when a deployment asks for it.
    allow_http_webhooks: bool = False
    upstream_webhook_secret: SecretStr | None = None
    webhook_interval: float = Field(default=0.5, gt=0)  # seconds between webhook delivery passes
    durable_outputs: list[str] = Field(default_factory=list)  # owner/name globs to archive
    output_hosts: list[str] = Field(default_factory=lambda: ["replicate.delivery", "*.replicate.delivery"])
    max_output_bytes: int = Field(default=100 * 1024 * 1024, gt=0)

    prices: list[PriceRule] = Field(default_factory=list)
    upstreams: list[UpstreamConfig] = Field(default_factory=list)
    breaker_threshold: int = Field(default=5, ge=1)
    breaker_cooldown: float = Field(default=30.0, gt=0)
    # How long an authenticated token is reused without reading it again; creates re-check
    # revocation in the database regardless, so this bounds only reads after a revocation.
    auth_cache_seconds: float = Field(default=1.0, ge=0, le=60)
    # How long an unfinished prediction's row is reused by GETs without reading it again. Every
    # GET still asks the upstream, and this process's own writes replace the row at once, so
    # this bounds only how late a GET here shows what another process alone could know (a
    # forced finish): a change the upstream reports is recorded and answered as ever.
    running_cache_seconds: float = Field(default=1.0, ge=0, le=60)
    # Rate and in-flight limits shared through Redis; without it, through the database.
    redis_url: SecretStr | None = None
    redis_prefix: str = "replicate-gateway:"

    @field_validator("upstream_url", "public_url")
    @classmethod
    def _absolute_http_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.strip().rstrip("/")
        if not value.startswith(("http://", "https://")) or "#" in value or "?" in value:
            raise ValueError("must be an absolute http(s) URL without query or fragment")
        return value

    @field_validator("upstream_token", mode="before")
    @classmethod
    def _upstream_token(cls, value: Any) -> Any:
        # Empty counts as unset, as compose's `${VAR:-}` gives, so no "Bearer " goes upstream.
        return None if value == "" else value

    @field_validator("redis_url", mode="before")
    @classmethod
    def _redis_url(cls, value: Any) -> Any:
        # Empty counts as unset, as compose's `${VAR:-}` gives; errors never show the value.
        if value is None or value == "":
            return None
        text = value.get_secret_value() if isinstance(value, SecretStr) else value
        if not isinstance(text, str) or not text.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must be a redis://, rediss:// or unix:// URL")
        return value

    @model_validator(mode="after")
    def _load_config_file(self) -> Settings:
        if self.config is not None and not (self.prices or self.upstreams):
            with self.config.open("rb") as handle:
                data = tomllib.load(handle)
            self.prices = [PriceRule.model_validate(entry) for entry in data.get("prices", [])]
            self.upstreams = [UpstreamConfig.model_validate(entry) for entry in data.get("upstreams", [])]
        names = [u.name for u in self.upstreams]
        if len(names) != len(set(names)):
            raise ValueError("upstream names must be unique")
        return self

    def effective_upstreams(self) -> list[UpstreamConfig]:
        """The `[[upstreams]]` entries, or one named "default" from GATEWAY_UPSTREAM_URL."""
        if self.upstreams:
            return list(self.upstreams)
        return [UpstreamConfig(name="default", url=self.upstream_url, token=self.upstream_token)]

    @property
    def async_database_url(self) -> str:
        """The database URL with the async driver SQLAlchemy needs."""
        return to_async_url(self.database_url)


def to_async_url(url: str) -> str:
    """Map `sqlite://` and `postgresql://` URLs to their asyncio drivers."""
    for plain, driver in (
        ("sqlite://", "sqlite+aiosqlite://"),
        ("postgresql://", "postgresql+asyncpg://"),
        ("postgres://", "postgresql+asyncpg://"),
    ):
        if url.startswith(plain):
            return driver + url[len(plain):]
    return url


@lru_cache
def get_settings() -> Settings:
    """Settings from the environment, for the command line only."""
    return Settings()
