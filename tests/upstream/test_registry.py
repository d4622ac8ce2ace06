"""Routing order across upstreams and the circuit breaker, as pure units."""

from __future__ import annotations

import asyncio
import logging
import random
from collections import Counter
from typing import Any

import pytest

from app.config import Settings, UpstreamConfig
from app.upstream.registry import CircuitBreaker, Registry, Upstream


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def upstream(name: str, **config: Any) -> Upstream:
    return Upstream(config=UpstreamConfig(name=name, url=f"https://{name}.example/replicate", **config),
                    client=None)  # type: ignore[arg-type]


class TestCircuitBreaker:
    def test_opens_after_the_threshold_and_probes_after_the_cooldown(self) -> None:
        clock = Clock()
        breaker = CircuitBreaker(threshold=3, cooldown=10, clock=clock)
        for _ in range(2):
            breaker.failed()
        assert breaker.allow()
        breaker.failed()
        assert breaker.state == "open"
        assert not breaker.allow()
        clock.now = 10
        assert breaker.state == "half-open"
        assert breaker.allow()
        assert not breaker.allow(), "only one probe at a time"
        breaker.succeeded()
        assert breaker.state == "closed"
        assert breaker.allow()

    def test_a_probe_ended_without_a_verdict_lets_the_next_request_probe(self) -> None:
        clock = Clock()
        breaker = CircuitBreaker(threshold=1, cooldown=5, clock=clock)
        breaker.failed()
        breaker.probe_ended()  # open, with no probe out: nothing to end
        assert not breaker.allow()
        clock.now = 5
        assert breaker.allow()
        breaker.probe_ended()
        assert breaker.state == "half-open"
        assert breaker.allow()
        breaker.succeeded()
        breaker.probe_ended()
        assert breaker.state == "closed"

    def test_a_failed_probe_reopens_at_once(self) -> None:
        clock = Clock()
        breaker = CircuitBreaker(threshold=1, cooldown=5, clock=clock)
        breaker.failed()
        clock.now = 5
        assert breaker.allow()
        breaker.failed()
        assert breaker.state == "open"
        clock.now = 9
        assert not breaker.allow()

    def test_success_resets_the_count(self) -> None:
        breaker = CircuitBreaker(threshold=2)
        breaker.failed()
        breaker.succeeded()
        breaker.failed()
        assert breaker.state == "closed"


class TestCandidates:
    def test_priority_first_then_weight(self) -> None:
        registry = Registry([upstream("low", priority=0), upstream("a", priority=5, weight=3),
                             upstream("b", priority=5, weight=1)], rng=random.Random(7))
        firsts = Counter(registry.candidates("x/y")[0].name for _ in range(4000))
        assert set(firsts) == {"a", "b"}
        assert 2.5 < firsts["a"] / firsts["b"] < 3.5
        assert all(registry.candidates("x/y")[-1].name == "low" for _ in range(50))

    def test_only_upstreams_serving_the_model(self) -> None:
        registry = Registry([upstream("flux", models=["black-forest-labs/*"]), upstream("all")])
        assert {u.name for u in registry.candidates("black-forest-labs/flux-dev")} == {"flux", "all"}
        assert [u.name for u in registry.candidates("meta/llama")] == ["all"]

    def test_a_bare_version_goes_first_to_upstreams_that_serve_every_model(self) -> None:
        registry = Registry([upstream("flux", models=["black-forest-labs/*"], priority=9), upstream("all")])
        assert [u.name for u in registry.candidates(None)] == ["all", "flux"], "flux may not know the version"
        limited = Registry([upstream("flux", models=["black-forest-labs/*"]), upstream("meta", models=["meta/*"])])
        assert {u.name for u in limited.candidates(None)} == {"flux", "meta"}

    def test_model_map(self) -> None:
        mapped = upstream("m", model_map={"black-forest-labs/flux-dev": "bfl/flux-dev-fast"})
        assert mapped.upstream_model("black-forest-labs/flux-dev") == "bfl/flux-dev-fast"
        assert mapped.upstream_model("a/b") == "a/b"


class TestConfig:
    def test_upstreams_from_the_config_file(self, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("RELAY_B_KEY", "sk-from-env")
        path = tmp_path / "gateway.toml"
        path.write_text(
            '[[upstreams]]\nname = "a"\nurl = "https://a.example/replicate/"\ntoken = "sk-a"\npriority = 2\n'
            '[[upstreams]]\nname = "b"\nurl = "https://b.example/replicate"\ntoken_env = "RELAY_B_KEY"\n'
            'models = ["meta/*"]\nrejects_with_5xx = true\n'
        )
        settings = Settings(_env_file=None, config=path)  # type: ignore[call-arg]
        a, b = settings.effective_upstreams()
        assert (a.name, a.url, a.resolved_token(), a.priority) == ("a", "https://a.example/replicate", "sk-a", 2)
        assert (b.resolved_token(), b.models, b.rejects_with_5xx) == ("sk-from-env", ["meta/*"], True)

    def test_without_upstreams_the_single_url_is_the_default(self) -> None:
        settings = Settings(_env_file=None, upstream_url="https://relay.example/replicate",  # type: ignore[call-arg]
                            upstream_token="sk-x")
        (only,) = settings.effective_upstreams()
        assert (only.name, only.url, only.resolved_token()) == ("default", "https://relay.example/replicate", "sk-x")

    def test_duplicate_names_are_refused(self) -> None:
        with pytest.raises(ValueError, match="unique"):
            Settings(_env_file=None, upstreams=[  # type: ignore[call-arg]
                UpstreamConfig(name="a", url="https://a.example"), UpstreamConfig(name="a", url="https://b.example")])

    def test_an_empty_key_counts_as_unset(self, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        # compose's `${VAR:-}` gives an empty value: no "Authorization: Bearer " may follow from it.
        monkeypatch.setenv("RELAY_B_KEY", "")
        settings = Settings(_env_file=None, upstream_token="")  # type: ignore[call-arg]
        assert settings.effective_upstreams()[0].resolved_token() is None
        assert UpstreamConfig(name="b", url="https://b.example", token_env="RELAY_B_KEY").resolved_token() is None

    def test_an_upstream_without_a_key_is_named_at_start_up(self, caplog: pytest.LogCaptureFixture) -> None:
        settings = Settings(_env_file=None, upstreams=[  # type: ignore[call-arg]
            UpstreamConfig(name="keyed", url="https://a.example", token="sk-a-secret-key"),
            UpstreamConfig(name="unkeyed", url="https://b.example", token_env="RELAY_NEVER_SET_KEY")])
        with caplog.at_level(logging.WARNING, logger="app.upstream.registry"):
            registry = Registry.from_settings(settings)
        warned = [(r.getMessage(), getattr(r, "upstream", None), getattr(r, "token_env", None))
                  for r in caplog.records]
        assert warned == [("upstream.no_token", "unkeyed", "RELAY_NEVER_SET_KEY")]
        assert "sk-a-secret-key" not in caplog.text
        for upstream in registry.all:
            asyncio.run(upstream.client.aclose())
