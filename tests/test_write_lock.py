"""SQLite's write queue: requests before background jobs, background never starved, no lost lock."""

from __future__ import annotations

import asyncio

import pytest

from app.db import FOREGROUND_BURST, WriteLock


async def _queue_up(lock: WriteLock, kinds: list[str]) -> list[str]:
    """Hold the lock, queue one waiter per kind, then let them all through; the order they got it."""
    order: list[str] = []
    await lock.acquire(background=False)

    async def writer(name: str) -> None:
        await lock.acquire(background=name.startswith("bg"))
        order.append(name)
        await asyncio.sleep(0)
        lock.release()

    tasks = [asyncio.create_task(writer(name)) for name in kinds]
    await asyncio.sleep(0)
    lock.release()
    await asyncio.gather(*tasks)
    return order


async def test_requests_go_before_waiting_background_work() -> None:
    order = await _queue_up(WriteLock(), ["bg1", "bg2", "fg1", "fg2"])
    assert order == ["fg1", "fg2", "bg1", "bg2"]


async def test_background_work_gets_a_turn_within_a_burst_of_requests() -> None:
    foreground = [f"fg{i}" for i in range(3 * FOREGROUND_BURST)]
    order = await _queue_up(WriteLock(), ["bg1", "bg2", *foreground])
    assert order.index("bg1") == FOREGROUND_BURST
    assert order.index("bg2") == 2 * FOREGROUND_BURST + 1
    assert [name for name in order if name.startswith("fg")] == foreground


async def test_each_kind_keeps_its_arrival_order_and_holds_the_lock_alone() -> None:
    lock = WriteLock()
    inside = 0
    most = 0

    async def writer(background: bool) -> None:
        nonlocal inside, most
        await lock.acquire(background=background)
        inside += 1
        most = max(most, inside)
        await asyncio.sleep(0.001)
        inside -= 1
        lock.release()

    await asyncio.gather(*(writer(i % 3 == 0) for i in range(30)))
    assert most == 1
    await lock.acquire(background=True)  # free again: taken at once
    lock.release()


@pytest.mark.parametrize("background", [False, True])
async def test_a_cancelled_waiter_never_takes_the_lock_with_it(background: bool) -> None:
    lock = WriteLock()
    await lock.acquire(background=False)
    cancelled = asyncio.create_task(lock.acquire(background=background))
    later = asyncio.create_task(lock.acquire(background=False))
    await asyncio.sleep(0)
    cancelled.cancel()
    await asyncio.sleep(0)
    lock.release()
    await asyncio.wait_for(later, timeout=1)
    assert cancelled.cancelled()
    lock.release()
    await asyncio.wait_for(lock.acquire(background=True), timeout=1)


async def test_a_waiter_cancelled_just_as_it_is_handed_the_lock_passes_it_on() -> None:
    lock = WriteLock()
    await lock.acquire(background=False)
    first = asyncio.create_task(lock.acquire(background=False))
    second = asyncio.create_task(lock.acquire(background=True))
    await asyncio.sleep(0)
    lock.release()  # handed to `first`, which has not run yet
    first.cancel()
    await asyncio.wait_for(second, timeout=1)
    with pytest.raises(asyncio.CancelledError):
        await first
