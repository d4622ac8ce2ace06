"""The configured upstreams: model routing by priority and weight, and a circuit breaker each."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

import httpx

from app.config import Settings, UpstreamConfig
from app.upstream.client import Observer, UpstreamClient

log = logging.getLogger(__name__)


@dataclass
class CircuitBreaker:
    """Opens after `threshold` consecutive failures; after `cooldown` s lets one probe through."""

    threshold: int = 5
    cooldown: float = 30.0
    clock: Callable[[], float] = time.monotonic
    failures: int = 0
    opened_at: float | None = None
    probing: bool = False

    @property
    def state(self) -> str:
        """closed, open or half-open."""
        if self.opened_at is None:
            return "closed"
        return "half-open" if self.clock() - self.opened_at >= self.cooldown else "open"

    def allow(self) -> bool:
        """Whether a request may go to this upstream now (a half-open breaker admits one probe)."""
        state = self.state
        if state == "closed":
            return True
        if state == "half-open" and not self.probing:
            self.probing = True
            return True
        return False

    def succeeded(self) -> None:
        """A healthy answer closes the breaker."""
        self.failures, self.opened_at, self.probing = 0, None, False

    def failed(self) -> None:
        """A failure counts towards opening; a failed probe re-opens at once."""
        self.failures += 1
        if self.probing or self.failures >= self.threshold:
            self.opened_at = self.clock()
        self.probing = False

    def probe_ended(self) -> None:
        """A probe ended without saying whether the upstream is well (it throttled us, or was
        never sent): the next request probes instead. Without this the breaker would stay
        half-open with its one probe taken, and refuse every request for good."""
        if self.state == "half-open":
            self.probing = False


@dataclass
class Upstream:
    """One upstream: its settings, its pooled client and its breaker."""

    config: UpstreamConfig
    client: UpstreamClient
    breaker: CircuitBreaker = field(default_factory=CircuitBreaker)

    @property
    def name(self) -> str:
        """The upstream's configured name."""
        return self.config.name

    def serves(self, model: str | None) -> bool:
        """Whether this upstream is configured for `owner/name`; a bare version id (None) goes to
        those that serve every model."""
        if model is None:
            return "*" in self.config.models
        return any(fnmatchcase(model, glob) for glob in self.config.models)

    def upstream_model(self, model: str) -> str:
        """Our `owner/name` as this upstream names it."""
        return self.config.model_map.get(model, model)

    def our_model(self, theirs: str) -> str:
        """This upstream's name of a model as our `owner/name`."""
        return next((ours for ours, mapped in self.config.model_map.items() if mapped == theirs), theirs)


class Registry:
    """Every upstream by name, and the order in which a create tries them."""

    def __init__(self, upstreams: Sequence[Upstream], *, rng: random.Random | None = None) -> None:
        self._by_name = {u.name: u for u in upstreams}
        self._rng = rng or random.Random()  # noqa: S311  (load spreading, not security)

    @classmethod
    def from_settings(
        cls, settings: Settings, transport: httpx.AsyncBaseTransport | None = None,
        observer: Observer | None = None,
    ) -> Registry:
        """One pooled client per configured upstream."""
        upstreams = []
        for config in settings.effective_upstreams():
            token = config.resolved_token()
            if token is None and transport is None:
                # Legitimate for a relay that needs no key, but far more often a variable
                # that was never set: said at start-up, not by every create's 502.
                log.warning("upstream.no_token", extra={"upstream": config.name, "token_env": config.token_env})
            client = UpstreamClient(
                name=config.name,
                base_url=config.url,
                token=token,
                brand_names=config.brand_names,
                connect_timeout=config.connect_timeout or settings.connect_timeout,
                request_timeout=config.request_timeout or settings.request_timeout,
                create_timeout=config.create_timeout or settings.create_timeout,
                max_body_bytes=settings.max_upstream_body_bytes,
                transport=transport,
                observer=observer,
            )
            breaker = CircuitBreaker(threshold=settings.breaker_threshold, cooldown=settings.breaker_cooldown)
            upstreams.append(Upstream(config=config, client=client, breaker=breaker))
        return cls(upstreams)

    @property
    def all(self) -> list[Upstream]:
        """Every upstream, in configuration order."""
        return list(self._by_name.values())

    def get(self, name: str) -> Upstream | None:
        """The upstream that owns a prediction."""
        return self._by_name.get(name)

    def candidates(self, model: str | None) -> list[Upstream]:
        """Upstreams serving `model`, highest priority first, weighted-shuffled within a priority.

        A bare version id (None) may be of any model: the upstreams that serve every model come
        first, and those limited to some models after them, as a last resort (or the only choice
        of a token group limited to them)."""
        serving = [u for u in self._by_name.values() if u.serves(model)]
        if model is None:
            return self._ordered(serving) + self._ordered([u for u in self._by_name.values() if not u.serves(None)])
        return self._ordered(serving)

    def _ordered(self, serving: list[Upstream]) -> list[Upstream]:
        ordered: list[Upstream] = []
        for priority in sorted({u.config.priority for u in serving}, reverse=True):
            tier = [u for u in serving if u.config.priority == priority]
            while len(tier) > 1:
                pick = self._rng.choices(tier, weights=[max(u.config.weight, 0.0001) for u in tier])[0]
                ordered.append(pick)
                tier.remove(pick)
            # The last of a tier needs no draw: with one upstream, that is every create.
            ordered.extend(tier)
        return ordered

    async def aclose(self) -> None:
        """Close every client."""
        for upstream in self._by_name.values():
            await upstream.client.aclose()
