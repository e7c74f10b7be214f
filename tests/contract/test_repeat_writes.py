"""Repeated pending writes through the saver: one rule on every backend and in both write
modes (LangGraph's: ordinary writes keep the first, special channels keep the last), and
on the in-memory fakes."""

from __future__ import annotations

from langgraph.checkpoint.base import empty_checkpoint

from state.checkpoint import TieredCheckpointSaver
from state.settings import WriteMode
from tests.contract.conftest import OpenBackends, every_configuration
from tests.support.records import unique_thread


@every_configuration
async def test_repeated_writes_keep_the_first_and_special_ones_the_last(
    any_backend: str,
    hot: bool,
    mode: WriteMode | None,
    open_tiers: OpenBackends,
) -> None:
    async with open_tiers(any_backend, hot=hot, mode=mode) as backends:
        saver = TieredCheckpointSaver.from_backends(backends)
        thread = unique_thread("repeat")
        checkpoint = empty_checkpoint()
        config = await saver.aput(
            {"configurable": {"thread_id": thread, "checkpoint_ns": ""}}, checkpoint, {}, {}
        )

        await saver.aput_writes(config, [("a", "first"), ("b", "kept")], "task-1")
        # A retried task: ordinary writes are ignored, the first ones stay.
        await saver.aput_writes(config, [("a", "retried")], "task-1")
        # Two interrupts of one task in one call: the last replaces the first.
        await saver.aput_writes(
            config, [("__interrupt__", "one"), ("__interrupt__", "two")], "task-2"
        )
        await saver.aflush(thread)

        for source in ("saver", "cold"):
            if source == "cold" and backends.hot_checkpoints is not None:
                await backends.hot_checkpoints.invalidate(thread)
            latest = await saver.aget_tuple({"configurable": {"thread_id": thread}})
            assert latest is not None
            assert sorted(latest.pending_writes or []) == [
                ("task-1", "a", "first"),
                ("task-1", "b", "kept"),
                ("task-2", "__interrupt__", "two"),
            ], source
