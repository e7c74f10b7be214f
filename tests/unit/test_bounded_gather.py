"""`cosmos_io.gather`, the bounded gather the Cosmos adapters run their concurrent requests
through: results in order, the first failure raised as itself, and nothing left running
or un-awaited behind it."""

from __future__ import annotations

import asyncio
import gc
import warnings

import pytest

from state.cold.cosmos_io import gather, gather_pair
from state.errors import BackendUnavailable


async def test_results_come_in_call_order_with_at_most_limit_in_flight() -> None:
    running = 0
    peak = 0

    async def call(index: int) -> int:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.001 * (5 - index % 5))
        running -= 1
        return index

    assert await gather([call(i) for i in range(12)], limit=3) == list(range(12))
    assert peak == 3


async def test_a_failure_cancels_the_calls_still_running_and_is_raised_as_itself() -> None:
    finished: list[str] = []
    cancelled: list[str] = []

    async def slow(name: str) -> str:
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            cancelled.append(name)
            raise
        finished.append(name)
        return name

    async def failing() -> str:
        await asyncio.sleep(0.01)
        raise BackendUnavailable("cosmos", "down")

    with pytest.raises(BackendUnavailable):
        await asyncio.wait_for(gather([slow("a"), failing(), slow("b")]), timeout=2)
    assert sorted(cancelled) == ["a", "b"]
    assert finished == []


async def test_calls_that_never_started_are_closed_not_left_unawaited() -> None:
    async def failing() -> int:
        await asyncio.sleep(0.01)  # holds the only slot while the others queue for it
        raise BackendUnavailable("cosmos", "down")

    async def never_reached() -> int:
        return 1

    async def attempt() -> None:
        # Not `pytest.raises`: its traceback would keep the coroutines alive past gc.
        try:
            await gather([failing(), *(never_reached() for _ in range(5))], limit=1)
        except BackendUnavailable:
            return
        raise AssertionError("gather did not raise")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        await attempt()
        for _ in range(3):  # the loop lets go of the cancelled tasks' last handles
            await asyncio.sleep(0)
        gc.collect()
    assert [str(w.message) for w in caught if "never awaited" in str(w.message)] == []


async def test_gather_pair_keeps_each_result_with_its_call() -> None:
    async def number() -> int:
        await asyncio.sleep(0.01)
        return 7

    async def text() -> str:
        return "seven"

    assert await gather_pair(number(), text()) == (7, "seven")
