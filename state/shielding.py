"""Taking what the caller must give back (a lock, a lease), safe from its cancellation."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def taken_or_given_back(take: Awaitable[T], give_back: Callable[[T], object]) -> T:
    """What `take` returns, awaited shielded from the caller's cancellation. A caller
    cancelled once the take was sent (its reply on the way) stops at once, and what the
    take returns after all goes to `give_back` (called from the event loop, so it starts
    the release rather than awaits it): otherwise nobody holds its token, and it is held
    to its TTL. A take that fails took nothing: its error is the next call's to meet."""
    taking = asyncio.ensure_future(take)
    try:
        return await asyncio.shield(taking)
    except asyncio.CancelledError:
        taking.add_done_callback(
            lambda done: (
                done.cancelled() or done.exception() is not None or give_back(done.result())
            )
        )
        raise
