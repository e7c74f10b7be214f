"""delete_for_runs through the saver with the hot tier in front: the cache drops exactly
what the store deleted, learnt from the delete itself (no read of whole checkpoints); on
every backend and on the in-memory fakes."""

from __future__ import annotations

from typing import Any

import pytest
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import empty_checkpoint

from state.checkpoint import TieredCheckpointSaver
from state.errors import ParentGone
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

        listing = saver.store.list_checkpoints

        def no_listing(*args: Any, **kwargs: Any) -> Any:
            # A thread's own listing (whether a run's step is its latest) is no search.
            if kwargs.get("thread_id") is None:
                raise AssertionError("delete_for_runs read whole checkpoints to find threads")
            return listing(*args, **kwargs)

        monkeypatch.setattr(saver.store, "list_checkpoints", no_listing)
        await saver.adelete_for_runs(["run-doomed"])
        monkeypatch.undo()

        assert await saver.aget_tuple({"configurable": {"thread_id": doomed}}) is None
        assert await saver.aget_tuple({"configurable": {"thread_id": kept}}) is not None


async def kept_then_doomed_step(
    saver: TieredCheckpointSaver,
) -> tuple[RunnableConfig, RunnableConfig, RunnableConfig]:
    """A thread's step of a run that stays, then one of a run about to be deleted: the
    thread's config, the kept step's and the doomed step's."""
    latest: RunnableConfig = {
        "configurable": {"thread_id": unique_thread("late-run"), "checkpoint_ns": ""}
    }
    before = await saver.aput(latest, empty_checkpoint(), {"run_id": "run-kept"}, {})
    doomed = await saver.aput(before, empty_checkpoint(), {"run_id": "run-doomed"}, {})
    return latest, before, doomed


async def assert_latest(
    reader: TieredCheckpointSaver, latest: RunnableConfig, expected: RunnableConfig
) -> None:
    found = await reader.aget_tuple(latest)
    assert found is not None
    assert (
        found.config["configurable"]["checkpoint_id"] == expected["configurable"]["checkpoint_id"]
    ), found.metadata


async def test_a_write_through_step_of_a_deleted_run_never_becomes_the_latest(
    cold_backend: str, open_tiers: OpenBackends
) -> None:
    """A run still writing after `delete_for_runs` deleted it: its next step goes on from a
    checkpoint that is gone. Written through, it must not become the thread's latest (a
    deleted run back, on a parent the thread no longer has): the step is refused with
    `ParentGone`, and the thread stays at the checkpoint it had before the run."""
    async with open_tiers(cold_backend, mode=WriteMode.WRITE_THROUGH) as backends:
        saver = TieredCheckpointSaver.from_backends(backends)
        latest, before, doomed = await kept_then_doomed_step(saver)
        await saver.adelete_for_runs(["run-doomed"])
        # Refused, and told: the run learns it was deleted.
        with pytest.raises(ParentGone):
            await saver.aput(doomed, empty_checkpoint(), {"run_id": "run-doomed"}, {})
        for reader in (saver, TieredCheckpointSaver(saver.store)):
            await assert_latest(reader, latest, before)


async def test_a_write_through_step_of_a_run_another_process_deleted_is_refused(
    cold_backend: str, open_tiers: OpenBackends
) -> None:
    """As above, `delete_for_runs` called by another process: the late run's own tiers
    still remember its last step (Cosmos packs the next one against it without reading
    it again), and its next step is refused all the same."""
    async with (
        open_tiers(cold_backend, mode=WriteMode.WRITE_THROUGH) as running,
        open_tiers(cold_backend, mode=WriteMode.WRITE_THROUGH) as other,
    ):
        saver = TieredCheckpointSaver.from_backends(running)
        latest, before, doomed = await kept_then_doomed_step(saver)
        await TieredCheckpointSaver.from_backends(other).adelete_for_runs(["run-doomed"])
        with pytest.raises(ParentGone):
            await saver.aput(doomed, empty_checkpoint(), {"run_id": "run-doomed"}, {})
        await assert_latest(TieredCheckpointSaver(other.checkpoints), latest, before)


