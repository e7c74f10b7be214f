"""`TieredCheckpointSaver`'s routing between the hot cache, the write-behind log and the cold
store, over the in-memory fakes of the ports: which tier each call reaches, in each write
mode, with the hot tier up and down, in milliseconds.

The fakes keep the ports' contracts (tests/contract runs LangGraph's conformance suite on
them and on the real servers), so what these tests prove is the saver's own logic.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pytest
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import CheckpointTuple, empty_checkpoint

from state.checkpoint import TieredCheckpointSaver
from state.checkpoint.fencing import RecordFence
from state.checkpoint.flusher import Flusher
from state.checkpoint.saver import DURABILITY_KEY, FENCING_TOKEN_KEY
from state.errors import BackendUnavailable, ParentGone, StaleFencingToken
from tests.support.fakes import (
    MemoryCheckpointStore,
    MemoryColdStore,
    MemoryHotTier,
    unreachable,
)

THREAD = "case_8842"
LATEST: RunnableConfig = {"configurable": {"thread_id": THREAD, "checkpoint_ns": ""}}


@dataclass
class Tiers:
    """A saver over fakes; in write-behind mode its flusher is not started, so the test
    decides when entries reach the cold store."""

    write_behind: bool
    cold: MemoryColdStore = field(default_factory=MemoryColdStore)
    store: MemoryCheckpointStore = field(default_factory=MemoryCheckpointStore)
    hot: MemoryHotTier = field(default_factory=MemoryHotTier)

    def __post_init__(self) -> None:
        self.flusher = (
            Flusher(self.hot.log, self.store, lock_ttl_ms=5_000) if self.write_behind else None
        )
        self.saver = TieredCheckpointSaver(
            self.store,
            self.hot.cache,
            flusher=self.flusher,
            fence=self.hot.fence,
            record_fence=RecordFence(self.cold),
        )

    def cold_requests(self) -> Counter[str]:
        return Counter(self.store.requests)


class Run:
    """Checkpoints of one thread, step by step, as LangGraph puts them."""

    def __init__(self, saver: TieredCheckpointSaver, **configurable: Any) -> None:
        self.saver = saver
        self.config: RunnableConfig = {"configurable": {**LATEST["configurable"], **configurable}}
        self.values: dict[str, Any] = {}
        self.versions: dict[str, str | int | float] = {}

    async def step(self, **changed: Any) -> RunnableConfig:
        """Put a checkpoint whose step wrote `changed` (every other channel unchanged)."""
        new_versions: dict[str, str | int | float] = {}
        for channel, value in changed.items():
            self.values[channel] = value
            current = self.versions.get(channel)
            version = self.saver.get_next_version(None if current is None else str(current), None)
            self.versions[channel] = new_versions[channel] = version
        checkpoint = empty_checkpoint()
        checkpoint["channel_values"] = dict(self.values)
        checkpoint["channel_versions"] = dict(self.versions)
        saved = await self.saver.aput(self.config, checkpoint, {"source": "loop"}, new_versions)
        self.config = {"configurable": {**self.config["configurable"], **saved["configurable"]}}
        return saved


def values(found: CheckpointTuple | None) -> dict[str, Any]:
    assert found is not None
    return dict(found.checkpoint["channel_values"])


def messages(*texts: str) -> dict[str, list[str]]:
    """A value the saver stores as a blob (not inline)."""
    return {"messages": list(texts)}


@pytest.mark.parametrize("write_behind", [False, True], ids=["write-through", "write-behind"])
async def test_the_latest_checkpoint_is_read_from_the_cache_alone(write_behind: bool) -> None:
    tiers = Tiers(write_behind)
    run = Run(tiers.saver)
    await run.step(chat=messages("charged twice"), intent="billing")
    await run.step(chat=messages("charged twice", "refund?"))
    before = tiers.cold_requests()
    assert values(await tiers.saver.aget_tuple(LATEST)) == {
        "chat": messages("charged twice", "refund?"),
        "intent": "billing",
    }
    assert tiers.cold_requests() == before
    assert tiers.hot.cache.stats.hits == 1


async def test_a_cache_miss_reads_cold_once_and_fills_the_cache() -> None:
    tiers = Tiers(write_behind=False)
    await Run(tiers.saver).step(chat=messages("hello"))
    await tiers.hot.cache.invalidate(THREAD)
    first = await tiers.saver.aget_tuple(LATEST)
    assert tiers.store.requests["get_checkpoint"] == 1
    assert await tiers.saver.aget_tuple(LATEST) == first
    assert tiers.store.requests["get_checkpoint"] == 1


async def test_write_through_reaches_cold_before_returning_and_only_changed_values_are_sent() -> (
    None
):
    tiers = Tiers(write_behind=False)
    run = Run(tiers.saver)
    await run.step(chat=messages("a"), notes=messages("n"))
    await run.step(chat=messages("a", "b"))
    stored = await tiers.store.get_checkpoint(THREAD, "", None)
    assert (
        stored is not None and stored.checkpoint_id == run.config["configurable"]["checkpoint_id"]
    )
    blobs = await tiers.store.get_blobs(THREAD, "", stored.channel_versions)
    assert set(blobs) == {"chat", "notes"}  # the unchanged one from the step before
    assert tiers.store.requests["put_checkpoint"] == 2


async def test_a_cache_outage_fails_no_call_and_leaves_no_stale_entry() -> None:
    tiers = Tiers(write_behind=False)
    run = Run(tiers.saver)
    await run.step(chat=messages("v1"))
    assert values(await tiers.saver.aget_tuple(LATEST)) == {"chat": messages("v1")}
    with unreachable(tiers.hot.outage):
        await run.step(chat=messages("v2"))
        assert values(await tiers.saver.aget_tuple(LATEST)) == {"chat": messages("v2")}
    assert tiers.hot.cache.stats.errors >= 2
    # Back: the entry a failed call may have left at v1 is dropped on first contact.
    assert values(await tiers.saver.aget_tuple(LATEST)) == {"chat": messages("v2")}


async def test_write_behind_puts_touch_no_cold_store_until_a_flush() -> None:
    tiers = Tiers(write_behind=True)
    run = Run(tiers.saver)
    await run.step(chat=messages("a"))
    await run.step(chat=messages("a", "b"))
    config = run.config
    await tiers.saver.aput_writes(config, [("chat", messages("pending"))], "task-1")
    assert tiers.cold_requests() == Counter()
    assert (await tiers.hot.log.backlog()).entries == 3

    await tiers.saver.aflush(THREAD)
    assert tiers.cold_requests()["apply_batch"] == 1
    assert not await tiers.hot.log.pending(THREAD)
    stored = await tiers.store.get_checkpoint(THREAD, "", None)
    assert stored is not None and stored.checkpoint_id == config["configurable"]["checkpoint_id"]
    assert [w.task_id for w in await tiers.store.get_writes(THREAD, "", stored.checkpoint_id)] == [
        "task-1"
    ]


@pytest.mark.parametrize("boundary", ["interrupt", "error", "sync-durability"])
async def test_write_behind_boundaries_are_flushed_before_the_call_returns(boundary: str) -> None:
    tiers = Tiers(write_behind=True)
    durability = {DURABILITY_KEY: "sync"} if boundary == "sync-durability" else {}
    run = Run(tiers.saver, **durability)
    config = await run.step(chat=messages("refund over 500"))
    if boundary == "sync-durability":
        assert not await tiers.hot.log.pending(THREAD)
        return
    assert await tiers.hot.log.pending(THREAD)
    channel = "__interrupt__" if boundary == "interrupt" else "__error__"
    await tiers.saver.aput_writes(config, [(channel, "needs review")], "task-1")
    assert not await tiers.hot.log.pending(THREAD)
    stored = await tiers.store.get_writes(THREAD, "", config["configurable"]["checkpoint_id"])
    assert [w.channel for w in stored] == [channel]


@pytest.mark.parametrize("read", ["list", "by-id", "cache-miss"])
async def test_write_behind_reads_the_cold_tier_answers_flush_the_thread_first(read: str) -> None:
    tiers = Tiers(write_behind=True)
    run = Run(tiers.saver)
    first = await run.step(chat=messages("a"))
    await run.step(chat=messages("a", "b"))
    if read == "list":
        found = [item async for item in tiers.saver.alist(LATEST)]
        assert len(found) == 2
    elif read == "by-id":
        assert values(await tiers.saver.aget_tuple(first)) == {"chat": messages("a")}
    else:
        await tiers.hot.cache.invalidate(THREAD)
        assert values(await tiers.saver.aget_tuple(LATEST)) == {"chat": messages("a", "b")}
    assert not await tiers.hot.log.pending(THREAD)


async def test_write_behind_without_redis_writes_through_with_every_value() -> None:
    tiers = Tiers(write_behind=True)
    run = Run(tiers.saver)
    await run.step(chat=messages("a"), notes=messages("n"))  # only in the log
    with unreachable(tiers.hot.outage):
        config = await run.step(chat=messages("a", "b"))  # `notes` unchanged
        stored = await tiers.store.get_checkpoint(THREAD, "", None)
        assert stored is not None
        assert stored.checkpoint_id == config["configurable"]["checkpoint_id"]
        # It stands alone: the unchanged channel's value came with it, not from the log.
        blobs = await tiers.store.get_blobs(THREAD, "", stored.channel_versions)
        assert set(blobs) == {"chat", "notes"}
        await tiers.saver.aflush(THREAD)  # the newest state is durable: nothing to wait for
    assert await tiers.hot.log.pending(THREAD)  # the older step waits for Redis
    await tiers.saver.aflush(THREAD)
    assert not await tiers.hot.log.pending(THREAD)
    latest = await tiers.store.get_checkpoint(THREAD, "", None)
    assert latest is not None and latest.checkpoint_id == stored.checkpoint_id


async def test_after_a_write_through_fallback_the_latest_read_is_the_written_checkpoint() -> None:
    tiers = Tiers(write_behind=True)
    run = Run(tiers.saver)
    await run.step(chat=messages("a"))
    with unreachable(tiers.hot.outage):
        await run.step(chat=messages("a", "b"))
    assert values(await tiers.saver.aget_tuple(LATEST)) == {"chat": messages("a", "b")}


async def test_a_flush_refuses_to_vouch_for_state_that_lives_only_in_redis() -> None:
    tiers = Tiers(write_behind=True)
    await Run(tiers.saver).step(chat=messages("a"))
    with unreachable(tiers.hot.outage), pytest.raises(BackendUnavailable):
        await tiers.saver.aflush(THREAD)


@pytest.mark.parametrize("read_first", [True, False], ids=["head-read-again", "right-after"])
async def test_a_write_behind_fork_from_a_pruned_checkpoint_is_refused_and_logs_nothing(
    read_first: bool,
) -> None:
    """A fork from a checkpoint the prune took: with the head read again since, the log
    refuses a parent older than the cached head it does not hold (a fork); right after the
    prune (which dropped the cached head) it cannot tell the fork from a step past a lost
    one, but the cold tier can: its latest is newer than the parent, pruned, not lost with
    Redis. Either way `ParentGone`, as written through, nothing appended for the flusher to
    store onto a checkpoint that is gone, the thread not marked lost: it goes on."""
    tiers = Tiers(write_behind=True)
    run = Run(tiers.saver)
    first = await run.step(chat=messages("a"))
    await run.step(chat=messages("a", "b"))
    latest = await run.step(chat=messages("a", "b", "c"))
    await tiers.saver.aprune([THREAD])
    if read_first:
        assert values(await tiers.saver.aget_tuple(LATEST)) == {"chat": messages("a", "b", "c")}
    fork = Run(tiers.saver, checkpoint_id=first["configurable"]["checkpoint_id"])
    with pytest.raises(ParentGone):
        await fork.step(chat=messages("a", "fork"))
    assert not await tiers.hot.log.pending(THREAD)
    await tiers.saver.aflush(THREAD)
    stored = await tiers.store.get_checkpoint(THREAD, "", None)
    assert stored is not None
    assert stored.checkpoint_id == latest["configurable"]["checkpoint_id"]
    going_on = Run(tiers.saver, checkpoint_id=latest["configurable"]["checkpoint_id"])
    await going_on.step(chat=messages("a", "b", "c", "d"))
    await tiers.saver.aflush(THREAD)
    assert values(await tiers.saver.aget_tuple(LATEST)) == {"chat": messages("a", "b", "c", "d")}
    assert tiers.saver.losses_found == 0


@pytest.mark.parametrize("delete", ["adelete_thread", "aprune"])
async def test_a_write_behind_put_from_a_deleted_thread_is_refused_not_a_loss(delete: str) -> None:
    """With the whole thread deleted the cold tier holds nothing, as after Redis lost a
    thread never flushed; the log's mark of the deletion tells them apart: refused
    (`ParentGone`), nothing counted lost, and the thread starts afresh."""
    tiers = Tiers(write_behind=True)
    run = Run(tiers.saver)
    first = await run.step(chat=messages("a"))
    await run.step(chat=messages("a", "b"))
    if delete == "aprune":
        await tiers.saver.aprune([THREAD], strategy="delete")
    else:
        await tiers.saver.adelete_thread(THREAD)
    late = Run(tiers.saver, checkpoint_id=first["configurable"]["checkpoint_id"])
    with pytest.raises(ParentGone):
        await late.step(chat=messages("a", "late"))
    assert tiers.saver.losses_found == 0
    assert not await tiers.hot.log.pending(THREAD)
    assert await tiers.saver.aget_tuple(LATEST) is None
    afresh = Run(tiers.saver)
    await afresh.step(chat=messages("new"))
    await tiers.saver.aflush(THREAD)
    assert values(await tiers.saver.aget_tuple(LATEST)) == {"chat": messages("new")}


async def test_a_boundary_after_another_process_deleted_the_thread_finds_no_loss() -> None:
    """Another process deleted the thread (its backlog with it) under a run: the run's
    boundary finds its steps neither flushed nor cold, as after Redis lost them; the log's
    mark of the deletion says they were deleted. Not counted lost; its next put is refused."""
    tiers = Tiers(write_behind=True)
    run = Run(tiers.saver)
    await run.step(chat=messages("a"))
    await run.step(chat=messages("a", "b"))
    other = TieredCheckpointSaver(
        tiers.store, tiers.hot.cache, flusher=tiers.flusher, fence=tiers.hot.fence
    )
    await other.adelete_thread(THREAD)
    await tiers.saver.aflush(THREAD)
    assert tiers.saver.losses_found == 0
    with pytest.raises(ParentGone):
        await run.step(chat=messages("a", "b", "c"))
    assert tiers.saver.losses_found == 0


@pytest.mark.parametrize("write_behind", [False, True], ids=["write-through", "write-behind"])
@pytest.mark.parametrize("redis", ["up", "down"])
async def test_a_stale_fencing_token_is_refused_before_the_cold_tier(
    write_behind: bool, redis: str
) -> None:
    tiers = Tiers(write_behind)
    # The run that took the thread over raised the fence to 7 (Redis, and its record).
    await tiers.cold.create(THREAD, {"run": None}, agent_id="runner")
    await tiers.cold.update_section(
        THREAD, "run", "newer", expected_version=1, agent_id="runner", fencing_token=7
    )
    newer = Run(tiers.saver, **{FENCING_TOKEN_KEY: 7})
    kept = await newer.step(chat=messages("newer"))
    await tiers.saver.aflush(THREAD)
    zombie = Run(tiers.saver, **{FENCING_TOKEN_KEY: 3})
    with (
        unreachable(tiers.hot.outage) if redis == "down" else contextlib.nullcontext(),
        pytest.raises(StaleFencingToken),
    ):
        await zombie.step(chat=messages("late"))
    await tiers.saver.aflush(THREAD)
    latest = await tiers.store.get_checkpoint(THREAD, "", None)
    assert latest is not None and latest.checkpoint_id == kept["configurable"]["checkpoint_id"]
    assert values(await tiers.saver.aget_tuple(LATEST)) == {"chat": messages("newer")}


async def test_deleting_a_thread_drops_its_unflushed_backlog_for_good() -> None:
    tiers = Tiers(write_behind=True)
    await Run(tiers.saver).step(chat=messages("a"))
    await tiers.saver.adelete_thread(THREAD)
    assert tiers.flusher is not None
    assert await tiers.flusher.drain() == 0
    assert await tiers.store.get_checkpoint(THREAD, "", None) is None
    assert await tiers.saver.aget_tuple(LATEST) is None
