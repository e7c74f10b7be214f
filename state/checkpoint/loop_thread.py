"""An event loop on a daemon thread: lets purely synchronous callers use the async clients.

The Cosmos and Redis clients are bound to the loop that opened them, so a sync
caller (LangGraph's `graph.invoke` with no loop running) hands every call to
this loop and waits for the result.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class LoopThread:
    def __init__(self, name: str = "checkpoint-saver-loop") -> None:
        self.loop = asyncio.new_event_loop()
        self._pid = os.getpid()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro` on the loop thread and block until it finishes."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stop(self) -> None:
        """Cancel what still runs (a caller waiting on a call in flight gets its future
        cancelled instead of waiting forever), then stop and close the loop."""
        if self.loop.is_closed() or os.getpid() != self._pid:
            # In a forked child the thread is the parent's: nothing here would run the stop.
            return
        self.run(_cancel_pending())
        self.run(self.loop.shutdown_asyncgens())
        # Joined here, not left to `close` (which does not wait for them): the threads of
        # the loop's executor (a blocking pool closes on one) are gone when this returns.
        self.run(self.loop.shutdown_default_executor())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


async def _cancel_pending() -> None:
    current = asyncio.current_task()
    pending = [task for task in asyncio.all_tasks() if task is not current]
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
