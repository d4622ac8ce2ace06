"""Background steps give way to the requests in progress, for a bounded time."""

from __future__ import annotations

import asyncio
import contextlib
import time

from app.foreground import Foreground


async def test_with_no_request_in_progress_a_step_goes_at_once() -> None:
    foreground = Foreground(longest_wait=5)
    await asyncio.wait_for(foreground.give_way(), 0.5)  # a wait would take 5 s
    assert foreground.waiting == 0


async def test_a_step_waits_until_no_request_is_in_progress() -> None:
    foreground = Foreground(longest_wait=5)
    foreground.started()
    foreground.started()
    step = asyncio.ensure_future(foreground.give_way())
    await asyncio.sleep(0.05)
    assert not step.done()
    foreground.finished()
    await asyncio.sleep(0.02)
    assert not step.done(), "one request is still in progress"
    foreground.finished()
    await asyncio.wait_for(step, 0.5)
    assert foreground.waiting == 0


async def test_one_lull_lets_a_few_steps_through_and_the_rest_wait_for_the_next() -> None:
    foreground = Foreground(longest_wait=5, steps_per_lull=2)
    foreground.started()
    steps = [asyncio.ensure_future(foreground.give_way()) for _ in range(5)]
    await asyncio.sleep(0.01)
    gone = []
    for _ in range(3):
        foreground.finished()
        await asyncio.sleep(0.01)
        gone.append([step.done() for step in steps])
        foreground.started()
    assert gone == [[True, True, False, False, False], [True, True, True, True, False], [True] * 5]
    assert foreground.waiting == 0


async def test_under_constant_load_each_step_goes_after_the_longest_wait_and_keeps_no_place() -> None:
    foreground = Foreground(longest_wait=0.02)
    foreground.started()
    started = time.monotonic()
    for _ in range(20):
        await foreground.give_way()
    elapsed = time.monotonic() - started
    assert 0.4 <= elapsed < 3
    assert foreground.waiting == 0


async def test_a_cancelled_step_gives_up_its_place_in_line() -> None:
    foreground = Foreground(longest_wait=5, steps_per_lull=1)
    foreground.started()
    first = asyncio.ensure_future(foreground.give_way())
    second = asyncio.ensure_future(foreground.give_way())
    await asyncio.sleep(0.01)
    first.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await first
    assert foreground.waiting == 1
    foreground.finished()  # the one place this lull has goes to the step still waiting
    await asyncio.wait_for(second, 0.5)
