"""The expiring cache behind the token and running-prediction caches."""

from __future__ import annotations

import time

from app.expiring import ExpiringCache


def test_an_entry_is_reused_until_its_time_to_live_passes() -> None:
    cache = ExpiringCache[str, int](0.05, max_entries=10)
    cache.put("a", 1)
    assert cache.get("a") == 1
    time.sleep(0.06)
    assert cache.get("a") is None
    assert cache.get("never") is None


def test_the_oldest_stored_entries_go_first_past_the_bound() -> None:
    cache = ExpiringCache[str, int](60, max_entries=2)
    cache.put("a", 1)
    cache.put("b", 2)
    cache.put("a", 3)  # stored again: now the newest
    cache.put("c", 4)
    assert (cache.get("a"), cache.get("b"), cache.get("c")) == (3, None, 4)


def test_forget_and_clear_drop_entries_and_a_zero_time_to_live_keeps_none() -> None:
    cache = ExpiringCache[str, int](60, max_entries=10)
    cache.put("a", 1)
    cache.put("b", 2)
    cache.forget("a")
    assert (cache.get("a"), cache.get("b")) == (None, 2)
    cache.clear()
    assert cache.get("b") is None
    off = ExpiringCache[str, int](0, max_entries=10)
    off.put("a", 1)
    assert off.get("a") is None
