"""Maintenance (prune, copy, delete, delete_for_runs) against a write-behind backlog, a
Redis partition, a target that has state of its own, subgraphs and DeltaChannel threads,
on real servers.

With Redis unreachable, maintenance is refused (`BackendUnavailable`) before it changes
the cold tier: done there alone, Redis, back with its data, would serve what was deleted,
and a backlog left in its log would be flushed back onto it."""

from __future__ import annotations

import operator
import time
import uuid
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Annotated, Any, TypedDict
from urllib.parse import urlparse

import pytest
from langchain_core.runnables import RunnableConfig
from langgraph.channels.delta import DeltaChannel
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, StateGraph
from langgraph.types import Command

from state.checkpoint import TieredCheckpointSaver
from state.checkpoint import flusher as flusher_module
from state.cold import cosmos_layout as layout
from state.cold import postgres_checkpoints
from state.errors import BackendUnavailable, FlushLockBusy, HotStateLost, StillWriting
from state.hot import redis_client, redis_write_behind
from tests.chat_graph import chat_graph
from tests.contract.test_subgraph_namespaces import drafting
from tests.faults.proxy import LoopbackProxy
from tests.integration.delta_graph import STACK_IDS, STACKS, append, delta_graph, open_stack
from tests.integration.delta_graph import settings_for as stack_settings
from tests.integration.test_write_behind import WriteBehind, open_write_behind, settings_for

COLD_BACKENDS = ["cosmos", "postgres"]


def config(prefix: str = "hunt") -> RunnableConfig:
    return {"configurable": {"thread_id": f"{prefix}-{uuid.uuid4().hex[:12]}"}}


@pytest.fixture
def redis_proxy(stack_env: dict[str, str]) -> Iterator[tuple[LoopbackProxy, str]]:
    """A proxy in front of the stack's Redis (to partition it), and its URL."""
    target = urlparse(stack_env["REDIS_URL"])
    assert target.port is not None
    proxy = LoopbackProxy(target.port).start()
    netloc = f"{target.netloc.rsplit(':', 1)[0]}:{proxy.port}"
    try:
        yield proxy, target._replace(netloc=netloc).geturl()
    finally:
        proxy.stop()


async def flushed_then_unflushed_run(tiers: WriteBehind) -> tuple[RunnableConfig, str]:
    """A thread whose first run is flushed and whose second is still in the log only."""
    graph = chat_graph(tiers.saver)
    cfg = config()
    thread_id = cfg["configurable"]["thread_id"]
    await graph.ainvoke({"messages": ["flushed"]}, cfg)
    await tiers.saver.aflush(thread_id)
    await graph.ainvoke({"messages": ["unflushed"]}, cfg, durability="async")
    assert await tiers.flusher.log.pending(thread_id)
    return cfg, thread_id


@pytest.mark.parametrize("backend", COLD_BACKENDS)
async def test_prune_delete_is_refused_during_a_redis_partition_then_not_undone(
    backend: str, stack_env: dict[str, str], redis_proxy: tuple[LoopbackProxy, str]
) -> None:
    proxy, url = redis_proxy
    async with open_write_behind(settings_for(stack_env, backend, url)) as tiers:
        cfg, thread_id = await flushed_then_unflushed_run(tiers)

        proxy.cut("reset")
        with pytest.raises(BackendUnavailable):
            await tiers.saver.aprune([thread_id], strategy="delete")
        assert await tiers.store.get_checkpoint(thread_id, "", None) is not None  # untouched
        proxy.restore()

        await tiers.saver.aprune([thread_id], strategy="delete")
        await tiers.flusher.drain()  # any worker's background pass
        fresh = TieredCheckpointSaver(tiers.store)  # the cold tier only
        latest = await fresh.aget_tuple(cfg)
        assert latest is None, latest and latest.checkpoint["channel_values"].get("messages")
        assert await tiers.saver.aget_tuple(cfg) is None


@pytest.mark.parametrize("operation", ["delete_thread", "prune_delete"])
@pytest.mark.parametrize("backend", COLD_BACKENDS)
async def test_a_delete_refused_during_a_redis_partition_still_checks_the_runs_boundary(
    backend: str, operation: str, stack_env: dict[str, str], redis_proxy: tuple[LoopbackProxy, str]
) -> None:
    """A refused delete deleted nothing: the run's acknowledged steps still in the log must
    still be confirmed at its boundary, so Redis losing them afterwards (a restart without
    persistence) fails the boundary instead of acknowledging a state only Redis held."""
    proxy, url = redis_proxy
    async with open_write_behind(settings_for(stack_env, backend, url)) as tiers:
        _cfg, thread_id = await flushed_then_unflushed_run(tiers)

        proxy.cut("reset")
        with pytest.raises(BackendUnavailable):
            if operation == "delete_thread":
                await tiers.saver.adelete_thread(thread_id)
            else:
                await tiers.saver.aprune([thread_id], strategy="delete")
        proxy.restore()
        await tiers.redis.flushall()

        with pytest.raises(HotStateLost):
            await tiers.saver.aflush(thread_id)