async def test_a_write_through_step_is_refused_while_the_deleting_process_drops_its_cache(
    cold_backend: str, open_tiers: OpenBackends
) -> None:
    """Another process's `delete_for_runs` between its cold delete and its drop of the
    shared hot copy (one Redis round trip later; for good when Redis failed in between):
    the hot head is still the deleted run's last step, which must not vouch for it."""
    async with (
        open_tiers(cold_backend, mode=WriteMode.WRITE_THROUGH) as running,
        open_tiers(cold_backend, mode=WriteMode.WRITE_THROUGH) as other,
    ):
        saver = TieredCheckpointSaver.from_backends(running)
        latest, before, doomed = await kept_then_doomed_step(saver)
        # The other process's cold delete, its cache drop not done yet.
        await other.checkpoints.delete_for_runs(["run-doomed"])
        with pytest.raises(ParentGone):
            await saver.aput(doomed, empty_checkpoint(), {"run_id": "run-doomed"}, {})
        # The other process's drop, done.
        assert other.hot_checkpoints is not None
        await other.hot_checkpoints.invalidate(latest["configurable"]["thread_id"], strict=True)
        for reader in (saver, TieredCheckpointSaver(other.checkpoints)):
            await assert_latest(reader, latest, before)


async def test_a_write_through_step_goes_on_from_a_step_only_the_write_behind_log_holds(
    cold_backend: str, open_tiers: OpenBackends
) -> None:
    """A write-behind process's step, its flush not done yet: a write-through process goes
    on from it (the hot head is its parent and the log holds it), never `ParentGone`."""
    async with (
        open_tiers(cold_backend, mode=WriteMode.WRITE_BEHIND) as behind,
        open_tiers(cold_backend, mode=WriteMode.WRITE_THROUGH) as through,
    ):
        assert behind.flusher is not None
        await behind.flusher.stop()  # the step stays in the log alone
        thread = unique_thread("mixed")
        latest = {"configurable": {"thread_id": thread, "checkpoint_ns": ""}}
        meta: Any = {"run_id": "run-mixed"}
        writer = TieredCheckpointSaver.from_backends(behind)
        first = await writer.aput(latest, empty_checkpoint(), meta, {})
        second = await writer.aput(first, empty_checkpoint(), meta, {})
        assert await behind.flusher.log.pending(thread)
        stored = await TieredCheckpointSaver.from_backends(through).aput(
            second, empty_checkpoint(), meta, {}
        )
        found = await TieredCheckpointSaver(through.checkpoints).aget_tuple(stored)
        assert found is not None


