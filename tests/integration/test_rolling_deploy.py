"""A rolling deploy: workers of the old and the new code share Redis and the cold store.

For minutes both serve the same threads, so a turn may run on a new worker and the next
on an old one. Whatever either wrote, the other must read it or refuse it, never serve
an older state as the latest. The hot checkpoint entry is keyed by its format
(`cp{ENTRY_FORMAT}:`) while the write-behind log and the cold store are shared, so a bump
of the format must not leave each version serving its own, stale, entry.
"""

from __future__ import annotations

import pytest

from state.hot import redis_checkpoints
from tests.chat_graph import chat_graph
from tests.integration.test_write_behind import (
    COLD_BACKENDS,
    config,
    open_write_behind,
    settings_for,
)


# Known gap, not fixed yet: each format's scripts would have to drop the neighbouring
# formats' entries in the same atomic step (shipped one release before any bump).
@pytest.mark.xfail(
    strict=True, reason="the hot entry is keyed by its format: each version serves its own"
)
@pytest.mark.parametrize("backend", COLD_BACKENDS)
async def test_a_turn_taken_by_the_next_entry_format_is_seen_by_the_old_workers(
    backend: str, stack_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings_for(stack_env, backend, stack_env["REDIS_URL"])
    today = redis_checkpoints.ENTRY_FORMAT
    cfg = config()
    async with open_write_behind(settings) as old, open_write_behind(settings) as reader:
        await chat_graph(old.saver).ainvoke({"messages": ["turn 1"]}, cfg, durability="async")
        first = await old.saver.aget_tuple(cfg)
        assert first is not None

        # The next code, with the cache entry format bumped, takes the second turn.
        monkeypatch.setattr(redis_checkpoints, "ENTRY_FORMAT", today + 1)
        async with open_write_behind(settings) as new:
            await chat_graph(new.saver).ainvoke({"messages": ["turn 2"]}, cfg, durability="async")
            second = await new.saver.aget_tuple(cfg)
        assert second is not None
        monkeypatch.setattr(redis_checkpoints, "ENTRY_FORMAT", today)

        # Another old worker (no memo of its own) picks the thread up: its entry still
        # holds turn 1, which it must not serve as the latest (nor resume from).
        latest = await reader.saver.aget_tuple(cfg)
        assert latest is not None
        assert (
            latest.config["configurable"]["checkpoint_id"]
            == (second.config["configurable"]["checkpoint_id"])
        ), "an old worker served the checkpoint from before the new worker's turn"
        await reader.flusher.drain()