@pytest.mark.parametrize("backend", COLD_BACKENDS)
async def test_write_through_delete_is_refused_during_a_redis_partition_then_not_served(
    backend: str, stack_env: dict[str, str], redis_proxy: tuple[LoopbackProxy, str]
) -> None:
    proxy, url = redis_proxy
    settings = stack_settings(stack_env, backend, False, "write-through", redis_url=url)
    cfg = config()
    thread_id = cfg["configurable"]["thread_id"]
    async with open_stack(settings) as opened:
        graph = chat_graph(opened.saver)
        await graph.ainvoke({"messages": ["hello"]}, cfg)
        want = (await graph.aget_state(cfg)).values
        proxy.cut("reset")
        with pytest.raises(BackendUnavailable):
            await opened.saver.adelete_thread(thread_id)
        proxy.restore()
        assert (await graph.aget_state(cfg)).values == want  # nothing deleted
        await opened.saver.adelete_thread(thread_id)
        same = await graph.aget_state(cfg)
        async with open_stack(settings) as other:  # another worker, Redis back
            state = await chat_graph(other.saver).aget_state(cfg)
            cold = await chat_graph(TieredCheckpointSaver(other.backends.checkpoints)).aget_state(
                cfg
            )
            assert cold.values == {}
            assert (
                len(same.values.get("messages", [])),
                len(state.values.get("messages", [])),
            ) == (0, 0)


