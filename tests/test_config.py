"""Settings from GATEWAY_* variables and the `[[prices]]` TOML file."""

from __future__ import annotations

import os
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from app.config import DEFAULT_UPSTREAM_URL, PriceRule, Settings, to_async_url


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.upper().startswith("GATEWAY_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # no stray .env file


def settings(**kwargs: Any) -> Settings:
    return Settings(_env_file=None, **kwargs)  # type: ignore[call-arg]


def write_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "prices.toml"
    path.write_text(text, encoding="utf-8")
    return path


class TestToAsyncUrl:
    @pytest.mark.parametrize(
        ("url", "expected"),
        [
            pytest.param("sqlite:///./gateway.db", "sqlite+aiosqlite:///./gateway.db", id="sqlite-relative"),
            pytest.param("sqlite:////var/lib/g.db", "sqlite+aiosqlite:////var/lib/g.db", id="sqlite-absolute"),
            pytest.param("sqlite://", "sqlite+aiosqlite://", id="sqlite-memory"),
            pytest.param("postgresql://u:p@db:5432/gw", "postgresql+asyncpg://u:p@db:5432/gw", id="postgresql"),
            pytest.param("postgres://u:p@db/gw", "postgresql+asyncpg://u:p@db/gw", id="postgres-alias"),
            pytest.param("sqlite+aiosqlite:///x.db", "sqlite+aiosqlite:///x.db", id="already-async-sqlite"),
            pytest.param("postgresql+asyncpg://db/gw", "postgresql+asyncpg://db/gw", id="already-async-pg"),
            pytest.param("postgresql+psycopg://db/gw", "postgresql+psycopg://db/gw", id="other-driver-kept"),
            pytest.param("mysql://db/gw", "mysql://db/gw", id="unknown-kept"),
            pytest.param("x-sqlite:///a", "x-sqlite:///a", id="prefix-only"),
        ],
    )
    def test_maps_to_async_driver(self, url: str, expected: str) -> None:
        assert to_async_url(url) == expected

    def test_settings_property(self) -> None:
        assert settings(database_url="postgres://db/gw").async_database_url == "postgresql+asyncpg://db/gw"


class TestUrls:
    def test_defaults(self) -> None:
        s = settings()
        assert s.upstream_url == DEFAULT_UPSTREAM_URL
        assert s.public_url is None
        assert s.prices == []

    @pytest.mark.parametrize(
        ("value", "expected"),
        [
            pytest.param("https://relay.example/replicate/", "https://relay.example/replicate", id="slash-trimmed"),
            pytest.param("https://relay.example///", "https://relay.example", id="slashes-trimmed"),
            pytest.param(" http://127.0.0.1:9000/ ", "http://127.0.0.1:9000", id="space-and-slash"),
            pytest.param("https://relay.example", "https://relay.example", id="unchanged"),
        ],
    )
    @pytest.mark.parametrize("field", ["upstream_url", "public_url"])
    def test_trailing_slash_trimmed(self, field: str, value: str, expected: str) -> None:
        assert getattr(settings(**{field: value}), field) == expected

    @pytest.mark.parametrize(
        "value",
        [
            pytest.param("ftp://relay.example", id="ftp"),
            pytest.param("relay.example", id="no-scheme"),
            pytest.param("//relay.example", id="scheme-relative"),
            pytest.param("ws://relay.example", id="websocket"),
            pytest.param("file:///etc/passwd", id="file"),
            pytest.param("https://relay.example/?token=x", id="query"),
            pytest.param("https://relay.example/#x", id="fragment"),
            pytest.param("", id="empty"),
        ],
    )
    @pytest.mark.parametrize("field", ["upstream_url", "public_url"])
    def test_rejects_non_http(self, field: str, value: str) -> None:
        with pytest.raises(ValidationError, match=field):
            settings(**{field: value})

    def test_read_from_environment(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("GATEWAY_UPSTREAM_URL", "https://relay.example/r/")
        assert settings().upstream_url == "https://relay.example/r"


class TestPricesFile:
    def test_exact_decimals_kept(self, tmp_path: Path) -> None:
        path = write_toml(tmp_path, """
[[prices]]
model = "black-forest-labs/*"
per_prediction = 0.003
per_second = 0.0012

[[prices]]
model = "llm/*"
per_input_token = 0.000001
per_output_token = 2.25e-6

[[prices]]
model = "*/multi"
per_output = "0.01"

[[prices]]
model = "flat/*"
per_prediction = 1
""")
        s = settings(config=path)
        assert s.prices == [
            PriceRule(model="black-forest-labs/*", per_prediction=Decimal("0.003"), per_second=Decimal("0.0012")),
            PriceRule(model="llm/*", per_input_token=Decimal("0.000001"), per_output_token=Decimal("0.00000225")),
            PriceRule(model="*/multi", per_output=Decimal("0.01")),
            PriceRule(model="flat/*", per_prediction=Decimal("1")),
        ]
        assert str(s.prices[0].per_prediction) == "0.003"
        assert str(s.prices[0].per_second) == "0.0012"
        for rule in s.prices:
            for name in ("per_prediction", "per_output", "per_second", "per_input_token", "per_output_token"):
                assert getattr(rule, name) is None or type(getattr(rule, name)) is Decimal

    @pytest.mark.parametrize(
        ("literal", "expected"),
        [
            pytest.param("0.1", "0.1", id="0.1-not-its-binary-expansion"),
            pytest.param("0.000225", "0.000225"),
            pytest.param("0", "0"),
            pytest.param("0.0", "0.0"),
            pytest.param('"0.000001"', "0.000001", id="string"),
            pytest.param("1e-3", "0.001"),
        ],
    )
    def test_float_literal_is_not_binary(self, tmp_path: Path, literal: str, expected: str) -> None:
        path = write_toml(tmp_path, f'[[prices]]\nmodel = "a/*"\nper_second = {literal}\n')
        value = settings(config=path).prices[0].per_second
        assert value == Decimal(expected)
        assert str(value) == expected

    def test_order_is_file_order(self, tmp_path: Path) -> None:
        path = write_toml(tmp_path, "".join(f'[[prices]]\nmodel = "m{i}/*"\n' for i in range(5)))
        assert [rule.model for rule in settings(config=path).prices] == [f"m{i}/*" for i in range(5)]

    def test_file_without_prices(self, tmp_path: Path) -> None:
        assert settings(config=write_toml(tmp_path, "# nothing\n")).prices == []

    def test_explicit_prices_win_over_the_file(self, tmp_path: Path) -> None:
        path = write_toml(tmp_path, '[[prices]]\nmodel = "file/*"\n')
        explicit = [PriceRule(model="explicit/*")]
        assert settings(config=path, prices=explicit).prices == explicit

    def test_config_from_environment(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        path = write_toml(tmp_path, '[[prices]]\nmodel = "env/*"\nper_prediction = 0.5\n')
        monkeypatch.setenv("GATEWAY_CONFIG", str(path))
        assert settings().prices == [PriceRule(model="env/*", per_prediction=Decimal("0.5"))]

    @pytest.mark.parametrize(
        "entry",
        [
            pytest.param("per_prediction = -0.003", id="negative"),
            pytest.param("per_second = -1", id="negative-int"),
            pytest.param('per_output = "-0.01"', id="negative-string"),
            pytest.param("per_prediction = nan", id="nan"),
            pytest.param("per_prediction = inf", id="inf"),
            pytest.param('per_prediction = "Infinity"', id="infinity-string"),
            pytest.param('per_prediction = "abc"', id="not-a-number"),
            pytest.param("per_prediction = true", id="bool"),
            pytest.param("per_prediction = [0.1]", id="array"),
            pytest.param("per_prediction = { usd = 0.1 }", id="table"),
            pytest.param("per_run = 0.003", id="unknown-key"),
            pytest.param("per_prediction = 0.003\nper_image = 0.01", id="unknown-key-next-to-valid"),
        ],
    )
    def test_rejected(self, tmp_path: Path, entry: str) -> None:
        path = write_toml(tmp_path, f'[[prices]]\nmodel = "a/*"\n{entry}\n')
        with pytest.raises(ValidationError):
            settings(config=path)

    def test_missing_model_rejected(self, tmp_path: Path) -> None:
        with pytest.raises(ValidationError, match="model"):
            settings(config=write_toml(tmp_path, "[[prices]]\nper_prediction = 0.1\n"))

    def test_price_rule_is_frozen(self) -> None:
        rule = PriceRule(model="a/*", per_prediction=Decimal("0.1"))
        with pytest.raises(ValidationError):
            rule.per_prediction = Decimal("0")  # type: ignore[misc]
