"""DeltaChannel-safe maintenance on every backend and mode: after `prune(keep_latest)`,
`copy_thread` and `delete_for_runs`, every checkpoint that remains rebuilds the same
DeltaChannel state as LangGraph's InMemorySaver at the same step (before this, a
keep_latest prune of a 60-message DeltaChannel thread left 0 messages)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import psycopg
import pytest
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import empty_checkpoint
from langgraph.checkpoint.memory import InMemorySaver

from state.cold.postgres_checkpoints import (
    DELETE_RUN_CHECKPOINTS_SQL,
    LOCK_THREADS_SQL,
    THREAD_MAINTENANCE_LOCK,
)
from state.errors import ParentGone
from state.settings import ColdBackend, Settings
from tests.integration.delta_graph import (
    STACK_IDS,
    STACKS,
    delta_graph,
    open_stack,
    settings_for,
    thread_config,
)
from tests.support.cosmos import drop_container, partition_of

INVOKES = 21  # 63 messages (the issue saw 60), the latest checkpoint no snapshot


async def by_step(graph: Any, config: RunnableConfig) -> dict[int, list[str]]:
    """Messages rebuilt at every checkpoint of the thread (read by id), by step."""
    found: dict[int, list[str]] = {}
    async for snapshot in graph.aget_state_history(config):
        at = await graph.aget_state(snapshot.config)
        found[at.metadata["step"]] = at.values.get("messages", [])
    return found


async def run_both(
    graph: Any, reference: Any, cfg: RunnableConfig, ref_cfg: RunnableConfig, invokes: range
) -> list[str]:
    """The same invokes on both graphs, each its own run; returns the run ids."""
    runs = []
    for n in invokes:
        run_id = str(uuid.uuid4())
        runs.append(run_id)
        # The checkpoints' metadata carries the run id (LangGraph copies `configurable`).
        run_cfg: RunnableConfig = {"configurable": {**cfg["configurable"], "run_id": run_id}}
        got = await graph.ainvoke({"messages": [f"user {n}"]}, run_cfg)
        assert got == await reference.ainvoke({"messages": [f"user {n}"]}, ref_cfg)
    return runs


@pytest.mark.parametrize(("backend", "redis", "mode"), STACKS, ids=STACK_IDS)
async def test_prune_keep_latest_and_copy_keep_the_delta_chain(
    backend: str, redis: bool, mode: str, stack_env: dict[str, str]
) -> None:
    settings = settings_for(stack_env, backend, redis, mode)
    reference = delta_graph(InMemorySaver())
    ref_cfg = thread_config("ref")
    async with open_stack(settings) as opened:
        saver = opened.saver
        graph = delta_graph(saver)
        cfg = thread_config()
        thread_id = cfg["configurable"]["thread_id"]
        await run_both(graph, reference, cfg, ref_cfg, range(INVOKES))
        want = (await reference.aget_state(ref_cfg)).values
        assert len(want["messages"]) == 3 * INVOKES
        expected = await by_step(reference, ref_cfg)

        await saver.aprune([thread_id], strategy="keep_latest")
        assert (await graph.aget_state(cfg)).values == want
        kept = await by_step(graph, cfg)
        # Not everything stays (only the chain back to the nearest snapshot), and every
        # checkpoint that stays rebuilds the state it had.
        assert 1 < len(kept) < len(expected) / 3
        assert all(kept[step] == expected[step] for step in kept)

        copy_cfg = thread_config("copy")
        await saver.acopy_thread(thread_id, copy_cfg["configurable"]["thread_id"])
        assert (await graph.aget_state(copy_cfg)).values == want
        assert await by_step(graph, copy_cfg) == kept

        # Both threads go on from there like the reference.
        ref_copy_cfg = thread_config("ref-copy")
        await reference.aupdate_state(ref_copy_cfg, want)  # a reference twin of the copy
        for n in range(INVOKES, INVOKES + 6):
            got = await graph.ainvoke({"messages": [f"user {n}"]}, cfg)
            copied = await graph.ainvoke({"messages": [f"user {n}"]}, copy_cfg)
            ref = await reference.ainvoke({"messages": [f"user {n}"]}, ref_cfg)
            assert got == ref
            assert copied == ref


@pytest.mark.parametrize(("backend", "redis", "mode"), STACKS, ids=STACK_IDS)
async def test_delete_for_runs_never_strands_a_surviving_checkpoint(
    backend: str, redis: bool, mode: str, stack_env: dict[str, str]
) -> None:
    settings = settings_for(stack_env, backend, redis, mode)
    reference = delta_graph(InMemorySaver())
    ref_cfg = thread_config("ref")
    async with open_stack(settings) as opened:
        saver = opened.saver
        graph = delta_graph(saver)
        cfg = thread_config()
        runs = await run_both(graph, reference, cfg, ref_cfg, range(INVOKES))
        latest = await saver.aget_tuple(cfg)
        assert latest is not None and latest.metadata.get("run_id") == runs[-1]
        expected = await by_step(reference, ref_cfg)

        # A run in the middle: the later runs' checkpoints rebuild from its writes.
        await saver.adelete_for_runs([runs[INVOKES // 2]])
        survivors = await by_step(graph, cfg)
        assert max(survivors) == max(expected)
        assert all(survivors[step] == expected[step] for step in survivors)

        # The latest run (a rollback): the thread is back where the run before left it.
        await saver.adelete_for_runs([runs[-1]])
        survivors = await by_step(graph, cfg)
        assert all(survivors[step] == expected[step] for step in survivors)
        assert max(survivors) < max(expected)
        state = await graph.aget_state(cfg)
        assert state.values["messages"] == expected[max(survivors)]
        assert len(state.values["messages"]) == 3 * (INVOKES - 1)


# --------------------------------------------------------------------------- retention

MESSAGE = "m" * 1024
NO_SNAPSHOT = 50  # no snapshot in these runs: a thread's history is its whole chain


def grown(messages: list[str], text: str) -> list[str]:
    """What an invoke sending `text` leaves (the delta graph's node answers twice)."""
    sent = [*messages, text]
    return [*sent, f"a{len(sent)}:{MESSAGE}", f"b{len(sent)}:{MESSAGE}"]


@pytest.fixture
async def swept_settings(
    request: pytest.FixtureRequest, stack_env: dict[str, str]
) -> AsyncIterator[Callable[[str, str], Settings]]:
    """Settings with a 60 s cold TTL, on a store of the test's own (a sweep is global)."""
    made: list[Settings] = []

    def settings(backend: str, mode: str) -> Settings:
        extra: dict[str, Any] = {"state_cold_ttl_seconds": 60}
        if backend == "postgres":
            extra["postgres_url"] = request.getfixturevalue("fresh_postgres_url")
        else:
            extra["cosmos_container"] = f"swept-{uuid.uuid4().hex[:8]}"
        made.append(settings_for(stack_env, backend, True, mode, **extra))
        return made[-1]

    yield settings
    for each in made:
        if each.state_cold_backend is ColdBackend.COSMOS:
            await drop_container(each)


async def cold_messages(settings: Settings, config: RunnableConfig) -> list[str]:
    """The thread's latest messages as a process without Redis rebuilds them."""
    cold_only = Settings.model_validate(
        {**settings.model_dump(), "redis_url": None, "state_write_mode": "write-through"}
    )
    async with open_stack(cold_only) as opened:
        state = await delta_graph(opened.saver, snapshot_frequency=NO_SNAPSHOT).aget_state(config)
        return list(state.values.get("messages", []))


@pytest.mark.parametrize("mode", ["write-through", "write-behind"])
@pytest.mark.parametrize("backend", ["postgres", "cosmos"])
async def test_a_thread_the_sweep_expired_starts_over_in_both_tiers(
    backend: str, mode: str, swept_settings: Callable[[str, str], Settings]
) -> None:
    """Redis forgets a thread the cold sweep deleted: the next run starts from nothing,
    instead of continuing from a hot copy onto ancestors the sweep deleted (the caller was
    told 18 messages, the cold tier rebuilt 3)."""
    settings = swept_settings(backend, mode)
    async with open_stack(settings) as opened:
        graph = delta_graph(opened.saver, snapshot_frequency=NO_SNAPSHOT)
        config = thread_config("swept")
        thread_id = config["configurable"]["thread_id"]
        for n in range(5):
            await graph.ainvoke({"messages": [f"user {n}"]}, config)
        await opened.saver.aflush(thread_id)
        assert await opened.backends.retention.sweep(limit=10, now=time.time() + 600) == 1
        answered = await graph.ainvoke({"messages": ["user 5"]}, config)
        await opened.saver.aflush(thread_id)
    assert answered["messages"] == grown([], "user 5")
    assert await cold_messages(settings, config) == answered["messages"]


@pytest.mark.parametrize("backend", ["postgres", "cosmos"])
async def test_a_put_from_a_thread_the_sweep_expired_is_refused_not_lost(
    backend: str, swept_settings: Callable[[str, str], Settings]
) -> None:
    """Write-behind: a put from one of the swept thread's checkpoints (a client going on
    from an old config) finds nothing of it in either tier, as after Redis lost a thread
    never flushed; Redis's mark of the deletion says it was deleted: refused (`ParentGone`),
    not reported lost."""
    settings = swept_settings(backend, "write-behind")
    async with open_stack(settings) as opened:
        graph = delta_graph(opened.saver, snapshot_frequency=NO_SNAPSHOT)
        config = thread_config("swept-late")
        thread_id = config["configurable"]["thread_id"]
        await graph.ainvoke({"messages": ["user 0"]}, config)
        older = (await graph.aget_state(config)).config
        await opened.saver.aflush(thread_id)
        assert await opened.backends.retention.sweep(limit=10, now=time.time() + 600) == 1
        with pytest.raises(ParentGone):
            await opened.saver.aput(older, empty_checkpoint(), {"source": "update"}, {})
        assert opened.saver.losses_found == 0


@pytest.mark.parametrize("backend", ["postgres", "cosmos"])
async def test_a_backlog_in_the_log_spares_the_expired_thread(
    backend: str, swept_settings: Callable[[str, str], Settings]
) -> None:
    """A thread whose cold state expired but whose last steps are acknowledged and still in
    the write-behind log is in use: the sweep spares it (deleted, the run would lose those
    steps), and the backlog is flushed onto it whole."""
    settings = swept_settings(backend, "write-behind")
    async with open_stack(settings) as opened:
        graph = delta_graph(opened.saver, snapshot_frequency=NO_SNAPSHOT)
        config = thread_config("swept-backlog")
        thread_id = config["configurable"]["thread_id"]
        for n in range(5):
            await graph.ainvoke({"messages": [f"user {n}"]}, config)
            if n == 3:
                await opened.saver.aflush(thread_id)
        told = (await graph.aget_state(config)).values["messages"]
        # The last invoke's entries are acknowledged, still in the write-behind log.
        assert await opened.backends.retention.sweep(limit=10, now=time.time() + 600) == 0
        await opened.saver.aflush(thread_id)
    assert await cold_messages(settings, config) == told


@pytest.mark.parametrize(("backend", "redis", "mode"), STACKS, ids=STACK_IDS)
async def test_a_deleted_run_kept_for_a_later_runs_history_goes_with_that_run(
    backend: str, redis: bool, mode: str, stack_env: dict[str, str]
) -> None:
    """delete_for_runs spares a deleted run's checkpoints while a later run's DeltaChannel
    history runs through them; once that later run is deleted too, they go with it, and
    the thread's state is the run before the deleted one (it was the deleted run's)."""
    async with open_stack(settings_for(stack_env, backend, redis, mode)) as opened:
        graph = delta_graph(opened.saver, snapshot_frequency=NO_SNAPSHOT)
        config = thread_config("spared")
        runs: list[str] = []
        states: list[list[str]] = []
        for n in range(6):
            runs.append(str(uuid.uuid4()))
            run_config: RunnableConfig = {
                "configurable": {**config["configurable"], "run_id": runs[-1]}
            }
            await graph.ainvoke({"messages": [f"user {n}"]}, run_config)
            states.append(grown(states[-1] if states else [], f"user {n}"))
        await opened.saver.adelete_for_runs([runs[3]])
        assert (await graph.aget_state(config)).values["messages"] == states[5]
        await opened.saver.adelete_for_runs([runs[5]])
        assert (await graph.aget_state(config)).values["messages"] == states[4]
        await opened.saver.adelete_for_runs([runs[4]])
        left = {runs.index(s.metadata["run_id"]) async for s in graph.aget_state_history(config)}
        assert left == {0, 1, 2}
        assert (await graph.aget_state(config)).values["messages"] == states[2]


async def six_runs(graph: Any, config: RunnableConfig) -> list[str]:
    runs: list[str] = []
    for n in range(6):
        runs.append(str(uuid.uuid4()))
        run_config: RunnableConfig = {
            "configurable": {**config["configurable"], "run_id": runs[-1]}
        }
        await graph.ainvoke({"messages": [f"user {n}"]}, run_config)
    return runs


@pytest.mark.parametrize("meanwhile", ["delete_thread", "retention_sweep"])
async def test_cosmos_marking_a_spared_checkpoint_never_brings_a_deleted_thread_back(
    meanwhile: str, swept_settings: Callable[[str, str], Settings]
) -> None:
    """The thread deleted (by a user, or by retention) between delete_for_runs' read of
    its checkpoints and its marking of the spared ones: the marks land on nothing."""
    settings = swept_settings("cosmos", "write-through")
    async with open_stack(settings) as opened:
        saver, backends = opened.saver, opened.backends
        graph = delta_graph(saver, snapshot_frequency=NO_SNAPSHOT)
        config = thread_config("spared-race")
        thread_id = config["configurable"]["thread_id"]
        runs = await six_runs(graph, config)
        io = backends.checkpoints._maintenance._io  # type: ignore[attr-defined]
        patch = io.patch
        raced: list[str] = []

        async def racing(doc_id: str, partition: str, operations: Any, **options: Any) -> bool:
            if operations[0]["path"] == "/spared" and not raced:
                raced.append(doc_id)
                if meanwhile == "delete_thread":
                    await saver.adelete_thread(thread_id)
                else:
                    assert await backends.retention.sweep(limit=10, now=time.time() + 600) == 1
            return bool(await patch(doc_id, partition, operations, **options))

        io.patch = racing
        await saver.adelete_for_runs([runs[3]])
        io.patch = patch
        assert raced
        assert await partition_of(settings, thread_id) == []
        assert await saver.aget_tuple(config) is None


async def test_postgres_two_delete_for_runs_of_one_thread_take_turns(
    stack_env: dict[str, str], fresh_postgres_url: str
) -> None:
    """Runs 4 and 5 deleted by two calls at once: the second waits for the first (which
    spares run 4 for run 5), then deletes run 5 and run 4 with it. Had it worked from a
    snapshot taken before the first committed, run 4 would stay, the thread's latest."""
    settings = settings_for(
        stack_env, "postgres", False, "write-through", postgres_url=fresh_postgres_url
    )
    async with open_stack(settings) as opened:
        graph = delta_graph(opened.saver, snapshot_frequency=NO_SNAPSHOT)
        config = thread_config("spared-concurrent")
        runs = await six_runs(graph, config)
        states: list[list[str]] = []
        for n in range(6):
            states.append(grown(states[-1] if states else [], f"user {n}"))
        async with await psycopg.AsyncConnection.connect(fresh_postgres_url) as first:
            # delete_for_runs([run 4]) in flight: its statements ran, not yet committed.
            run_4 = {"run_ids": [runs[4]], "thread_ids": [config["configurable"]["thread_id"]]}
            await first.execute(LOCK_THREADS_SQL, {**run_4, "lock": THREAD_MAINTENANCE_LOCK})
            await first.execute(DELETE_RUN_CHECKPOINTS_SQL, run_4)
            second = asyncio.ensure_future(opened.saver.adelete_for_runs([runs[5]]))
            await asyncio.sleep(0.5)
            assert not second.done()  # waiting for the first
            await first.commit()
            await second
        left = {runs.index(s.metadata["run_id"]) async for s in graph.aget_state_history(config)}
        assert left == {0, 1, 2, 3}
        assert (await graph.aget_state(config)).values["messages"] == states[3]


@pytest.mark.parametrize(("backend", "redis", "mode"), STACKS, ids=STACK_IDS)
async def test_a_deleted_run_kept_for_a_later_runs_history_is_not_listed(
    backend: str, redis: bool, mode: str, stack_env: dict[str, str]
) -> None:
    """The checkpoints of a deleted run that delete_for_runs keeps for a later run's
    DeltaChannel history are the deleted run's: the thread's history does not list them
    (listed, a fork from one was refused with `ParentGone`), and a fork from any checkpoint
    it lists goes on from that checkpoint's state."""
    async with open_stack(settings_for(stack_env, backend, redis, mode)) as opened:
        graph = delta_graph(opened.saver, snapshot_frequency=NO_SNAPSHOT)
        config = thread_config("spared-listed")
        runs = await six_runs(graph, config)
        await opened.saver.adelete_for_runs([runs[3]])
        listed = [s async for s in graph.aget_state_history(config)]
        assert {runs.index(s.metadata["run_id"]) for s in listed} == {0, 1, 2, 4, 5}
        for n, past in enumerate(listed):
            forked = await graph.aupdate_state(past.config, {"messages": [f"fork {n}"]})
            state = await graph.aget_state(forked)
            assert state.values["messages"] == [*past.values["messages"], f"fork {n}"]


@pytest.mark.parametrize(("backend", "redis", "mode"), STACKS, ids=STACK_IDS)
async def test_a_deleted_run_kept_for_a_later_runs_history_is_not_read_by_id(
    backend: str, redis: bool, mode: str, stack_env: dict[str, str]
) -> None:
    """A checkpoint delete_for_runs keeps only for a later run's DeltaChannel history is
    deleted to the caller named by its id too (`get_tuple` / `aget_tuple`, `list` of that
    id), as LangGraph's savers answer for a deleted checkpoint: served, a fork from it was
    refused with `ParentGone`. The later run still rebuilds its state through it."""
    async with open_stack(settings_for(stack_env, backend, redis, mode)) as opened:
        saver = opened.saver
        graph = delta_graph(saver, snapshot_frequency=NO_SNAPSHOT)
        config = thread_config("spared-by-id")
        runs = await six_runs(graph, config)
        told = (await graph.aget_state(config)).values["messages"]
        listed = [c async for c in saver.alist(config)]
        deleted = [c for c in listed if c.metadata and c.metadata["run_id"] == runs[3]]
        later = next(c for c in listed if c.metadata and c.metadata["run_id"] == runs[4])
        assert deleted
        await saver.adelete_for_runs([runs[3]])
        for named in deleted:
            assert await saver.aget_tuple(named.config) is None
            assert await asyncio.to_thread(saver.get_tuple, named.config) is None
            assert [c async for c in saver.alist(named.config)] == []
            assert await asyncio.to_thread(lambda c=named.config: list(saver.list(c))) == []
        # What it was kept for still reads through it; a kept run's checkpoint by id too.
        assert (await graph.aget_state(config)).values["messages"] == told
        kept = await saver.aget_tuple(later.config)
        assert kept is not None and kept.metadata["run_id"] == runs[4]


@pytest.mark.parametrize(("backend", "redis", "mode"), STACKS, ids=STACK_IDS)
async def test_a_fork_from_a_checkpoint_spared_since_this_process_wrote_it_is_refused(
    backend: str, redis: bool, mode: str, stack_env: dict[str, str]
) -> None:
    """Process A writes runs 0-3, process B goes on with runs 4 and 5 and deletes run 3,
    kept only for their DeltaChannel history. A fork in A from run 3's last checkpoint (the
    last A wrote and read, not spared then) is refused as in any other process
    (`ParentGone`), rather than stored onto a history that is deleted (on Cosmos A's store
    remembered it as a parent needing no read; write-behind took it from the cold tier)."""
    settings = settings_for(stack_env, backend, redis, mode)
    config = thread_config("spared-remembered")
    thread_id = config["configurable"]["thread_id"]
    async with open_stack(settings) as first, open_stack(settings) as second:
        graph = delta_graph(first.saver, snapshot_frequency=NO_SNAPSHOT)
        other = delta_graph(second.saver, snapshot_frequency=NO_SNAPSHOT)
        runs: list[str] = []
        for n in range(6):
            runs.append(str(uuid.uuid4()))
            run_config: RunnableConfig = {
                "configurable": {**config["configurable"], "run_id": runs[-1]}
            }
            await (graph if n < 4 else other).ainvoke({"messages": [f"user {n}"]}, run_config)
            if n == 3:
                await first.saver.aflush(thread_id)
                spared = await first.saver.aget_tuple(config)
                assert spared is not None and spared.metadata["run_id"] == runs[3]
        told = (await other.aget_state(config)).values["messages"]
        await second.saver.adelete_for_runs([runs[3]])
        with pytest.raises(ParentGone):
            await graph.aupdate_state(spared.config, {"messages": ["fork"]})
        await first.saver.aflush(thread_id)
        assert (await graph.aget_state(config)).values["messages"] == told
        left = {runs.index(s.metadata["run_id"]) async for s in other.aget_state_history(config)}
        assert left == {0, 1, 2, 4, 5}


@pytest.mark.parametrize("durability", ["exit", "async"])
@pytest.mark.parametrize(("backend", "redis", "mode"), STACKS, ids=STACK_IDS)
async def test_delete_for_runs_rolls_back_a_run_whose_delta_writes_sit_on_its_parent(
    backend: str, redis: bool, mode: str, durability: str, stack_env: dict[str, str]
) -> None:
    """With `durability="exit"` LangGraph stores a run's DeltaChannel writes on the checkpoint
    the run started from (the previous run's): deleting the run must take them too, or the
    next run from there brings the deleted run's messages back."""
    settings = settings_for(stack_env, backend, redis, mode)
    reference = delta_graph(InMemorySaver())
    ref_cfg = thread_config("ref")
    async with open_stack(settings) as opened:
        saver = opened.saver
        graph = delta_graph(saver)
        cfg = thread_config()
        runs = []
        for n in range(4):
            run_id = str(uuid.uuid4())
            runs.append(run_id)
            run_cfg: RunnableConfig = {"configurable": {**cfg["configurable"], "run_id": run_id}}
            await graph.ainvoke({"messages": [f"user {n}"]}, run_cfg, durability=durability)
            if n < 3:
                await reference.ainvoke({"messages": [f"user {n}"]}, ref_cfg, durability=durability)
        # A run in the middle first: the later runs' checkpoints rebuild as they did.
        before = await by_step(graph, cfg)
        await saver.adelete_for_runs([runs[1]])
        after = await by_step(graph, cfg)
        assert max(after) == max(before)
        assert all(after[step] == before[step] for step in after)
        await saver.adelete_for_runs([runs[-1]])
        assert (await graph.aget_state(cfg)).values == (await reference.aget_state(ref_cfg)).values
        got = await graph.ainvoke({"messages": ["again"]}, cfg, durability=durability)
        assert got == await reference.ainvoke(
            {"messages": ["again"]}, ref_cfg, durability=durability
        )