async def test_a_delete_right_after_a_brief_redis_stall_waits_out_the_rest_and_is_done(
    stack_env: dict[str, str],
    redis_proxy: tuple[LoopbackProxy, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A Redis call timed out a moment ago, the stall is over: the process still rests the
    server (`ServerCircuit`), refusing calls unsent. A delete then waits the rest out and
    is done, not refused: dropping cached checkpoints is idempotent."""
    # Long enough that the delete starts within the rest however loaded the machine.
    monkeypatch.setattr(redis_client, "FAIL_FAST_SECONDS", 3.0)
    proxy, url = redis_proxy
    settings = stack_settings(stack_env, "postgres", False, "write-through", redis_url=url)
    cfg = config()
    thread_id = cfg["configurable"]["thread_id"]
    async with open_stack(settings) as opened:
        graph = chat_graph(opened.saver)
        await graph.ainvoke({"messages": ["hello"]}, cfg)
        proxy.cut("blackhole")
        try:
            await graph.aget_state(cfg)  # Redis times out: served from the cold tier
        finally:
            proxy.restore()
        target = urlparse(url)
        assert target.hostname is not None and target.port is not None
        resting = redis_client.circuit_for(target.hostname, target.port)
        assert resting.open_until > time.monotonic()
        await opened.saver.adelete_thread(thread_id)
        assert (await graph.aget_state(cfg)).values == {}


class Profiled(TypedDict, total=False):
    messages: Annotated[list[str], operator.add]
    profile: str


def profile_graph(saver: Any) -> Any:
    """Messages appended every step, and a large `profile` set once by the first input:
    every later checkpoint names the first one's document for it (Cosmos `value_at`)."""

    def node(name: str) -> Any:
        return lambda state: {"messages": [f"{name}:{len(state['messages'])}"]}

    graph = StateGraph(Profiled)
    graph.add_node("one", node("one"))
    graph.add_node("two", node("two"))
    graph.add_edge(START, "one")
    graph.add_edge("one", "two")
    graph.add_edge("two", END)
    return graph.compile(checkpointer=saver)


@pytest.mark.parametrize("backend", COLD_BACKENDS)
async def test_copying_again_after_the_source_was_pruned_keeps_the_targets_checkpoints(
    backend: str, stack_env: dict[str, str]
) -> None:
    settings = stack_settings(stack_env, backend, False, "write-through")
    async with open_stack(settings) as opened:
        saver = opened.saver
        graph = profile_graph(saver)
        source, target = config("src"), config("dst")
        source_id, target_id = (c["configurable"]["thread_id"] for c in (source, target))
        await graph.ainvoke({"messages": ["hi"], "profile": "p" * 4096}, source)
        await graph.ainvoke({"messages": ["again"]}, source)
        await saver.acopy_thread(source_id, target_id)
        before = {
            s.config["configurable"]["checkpoint_id"]: s.values
            async for s in graph.aget_state_history(target)
        }
        assert len(before) == 8

        await saver.aprune([source_id], strategy="keep_latest")
        await saver.acopy_thread(source_id, target_id)  # the source has nothing new

        after = {
            s.config["configurable"]["checkpoint_id"]: s.values
            async for s in graph.aget_state_history(target)
        }
        fresh = {
            s.config["configurable"]["checkpoint_id"]: s.values
            async for s in profile_graph(
                TieredCheckpointSaver(opened.backends.checkpoints)
            ).aget_state_history(target)
        }
        missing = sorted(set(before) - set(after))
        assert missing == [], f"{len(before)} checkpoints before, {len(after)} after"
        assert after == before
        assert fresh == before


class Inner(TypedDict, total=False):
    word: str
    seen: Annotated[list[str], DeltaChannel(append, snapshot_frequency=3)]


class Outer(TypedDict, total=False):
    word: str
    messages: Annotated[list[str], DeltaChannel(append, snapshot_frequency=3)]


class WordOnly(TypedDict, total=False):
    word: str


def nested_delta_graph(saver: Any) -> Any:
    inner = StateGraph(Inner, input_schema=WordOnly, output_schema=WordOnly)
    inner.add_node("remember", lambda s: {"seen": [[f"{s['word']}:{'s' * 400}"]]})
    inner.add_edge(START, "remember")
    inner.add_edge("remember", END)
    outer = StateGraph(Outer)
    outer.add_node("talk", lambda s: {"messages": [[f"{s['word']}:{'m' * 400}"]]})
    outer.add_node("mem", inner.compile(checkpointer=True))
    outer.add_edge(START, "talk")
    outer.add_edge("talk", "mem")
    outer.add_edge("mem", END)
    return outer.compile(checkpointer=saver)


async def both_states(graph: Any, thread_id: str) -> tuple[Any, Any]:
    root = await graph.aget_state({"configurable": {"thread_id": thread_id}})
    sub = await graph.aget_state({"configurable": {"thread_id": thread_id, "checkpoint_ns": "mem"}})
    return root.values, sub.values


@pytest.mark.parametrize(("backend", "redis", "mode"), STACKS, ids=STACK_IDS)
async def test_prune_and_copy_of_a_nested_delta_thread_keep_both_namespaces_states(
    backend: str, redis: bool, mode: str, stack_env: dict[str, str]
) -> None:
    settings = stack_settings(stack_env, backend, redis, mode)
    reference = nested_delta_graph(InMemorySaver())
    ref_id = f"ref-{uuid.uuid4().hex[:8]}"
    async with open_stack(settings) as opened:
        saver = opened.saver
        graph = nested_delta_graph(saver)
        thread_id = config("nest")["configurable"]["thread_id"]
        for n in range(8):
            got = await graph.ainvoke(
                {"word": f"w{n}"}, {"configurable": {"thread_id": thread_id}}, durability="async"
            )
            ref = await reference.ainvoke(
                {"word": f"w{n}"}, {"configurable": {"thread_id": ref_id}}
            )
            assert got == ref
        want = await both_states(reference, ref_id)
        assert len(want[1]["seen"]) == 8
        assert await both_states(graph, thread_id) == want

        copy_id = f"copy-{uuid.uuid4().hex[:8]}"
        await saver.acopy_thread(thread_id, copy_id)
        await saver.aprune([thread_id], strategy="keep_latest")
        assert await both_states(graph, thread_id) == want
        assert await both_states(graph, copy_id) == want
        await saver.aprune([copy_id], strategy="keep_latest")
        assert await both_states(graph, copy_id) == want
        cold = nested_delta_graph(TieredCheckpointSaver(opened.backends.checkpoints))
        assert await both_states(cold, thread_id) == want
        assert await both_states(cold, copy_id) == want
        # And both go on like the reference.
        got = await graph.ainvoke({"word": "next"}, {"configurable": {"thread_id": copy_id}})
        ref = await reference.ainvoke({"word": "next"}, {"configurable": {"thread_id": ref_id}})
        assert got == ref
        assert await both_states(graph, copy_id) == await both_states(reference, ref_id)


@pytest.mark.parametrize("backend", COLD_BACKENDS)
async def test_delete_for_runs_whose_backlog_cannot_be_flushed_says_so(
    backend: str, stack_env: dict[str, str]
) -> None:
    """The run's checkpoints are still in the write-behind log, and the cold tier refuses
    that thread's flush for a moment (down, not a refusal for good):
    delete_for_runs says so, naming the thread, rather than return as if the run were
    deleted (it was served again, and flushed back); called again, it deletes it."""
    async with open_write_behind(settings_for(stack_env, backend, stack_env["REDIS_URL"])) as tiers:
        graph = chat_graph(tiers.saver)
        thread_id = config()["configurable"]["thread_id"]
        run = f"run-{uuid.uuid4().hex[:8]}"
        cfg: RunnableConfig = {"configurable": {"thread_id": thread_id}}
        await graph.ainvoke(
            {"messages": ["deleted run"]},
            {"configurable": {"thread_id": thread_id, "run_id": run}},
            durability="async",
        )
        assert await tiers.flusher.log.pending(thread_id)

        async def refusing(ops: Any, **options: Any) -> None:
            # An outage: a refusal for good (`RequestRejected`) is a stuck entry instead.
            raise BackendUnavailable("cold", "down for a moment")

        tiers.flusher.store = SimpleNamespace(apply_batch=refusing)  # type: ignore[assignment]
        try:
            with pytest.raises(BackendUnavailable) as refused:
                await tiers.saver.adelete_for_runs([run])
            assert thread_id in str(refused.value)
        finally:
            tiers.flusher.store = tiers.store
        await tiers.saver.adelete_for_runs([run])  # called again, once it can be flushed

        served = await tiers.saver.aget_tuple(cfg)
        await tiers.flusher.drain()  # the next background pass
        cold = await TieredCheckpointSaver(tiers.store).aget_tuple(cfg)
        assert (served, cold) == (None, None), (
            served and served.metadata.get("run_id"),
            cold and cold.metadata.get("run_id"),
        )


@pytest.mark.parametrize("backend", COLD_BACKENDS)
async def test_copy_is_refused_during_a_redis_partition_then_copies_the_whole_source(
    backend: str, stack_env: dict[str, str], redis_proxy: tuple[LoopbackProxy, str]
) -> None:
    proxy, url = redis_proxy
    async with open_write_behind(settings_for(stack_env, backend, url)) as tiers:
        graph = chat_graph(tiers.saver)
        source, target = config("src"), config("dst")
        await graph.ainvoke({"messages": ["flushed"]}, source)
        await tiers.saver.aflush(source["configurable"]["thread_id"])
        await graph.ainvoke({"messages": ["unflushed"]}, source, durability="async")
        want = (await graph.aget_state(source)).values

        proxy.cut("reset")
        with pytest.raises(BackendUnavailable):
            await tiers.saver.acopy_thread(
                source["configurable"]["thread_id"], target["configurable"]["thread_id"]
            )
        proxy.restore()
        await tiers.saver.acopy_thread(
            source["configurable"]["thread_id"], target["configurable"]["thread_id"]
        )
        await tiers.flusher.drain()

        assert (await graph.aget_state(source)).values == want
        copied = (await graph.aget_state(target)).values
        assert len(copied["messages"]) == len(want["messages"]), (
            f"source {len(want['messages'])} messages, copy {len(copied['messages'])}"
        )


@pytest.mark.parametrize(("backend", "redis", "mode"), STACKS, ids=STACK_IDS)
async def test_prune_and_copy_of_a_thread_paused_inside_a_subgraph_resume_alike(
    backend: str, redis: bool, mode: str, stack_env: dict[str, str]
) -> None:
    settings = stack_settings(stack_env, backend, redis, mode)
    ref = drafting(InMemorySaver())
    ref_cfg = {"configurable": {"thread_id": "r"}}
    await ref.ainvoke({"topic": "refund", "trail": []}, ref_cfg)
    want = await ref.ainvoke(Command(resume="ok"), ref_cfg)
    async with open_stack(settings) as opened:
        graph = drafting(opened.saver)
        cfg = config("draft")
        thread_id = cfg["configurable"]["thread_id"]
        await graph.ainvoke({"topic": "refund", "trail": []}, cfg, durability="async")
        copy_cfg = config("draftcopy")
        await opened.saver.aprune([thread_id], strategy="keep_latest")
        await opened.saver.acopy_thread(thread_id, copy_cfg["configurable"]["thread_id"])
        await opened.saver.aprune([copy_cfg["configurable"]["thread_id"]], strategy="keep_latest")
        fresh = drafting(TieredCheckpointSaver(opened.backends.checkpoints))
        assert await fresh.ainvoke(Command(resume="ok"), copy_cfg) == want
        assert await graph.ainvoke(Command(resume="ok"), cfg, durability="async") == want


class ProfiledDelta(TypedDict, total=False):
    messages: Annotated[list[str], DeltaChannel(append, snapshot_frequency=8)]
    profile: str


def profiled_delta_graph(saver: Any) -> Any:
    def node(name: str) -> Any:
        return lambda state: {"messages": [[f"{name}:{len(state['messages'])}"]]}

    graph = StateGraph(ProfiledDelta)
    graph.add_node("one", node("one"))
    graph.add_node("two", node("two"))
    graph.add_edge(START, "one")
    graph.add_edge("one", "two")
    graph.add_edge("two", END)
    return graph.compile(checkpointer=saver)


@pytest.mark.parametrize("backend", COLD_BACKENDS)
async def test_copying_onto_a_target_that_went_on_keeps_the_targets_state(
    backend: str, stack_env: dict[str, str]
) -> None:
    """A thread copied (a fork), both went on; the source was pruned; the source is copied
    onto the fork again. The fork's own state must not change (Postgres: it does not)."""
    settings = stack_settings(stack_env, backend, False, "write-through")
    async with open_stack(settings) as opened:
        saver = opened.saver
        graph = profiled_delta_graph(saver)
        source, target = config("src"), config("fork")
        source_id, target_id = (c["configurable"]["thread_id"] for c in (source, target))
        await graph.ainvoke({"messages": [["hi"]], "profile": "p" * 4096}, source)
        await saver.acopy_thread(source_id, target_id)
        for n in range(2):
            await graph.ainvoke({"messages": [[f"source {n}"]]}, source)
        await graph.ainvoke({"messages": [["fork"]]}, target)
        before = (await graph.aget_state(target)).values
        assert len(before["messages"]) == 6

        await saver.aprune([source_id], strategy="keep_latest")
        await saver.acopy_thread(source_id, target_id)

        after = (await graph.aget_state(target)).values
        cold = (
            await profiled_delta_graph(
                TieredCheckpointSaver(opened.backends.checkpoints)
            ).aget_state(target)
        ).values
        assert (len(after.get("messages", [])), len(cold.get("messages", []))) == (6, 6), (
            after.get("messages"),
            cold.get("messages"),
        )
        assert after == before


async def test_cosmos_copy_interrupted_then_repeated_copies_the_checkpoints(
    stack_env: dict[str, str],
) -> None:
    """A copy stopped by a Cosmos failure after the checkpoints were written as values
    holders, before they were written as checkpoints; called again, it finishes (it took
    those holders for the target's own documents and left 0 checkpoints)."""
    settings = stack_settings(stack_env, "cosmos", False, "write-through")
    async with open_stack(settings) as opened:
        saver = opened.saver
        graph = chat_graph(saver)
        source_id, target_id = (f"{p}-{uuid.uuid4().hex[:12]}" for p in ("src", "dst"))
        source = {"configurable": {"thread_id": source_id}}
        target = {"configurable": {"thread_id": target_id}}
        await graph.ainvoke({"messages": ["one"]}, source)
        await graph.ainvoke({"messages": ["two"]}, source)
        want = (await graph.aget_state(source)).values
        history = len([s async for s in graph.aget_state_history(source)])

        io = opened.backends.checkpoints._maintenance._io
        upsert_all = io.upsert_all

        async def failing(docs: Any) -> None:
            if any(doc["type"] == layout.CHECKPOINT for doc in docs):
                raise BackendUnavailable("cosmos", "injected: the service went away")
            await upsert_all(docs)

        io.upsert_all = failing
        try:
            with pytest.raises(BackendUnavailable):
                await saver.acopy_thread(source_id, target_id)
        finally:
            io.upsert_all = upsert_all
        await saver.acopy_thread(source_id, target_id)  # called again, nothing failing

        copied = (await graph.aget_state(target)).values
        copies = len([s async for s in graph.aget_state_history(target)])
        cold = (
            await chat_graph(TieredCheckpointSaver(opened.backends.checkpoints)).aget_state(target)
        ).values
        assert (copied, cold, copies) == (want, want, history)


@pytest.mark.parametrize("backend", ["cosmos", "postgres"])
async def test_delete_for_runs_called_again_after_redis_failed_drops_the_cache(
    backend: str,
    stack_env: dict[str, str],
    redis_proxy: tuple[Any, str],
) -> None:
    """Redis fails just after the cold tier deleted the run's checkpoints: the call says
    so (BackendUnavailable), as it should. Called again once Redis is back, it returns;
    but the cold tier names no thread any more, so the cache that still holds the deleted
    run's checkpoint is never dropped: every worker is served the deleted run."""
    proxy, url = redis_proxy
    settings = stack_settings(stack_env, backend, False, "write-through", redis_url=url)
    thread_id = f"runs-{uuid.uuid4().hex[:12]}"
    kept_run, deleted_run = (f"run-{uuid.uuid4().hex[:8]}" for _ in range(2))
    cfg = {"configurable": {"thread_id": thread_id}}
    async with open_stack(settings) as opened:
        graph = chat_graph(opened.saver)
        await graph.ainvoke(
            {"messages": ["kept"]}, {"configurable": {**cfg["configurable"], "run_id": kept_run}}
        )
        want = (await graph.aget_state(cfg)).values
        await graph.ainvoke(
            {"messages": ["deleted"]},
            {"configurable": {**cfg["configurable"], "run_id": deleted_run}},
        )
        store = opened.backends.checkpoints
        delete_for_runs = store.delete_for_runs

        async def then_redis_fails(run_ids: Any) -> Any:
            touched = await delete_for_runs(run_ids)
            proxy.cut("reset")
            return touched

        store.delete_for_runs = then_redis_fails
        try:
            with pytest.raises(BackendUnavailable):
                await opened.saver.adelete_for_runs([deleted_run])
        finally:
            store.delete_for_runs = delete_for_runs
            proxy.restore()
        await opened.saver.adelete_for_runs([deleted_run])  # called again: returns

        async with open_stack(settings) as other:  # another worker
            served = (await chat_graph(other.saver).aget_state(cfg)).values
            cold = (
                await chat_graph(TieredCheckpointSaver(other.backends.checkpoints)).aget_state(cfg)
            ).values
        assert cold == want
        assert len(served["messages"]) == len(want["messages"]), (
            f"kept run {len(want['messages'])} messages, served {len(served['messages'])}"
        )


# Where the cold tier fails, once it deleted the run from the first thread.
PART_WAY_FAILURES = [
    ("postgres", "write-through", "second batch"),
    ("postgres", "write-behind", "second batch"),
    ("cosmos", "write-through", "second thread"),
    ("cosmos", "write-behind", "second thread"),
    ("cosmos", "write-through", "block collection"),
]


@pytest.mark.parametrize(
    ("backend", "mode", "failing"),
    PART_WAY_FAILURES,
    ids=[f"{b}-{m}-{f.replace(' ', '-')}" for b, m, f in PART_WAY_FAILURES],
)
async def test_delete_for_runs_failing_part_way_drops_the_caches_of_the_threads_it_deleted(
    backend: str,
    mode: str,
    failing: str,
    stack_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A run on two threads, cached in Redis; the cold tier deletes it from the first
    thread (a batch of its own in Postgres, a thread at a time in Cosmos), then fails on the
    second (or, in Cosmos, collecting its unreferenced blocks once both are deleted). The
    deleted threads' caches still held the run's checkpoint, served to every read; and the
    call made again found nothing more to delete there, so it named those threads no more
    and their caches were never dropped."""
    settings = stack_settings(stack_env, backend, True, mode)
    kept_run, deleted_run = (f"run-{uuid.uuid4().hex[:8]}" for _ in range(2))
    configs = [config("runs") for _ in range(2)]
    async with open_stack(settings) as opened:
        graph = chat_graph(opened.saver)
        for cfg in configs:
            for run, message in ((kept_run, "kept"), (deleted_run, "deleted")):
                run_cfg: RunnableConfig = {"configurable": {**cfg["configurable"], "run_id": run}}
                await graph.ainvoke({"messages": [message]}, run_cfg)
        store = opened.backends.checkpoints
        deletes = 0

        def second_fails() -> None:
            nonlocal deletes
            deletes += 1
            if deletes == 2:
                raise BackendUnavailable(backend, "failing once the first thread is done")

        if backend == "postgres":
            monkeypatch.setattr(postgres_checkpoints, "PRUNE_BATCH", 1)
            delete_dependents = postgres_checkpoints._delete_dependents

            async def failing_dependents(conn: Any, deleted: Any) -> None:
                second_fails()
                await delete_dependents(conn, deleted)

            monkeypatch.setattr(postgres_checkpoints, "_delete_dependents", failing_dependents)
        elif failing == "block collection":
            collect_blocks = store._collect_blocks  # type: ignore[attr-defined]

            async def failing_collection(thread_id: str) -> None:
                second_fails()
                await collect_blocks(thread_id)

            monkeypatch.setattr(store, "_collect_blocks", failing_collection)
        else:
            maintenance = store._maintenance  # type: ignore[attr-defined]
            remove = maintenance._remove

            async def failing_remove(*args: Any, **kwargs: Any) -> None:
                second_fails()
                await remove(*args, **kwargs)

            monkeypatch.setattr(maintenance, "_remove", failing_remove)
        with pytest.raises(BackendUnavailable):
            await opened.saver.adelete_for_runs([deleted_run])
        assert deletes == 2

        async def served_and_cold() -> list[tuple[Any, Any]]:
            cold = TieredCheckpointSaver(store)  # no cache
            pairs = []
            for cfg in configs:
                served, stored = await opened.saver.aget_tuple(cfg), await cold.aget_tuple(cfg)
                pairs.append(
                    tuple(
                        got and got.checkpoint["channel_values"]["messages"]
                        for got in (served, stored)
                    )
                )
            return pairs

        for served, stored in await served_and_cold():
            assert served == stored, "the hot tier serves a checkpoint the cold tier deleted"

        await opened.saver.adelete_for_runs([deleted_run])  # called again, nothing failing
        for served, stored in await served_and_cold():
            assert served == stored, "the hot tier serves a checkpoint the cold tier deleted"
            assert not any("deleted" in str(message) for message in served), served


@pytest.mark.parametrize("backend", COLD_BACKENDS)
async def test_delete_for_runs_refuses_while_a_later_runs_unflushable_backlog_goes_on_from_them(
    backend: str, stack_env: dict[str, str]
) -> None:
    """The thread's last run is in the write-behind log alone (durability "async") and the
    cold tier refuses its flush for a moment; delete_for_runs names an earlier run, whose
    checkpoints that later run goes on from. Deleting them (the cold tier cannot tell the
    backlog needs them) left the later run, once flushed, with 3 of its 12 messages: the
    call must refuse, or spare them."""
    async with open_write_behind(settings_for(stack_env, backend, stack_env["REDIS_URL"])) as tiers:
        graph = delta_graph(tiers.saver, snapshot_frequency=50)
        reference = delta_graph(InMemorySaver(), snapshot_frequency=50)
        thread_id = config()["configurable"]["thread_id"]
        ref_cfg: RunnableConfig = {"configurable": {"thread_id": f"ref-{thread_id}"}}
        runs = [f"run-{n}-{uuid.uuid4().hex[:6]}" for n in range(4)]
        for n, run in enumerate(runs):
            run_cfg: RunnableConfig = {"configurable": {"thread_id": thread_id, "run_id": run}}
            got = await graph.ainvoke(
                {"messages": [f"user {n}"]}, run_cfg, durability="async" if n == 3 else "sync"
            )
            assert got == await reference.ainvoke({"messages": [f"user {n}"]}, ref_cfg)
        assert await tiers.flusher.log.pending(thread_id)
        want = (await reference.aget_state(ref_cfg)).values  # run 2's checkpoints spared

        async def refusing(ops: Any, **options: Any) -> None:
            # An outage: a refusal for good (`RequestRejected`) is a stuck entry instead.
            raise BackendUnavailable("cold", "down for a moment")

        tiers.flusher.store = SimpleNamespace(apply_batch=refusing)  # type: ignore[assignment]
        try:
            with pytest.raises(BackendUnavailable) as refused:
                await tiers.saver.adelete_for_runs([runs[2]])
            assert thread_id in str(refused.value)
        finally:
            tiers.flusher.store = tiers.store
        await tiers.saver.adelete_for_runs([runs[2]])  # called again, once it can be flushed
        await tiers.flusher.drain()

        cfg: RunnableConfig = {"configurable": {"thread_id": thread_id}}
        cold = delta_graph(TieredCheckpointSaver(tiers.store), snapshot_frequency=50)
        assert (await cold.aget_state(cfg)).values == want
        assert (await graph.aget_state(cfg)).values == want


class GrowingProfile(TypedDict, total=False):
    profile: str
    messages: Annotated[list[str], DeltaChannel(append, snapshot_frequency=3)]


def growing_profile_graph(saver: Any) -> Any:
    """A DeltaChannel with a snapshot every 3 updates, and a large `profile` set anew every
    7 messages: pruned checkpoints stay behind as values holders that kept ones name."""

    def reply(state: dict[str, Any]) -> dict[str, Any]:
        n = len(state["messages"])
        update: dict[str, Any] = {"messages": [f"a{n}:" + "m" * 700]}
        if n % 7 == 1:
            update["profile"] = f"profile-{n}:" + "p" * 3000
        return update

    graph = StateGraph(GrowingProfile)
    graph.add_node("reply", reply)
    graph.add_edge(START, "reply")
    graph.add_edge("reply", END)
    return graph.compile(checkpointer=saver)


async def test_a_cosmos_copy_whose_source_a_prune_changes_meanwhile_is_whole(
    stack_env: dict[str, str],
) -> None:
    """The timer's prune of a source an operator is copying, run between the copy's passes:
    a checkpoint the first pass saw (and skipped) became a values holder before the
    checkpoint passes; the copy's latest then named a document the copy lacked (2 of 20
    messages, no profile)."""
    settings = stack_settings(stack_env, "cosmos", False, "write-through")
    reference = growing_profile_graph(InMemorySaver())
    ref_cfg = config("ref")
    async with open_stack(settings) as opened:
        graph = growing_profile_graph(opened.saver)
        cfg = config()
        thread_id = cfg["configurable"]["thread_id"]
        for n in range(10):
            await graph.ainvoke({"messages": [f"u{n}"]}, cfg)
            await reference.ainvoke({"messages": [f"u{n}"]}, ref_cfg)
        want = (await reference.aget_state(ref_cfg)).values

        maintenance = opened.backends.checkpoints._maintenance  # type: ignore[attr-defined]
        copy_pass = maintenance._copy
        passes = 0

        async def first_pass_then_prune(*args: Any, **kwargs: Any) -> None:
            nonlocal passes
            passes += 1
            await copy_pass(*args, **kwargs)
            if passes == 1:
                await maintenance.prune([thread_id], strategy="keep_latest")

        maintenance._copy = first_pass_then_prune
        target = config("copy")
        await opened.saver.acopy_thread(thread_id, target["configurable"]["thread_id"])
        cold = growing_profile_graph(TieredCheckpointSaver(opened.backends.checkpoints))
        assert (await cold.aget_state(target)).values == want


@pytest.mark.parametrize("backend", COLD_BACKENDS)
async def test_a_write_behind_delete_whose_last_cache_drop_fails_is_never_served(
    backend: str,
    stack_env: dict[str, str],
    redis_proxy: tuple[LoopbackProxy, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Another worker reads the thread while the delete is under way (its first cache drop
    done, the cold delete not yet), caching it again; Redis is then cut before the delete's
    last drop. Once Redis answers again, no worker serves the deleted thread from it."""
    proxy, url = redis_proxy
    settings = settings_for(stack_env, backend, url)
    cfg = config()
    thread_id = cfg["configurable"]["thread_id"]
    async with open_write_behind(settings) as tiers, open_write_behind(settings) as reader:
        graph = chat_graph(tiers.saver)
        await graph.ainvoke({"messages": ["hello"]}, cfg)
        await tiers.saver.aflush(thread_id)
        cold_delete = tiers.store.delete_thread

        async def read_then_delete(thread: str, **kwargs: Any) -> None:
            assert await reader.saver.aget_tuple(cfg) is not None  # cached again
            await cold_delete(thread, **kwargs)
            proxy.cut("reset")

        monkeypatch.setattr(tiers.store, "delete_thread", read_then_delete)
        try:
            await tiers.saver.adelete_thread(thread_id)
        except BackendUnavailable:
            pass  # refused is fine, as long as nothing deleted is served after
        finally:
            proxy.restore()
        assert await tiers.store.get_checkpoint(thread_id, "", None) is None  # deleted
        async with open_write_behind(settings) as other:  # another worker, Redis back
            served = await other.saver.aget_tuple(cfg)
            assert served is None, served.checkpoint["channel_values"]


@pytest.mark.parametrize("mode", ["write-through", "write-behind"])
@pytest.mark.parametrize("backend", COLD_BACKENDS)
async def test_a_thread_delete_for_runs_left_is_cached_again(
    backend: str, mode: str, stack_env: dict[str, str]
) -> None:
    """delete_for_runs deletes some runs of a thread that goes on: the kept run's
    checkpoint, older than the call, is cached again by the next read, not read from the
    cold tier by every read for the hot TTL (a day)."""
    settings = stack_settings(stack_env, backend, True, mode)
    thread_id = f"runs-{uuid.uuid4().hex[:12]}"
    kept_run, deleted_run = (f"run-{uuid.uuid4().hex[:8]}" for _ in range(2))
    cfg: RunnableConfig = {"configurable": {"thread_id": thread_id}}
    async with open_stack(settings) as opened:
        graph = chat_graph(opened.saver)
        await graph.ainvoke(
            {"messages": ["kept"]}, {"configurable": {**cfg["configurable"], "run_id": kept_run}}
        )
        want = (await graph.aget_state(cfg)).values
        await graph.ainvoke(
            {"messages": ["deleted"]},
            {"configurable": {**cfg["configurable"], "run_id": deleted_run}},
        )
        await opened.saver.adelete_for_runs([deleted_run])
        assert (await graph.aget_state(cfg)).values == want  # a miss: read cold, cached
        store = opened.backends.checkpoints
        cold_reads: list[str | None] = []
        get_checkpoint = store.get_checkpoint

        async def counted(thread: str, ns: str, checkpoint_id: str | None, **kwargs: Any) -> Any:
            cold_reads.append(checkpoint_id)
            return await get_checkpoint(thread, ns, checkpoint_id, **kwargs)

        store.get_checkpoint = counted  # type: ignore[method-assign]
        try:
            assert (await graph.aget_state(cfg)).values == want
        finally:
            store.get_checkpoint = get_checkpoint  # type: ignore[method-assign]
        assert cold_reads == [], "the kept run's checkpoint was not cached again"


@pytest.mark.parametrize("backend", COLD_BACKENDS)
async def test_a_write_behind_delete_refused_for_a_busy_flush_lock_leaves_the_thread_cached(
    backend: str, stack_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another worker holds the thread's flush lock past the delete's wait: the delete is
    refused before any change (`FlushLockBusy`) and the thread goes on. Its checkpoint,
    older than the refused delete, is cached again by the next read, not read from the
    cold tier by every read for the hot TTL (a day) under the delete's fill fence."""
    monkeypatch.setattr(flusher_module, "LOCK_WAIT_SECONDS", 0.5)
    settings = settings_for(stack_env, backend, stack_env["REDIS_URL"])
    cfg = config()
    thread_id = cfg["configurable"]["thread_id"]
    async with open_write_behind(settings) as tiers, open_write_behind(settings) as other:
        graph = chat_graph(tiers.saver)
        await graph.ainvoke({"messages": ["hello"]}, cfg)
        await tiers.saver.aflush(thread_id)
        want = (await graph.aget_state(cfg)).values
        async with other.flusher.holding(thread_id):
            with pytest.raises(FlushLockBusy):
                await tiers.saver.adelete_thread(thread_id)
        assert (await graph.aget_state(cfg)).values == want  # a miss: read cold, cached
        cold_reads: list[str | None] = []
        get_checkpoint = tiers.store.get_checkpoint

        async def counted(thread: str, ns: str, checkpoint_id: str | None, **kwargs: Any) -> Any:
            cold_reads.append(checkpoint_id)
            return await get_checkpoint(thread, ns, checkpoint_id, **kwargs)

        monkeypatch.setattr(tiers.store, "get_checkpoint", counted)
        assert (await graph.aget_state(cfg)).values == want
        assert cold_reads == [], "the thread's checkpoint was not cached again"


@pytest.mark.parametrize("mode", ["write-through", "write-behind"])
@pytest.mark.parametrize("operation", ["delete_thread", "prune_delete"])
@pytest.mark.parametrize("backend", COLD_BACKENDS)
async def test_a_delete_the_cold_tier_refused_leaves_the_thread_cached(
    backend: str,
    operation: str,
    mode: str,
    stack_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The cold tier refuses a delete (unreachable) and the thread goes on:
    its checkpoint, older than the refused delete, is cached again by the next read, not
    read from the cold tier by every read for the hot TTL (a day) under the delete's fill
    fence, which the drop after a delete lifts whether the delete was done or not."""
    settings = stack_settings(stack_env, backend, True, mode)
    cfg = config()
    thread_id = cfg["configurable"]["thread_id"]
    async with open_stack(settings) as opened:
        graph = chat_graph(opened.saver)
        await graph.ainvoke({"messages": ["hello"]}, cfg)
        await opened.saver.aflush(thread_id)
        want = (await graph.aget_state(cfg)).values
        store = opened.backends.checkpoints

        async def unreachable(*args: Any, **kwargs: Any) -> None:
            raise BackendUnavailable(backend, "cut")

        with monkeypatch.context() as patched:
            patched.setattr(store, "delete_thread", unreachable)
            patched.setattr(store, "prune", unreachable)
            with pytest.raises(BackendUnavailable):
                if operation == "delete_thread":
                    await opened.saver.adelete_thread(thread_id)
                else:
                    await opened.saver.aprune([thread_id], strategy="delete")
        assert (await graph.aget_state(cfg)).values == want  # a miss: read cold, cached
        cold_reads: list[str | None] = []
        get_checkpoint = store.get_checkpoint

        async def counted(thread: str, ns: str, checkpoint_id: str | None, **kwargs: Any) -> Any:
            cold_reads.append(checkpoint_id)
            return await get_checkpoint(thread, ns, checkpoint_id, **kwargs)

        monkeypatch.setattr(store, "get_checkpoint", counted)
        assert (await graph.aget_state(cfg)).values == want
        assert cold_reads == [], "the thread's checkpoint was not cached again"


@pytest.mark.parametrize("backend", COLD_BACKENDS)
async def test_a_write_behind_delete_appends_outpaced_leaves_the_thread_cached(
    backend: str, stack_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Appends kept landing during each of the backlog discard's tries: the delete gives up
    before any change (`StillWriting`, named for Redis, which answered every call) and the
    thread goes on. Its checkpoint, older than the refused delete, is cached again by the
    next read, not read from the cold tier by every read for the hot TTL under the delete's
    fill fence (Redis is up: the drop that lifts it goes through)."""
    # No try left: as if an append had landed during each of them.
    monkeypatch.setattr(redis_write_behind, "DISCARD_ATTEMPTS", 0)
    settings = settings_for(stack_env, backend, stack_env["REDIS_URL"])
    cfg = config()
    thread_id = cfg["configurable"]["thread_id"]
    async with open_write_behind(settings) as tiers:
        graph = chat_graph(tiers.saver)
        await graph.ainvoke({"messages": ["hello"]}, cfg)
        await tiers.saver.aflush(thread_id)
        want = (await graph.aget_state(cfg)).values
        with pytest.raises(StillWriting) as refused:
            await tiers.saver.adelete_thread(thread_id)
        assert refused.value.backend == "redis"
        assert (await graph.aget_state(cfg)).values == want  # a miss: read cold, cached
        cold_reads: list[str | None] = []
        get_checkpoint = tiers.store.get_checkpoint

        async def counted(thread: str, ns: str, checkpoint_id: str | None, **kwargs: Any) -> Any:
            cold_reads.append(checkpoint_id)
            return await get_checkpoint(thread, ns, checkpoint_id, **kwargs)

        monkeypatch.setattr(tiers.store, "get_checkpoint", counted)
        assert (await graph.aget_state(cfg)).values == want
        assert cold_reads == [], "the thread's checkpoint was not cached again"
