"""delete_for_runs through the saver with the hot tier in front: the cache drops exactly
what the store deleted, learnt from the delete itself (no read of whole checkpoints); on
every backend and on the in-memory fakes."""

from __future__ import annotations

from typing import Any

import pytest
from langgraph.checkpoint.base import empty_checkpoint

from state.checkpoint import TieredCheckpointSaver
from state.settings import WriteMode
from tests.contract.conftest import OpenBackends
from tests.support.records import unique_thread


@pytest.mark.parametrize("mode", [WriteMode.WRITE_THROUGH, WriteMode.WRITE_BEHIND])
async def test_delete_for_runs_invalidates_the_cache_without_reading_checkpoints(
    any_backend: str,
    mode: WriteMode,
    open_tiers: OpenBackends,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with open_tiers(any_backend, mode=mode) as backends:
        saver = TieredCheckpointSaver.from_backends(backends)
        doomed, kept = unique_thread("runs"), unique_thread("runs")
        for thread, run_id in ((doomed, "run-doomed"), (kept, "run-kept")):
            await saver.aput(
                {"configurable": {"thread_id": thread, "checkpoint_ns": ""}},
                empty_checkpoint(),
                {"run_id": run_id},  # type: ignore[typeddict-item]
                {},
            )
        # Warm: both latest checkpoints are in the hot tier.
        for thread in (doomed, kept):
            assert await saver.aget_tuple({"configurable": {"thread_id": thread}}) is not None

        async def no_listing(*args: Any, **kwargs: Any) -> Any:
            raise AssertionError("delete_for_runs read whole checkpoints to find threads")

        monkeypatch.setattr(saver.store, "list_checkpoints", no_listing)
        await saver.adelete_for_runs(["run-doomed"])
        monkeypatch.undo()

        assert await saver.aget_tuple({"configurable": {"thread_id": doomed}}) is None
        assert await saver.aget_tuple({"configurable": {"thread_id": kept}}) is not None