@pytest.mark.parametrize("deletion", ["delete_thread", "prune_delete", "delete_for_runs"])
async def test_a_write_through_first_step_stored_just_before_a_deletion_is_not_cached(
    any_backend: str,
    open_tiers: OpenBackends,
    deletion: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A new thread's first put, stored cold just before another caller deletes the thread,
    reaches the hot tier after the deletion dropped its entry. A root needs no parent in the
    entry, so it was installed there: the hot tier served a checkpoint the cold tier no
    longer has, and the thread's next run went on from it, refused (`ParentGone`)."""
    async with open_tiers(any_backend, mode=WriteMode.WRITE_THROUGH) as backends:
        saver = TieredCheckpointSaver.from_backends(backends)
        deleter = TieredCheckpointSaver.from_backends(backends)
        thread_id = unique_thread("root-race")
        latest: RunnableConfig = {"configurable": {"thread_id": thread_id, "checkpoint_ns": ""}}
        store_put = saver.store.put_checkpoint

        async def stored_then_deleted(*args: Any, **kwargs: Any) -> None:
            await store_put(*args, **kwargs)
            if deletion == "delete_thread":
                await deleter.adelete_thread(thread_id)
            elif deletion == "prune_delete":
                await deleter.aprune([thread_id], strategy="delete")
            else:
                await deleter.adelete_for_runs(["run-doomed"])

        monkeypatch.setattr(saver.store, "put_checkpoint", stored_then_deleted)
        await saver.aput(latest, empty_checkpoint(), {"run_id": "run-doomed"}, {})
        monkeypatch.undo()

        for reader in (saver, deleter, TieredCheckpointSaver(saver.store)):
            assert await reader.aget_tuple(latest) is None
        # The thread's next run starts it afresh, and is cached as it goes.
        root = await saver.aput(latest, empty_checkpoint(), {"run_id": "run-next"}, {})
        step = await saver.aput(root, empty_checkpoint(), {"run_id": "run-next"}, {})
        assert backends.hot_checkpoints is not None
        cached = await backends.hot_checkpoints.lookup(thread_id, "", lease=False)
        assert cached.checkpoint is not None
        assert cached.checkpoint.checkpoint_id == step["configurable"]["checkpoint_id"]
        await assert_latest(saver, latest, step)


@pytest.mark.parametrize("mode", [WriteMode.WRITE_THROUGH, WriteMode.WRITE_BEHIND])
async def test_delete_for_runs_refuses_a_str_rather_than_deleting_its_characters(
    any_backend: str, open_tiers: OpenBackends, mode: WriteMode
) -> None:
    """A run id passed alone is a str, a sequence of one-character run ids: taken as such,
    it deleted the runs so named and left the run meant. Refused, as `prune` refuses one."""
    async with open_tiers(any_backend, mode=mode) as backends:
        saver = TieredCheckpointSaver.from_backends(backends)
        latest: RunnableConfig = {
            "configurable": {"thread_id": unique_thread("str-runs"), "checkpoint_ns": ""}
        }
        first = await saver.aput(latest, empty_checkpoint(), {"run_id": "r"}, {})
        await saver.aput(first, empty_checkpoint(), {"run_id": "run-x"}, {})
        with pytest.raises(TypeError):
            await saver.adelete_for_runs("run-x")  # type: ignore[arg-type]
        runs = [found.metadata.get("run_id") async for found in saver.alist(latest)]
        assert runs == ["run-x", "r"]


async def test_a_write_through_subgraph_first_step_stored_just_before_a_deletion_is_not_cached(
    any_backend: str, open_tiers: OpenBackends, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As a thread's first put, a subgraph's (its namespace's first checkpoint, no parent)
    stored cold just before another caller deletes the thread reaches the hot tier after the
    deletion dropped the namespace's entry: installed there, it was served though the cold
    tier no longer has it."""
    async with open_tiers(any_backend, mode=WriteMode.WRITE_THROUGH) as backends:
        saver = TieredCheckpointSaver.from_backends(backends)
        deleter = TieredCheckpointSaver.from_backends(backends)
        thread_id = unique_thread("sub-race")
        root: RunnableConfig = {"configurable": {"thread_id": thread_id, "checkpoint_ns": ""}}
        child: RunnableConfig = {
            "configurable": {"thread_id": thread_id, "checkpoint_ns": "child:1"}
        }
        await saver.aput(root, empty_checkpoint(), {"run_id": "run-doomed"}, {})
        store_put = saver.store.put_checkpoint

        async def stored_then_deleted(*args: Any, **kwargs: Any) -> None:
            await store_put(*args, **kwargs)
            await deleter.adelete_thread(thread_id)

        monkeypatch.setattr(saver.store, "put_checkpoint", stored_then_deleted)
        await saver.aput(child, empty_checkpoint(), {"run_id": "run-doomed"}, {})
        monkeypatch.undo()

        for reader in (saver, deleter, TieredCheckpointSaver(saver.store)):
            assert await reader.aget_tuple(child) is None
            assert await reader.aget_tuple(root) is None
        # The thread's next run, and its subgraph, are cached as they go.
        await saver.aput(root, empty_checkpoint(), {"run_id": "run-next"}, {})
        first = await saver.aput(child, empty_checkpoint(), {"run_id": "run-next"}, {})
        step = await saver.aput(first, empty_checkpoint(), {"run_id": "run-next"}, {})
        assert backends.hot_checkpoints is not None
        cached = await backends.hot_checkpoints.lookup(thread_id, "child:1", lease=False)
        assert cached.checkpoint is not None
        assert cached.checkpoint.checkpoint_id == step["configurable"]["checkpoint_id"]
        await assert_latest(saver, child, step)


async def test_a_subgraph_first_step_stored_before_a_deletion_is_not_cached_after_the_next_run(
    any_backend: str, open_tiers: OpenBackends, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As above, but the thread's next run puts its root before the late subgraph step
    reaches the hot tier. That root is cached, dropping the deletion's mark on the root
    entry (`seen`), which held back the late step: it was then cached and served though the
    cold tier no longer has it."""
    async with open_tiers(any_backend, mode=WriteMode.WRITE_THROUGH) as backends:
        saver = TieredCheckpointSaver.from_backends(backends)
        deleter = TieredCheckpointSaver.from_backends(backends)
        thread_id = unique_thread("sub-race")
        root: RunnableConfig = {"configurable": {"thread_id": thread_id, "checkpoint_ns": ""}}
        child: RunnableConfig = {
            "configurable": {"thread_id": thread_id, "checkpoint_ns": "child:1"}
        }
        await saver.aput(root, empty_checkpoint(), {"run_id": "run-doomed"}, {})
        store_put = saver.store.put_checkpoint

        async def stored_then_deleted_and_run_again(*args: Any, **kwargs: Any) -> None:
            await store_put(*args, **kwargs)
            monkeypatch.undo()  # the next run's put is stored as usual
            await deleter.adelete_thread(thread_id)
            await deleter.aput(root, empty_checkpoint(), {"run_id": "run-next"}, {})

        monkeypatch.setattr(saver.store, "put_checkpoint", stored_then_deleted_and_run_again)
        await saver.aput(child, empty_checkpoint(), {"run_id": "run-doomed"}, {})

        assert await TieredCheckpointSaver(saver.store).aget_tuple(child) is None
        for reader in (saver, deleter):
            assert await reader.aget_tuple(child) is None
