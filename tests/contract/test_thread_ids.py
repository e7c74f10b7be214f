"""Thread ids the saver refuses: the same on every backend and in both write modes, and
refused before anything is acknowledged (write-behind would otherwise log a step that no
flush could store: Cosmos refuses a partition key value over 2 KB, the emulator does not)."""

from __future__ import annotations

import pytest
from langgraph.checkpoint.base import empty_checkpoint

from state import InvalidValue
from state.checkpoint import TieredCheckpointSaver
from state.checkpoint.saver import MAX_THREAD_ID_BYTES
from state.settings import WriteMode
from tests.contract.conftest import OpenBackends
from tests.support.records import unique_thread


@pytest.mark.parametrize(
    ("hot", "mode"),
    [(True, WriteMode.WRITE_THROUGH), (True, WriteMode.WRITE_BEHIND), (False, None)],
    ids=["redis-write-through", "redis-write-behind", "cold-only"],
)
async def test_a_thread_id_too_long_for_cosmos_is_refused_before_anything_is_stored(
    any_backend: str,
    hot: bool,
    mode: WriteMode | None,
    open_tiers: OpenBackends,
) -> None:
    async with open_tiers(any_backend, hot=hot, mode=mode) as backends:
        saver = TieredCheckpointSaver.from_backends(backends)
        base = unique_thread("long")
        # Multi-byte characters: the limit is in bytes, as Cosmos counts them.
        longest = base + "é" * ((MAX_THREAD_ID_BYTES - len(base)) // 2)
        too_long = longest + "ab"
        assert len(longest.encode()) <= MAX_THREAD_ID_BYTES < len(too_long.encode())

        stored = await saver.aput(
            {"configurable": {"thread_id": longest, "checkpoint_ns": ""}},
            empty_checkpoint(),
            {},
            {},
        )
        await saver.aput_writes(stored, [("a", 1)], "task")
        await saver.aflush(longest)
        found = await saver.aget_tuple(stored)
        assert found is not None and found.pending_writes == [("task", "a", 1)]

        with pytest.raises(InvalidValue, match="thread id"):
            await saver.aput(
                {"configurable": {"thread_id": too_long, "checkpoint_ns": ""}},
                empty_checkpoint(),
                {},
                {},
            )
        refused = {**stored["configurable"], "thread_id": too_long}
        with pytest.raises(InvalidValue, match="thread id"):
            await saver.aput_writes({"configurable": refused}, [("a", 1)], "task")
        await saver.aflush(too_long)
        assert await saver.aget_tuple({"configurable": refused}) is None
