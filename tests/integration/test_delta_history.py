"""DeltaChannel history on every backend and mode: the state rebuilt from the saver's
`get_delta_channel_history` equals LangGraph's InMemorySaver's for the same inputs
(after many invokes, after Redis loses everything, at older checkpoints), and the cold
tiers answer in their bounded round trips (Postgres one statement, Cosmos two sequential
requests whatever the chain's depth)."""

from __future__ import annotations

import asyncio
import operator
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any, TypedDict

import psycopg
import pytest
from langchain_core.runnables import RunnableConfig
from langgraph.channels.delta import DeltaChannel
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, StateGraph
from langgraph.types import Command, interrupt

from state.checkpoint import TieredCheckpointSaver
from state.cold import chunks
from state.hot.redis_client import create_redis_client
from state.ports import StoredBlob, StoredCheckpoint, StoredWrite
from tests.integration.delta_graph import (
    STACK_IDS,
    STACKS,
    append,
    delta_graph,
    open_stack,
    settings_for,
    thread_config,
)
from tests.integration.test_chunked_blobs import cosmos_cold, postgres_cold

INVOKES = 14


async def states(graph: Any, config: RunnableConfig) -> list[tuple[list[str], int | None]]:
    """Every checkpoint's messages (newest first) with its step, as `get_state` rebuilds them
    at that checkpoint."""
    found = []
    async for snapshot in graph.aget_state_history(config):
        at = await graph.aget_state(snapshot.config)
        found.append((at.values.get("messages", []), at.metadata["step"]))
    return found


@pytest.mark.parametrize(("backend", "redis", "mode"), STACKS, ids=STACK_IDS)
async def test_rebuilt_state_matches_in_memory_saver(
    backend: str, redis: bool, mode: str, stack_env: dict[str, str]
) -> None:
    settings = settings_for(stack_env, backend, redis, mode)
    reference = delta_graph(InMemorySaver())
    ref_cfg = thread_config("ref")
    async with open_stack(settings) as opened:
        graph = delta_graph(opened.saver)
        cfg = thread_config()
        thread_id = cfg["configurable"]["thread_id"]
        for n in range(INVOKES):
            got = await graph.ainvoke({"messages": [f"user {n}"]}, cfg)
            want = await reference.ainvoke({"messages": [f"user {n}"]}, ref_cfg)
            assert got == want, n
        assert len(want["messages"]) == 3 * INVOKES
        assert (await graph.aget_state(cfg)).values == (await reference.aget_state(ref_cfg)).values

        # Every older checkpoint, read by id (the cold tier's path, not the cache's).
        assert await states(graph, cfg) == await states(reference, ref_cfg)

        if redis:
            # Redis loses everything (after a flush, so write-behind loses nothing durable).
            await opened.saver.aflush(thread_id)
            client = create_redis_client(settings)
            try:
                await client.flushall()
            finally:
                await client.aclose()
        for n in range(INVOKES, INVOKES + 4):
            got = await graph.ainvoke({"messages": [f"user {n}"]}, cfg)
            want = await reference.ainvoke({"messages": [f"user {n}"]}, ref_cfg)
            assert got == want, n
        assert (await graph.aget_state(cfg)).values == (await reference.aget_state(ref_cfg)).values


@pytest.mark.parametrize(("backend", "redis", "mode"), STACKS, ids=STACK_IDS)
async def test_history_contract(
    backend: str, redis: bool, mode: str, stack_env: dict[str, str]
) -> None:
    """Writes oldest first in writes_sort_key order, the target's own writes left out, the
    seed the nearest stored value; the same answer from the cache and the cold tier."""
    settings = settings_for(stack_env, backend, redis, mode)
    async with open_stack(settings) as opened:
        saver = opened.saver
        graph = delta_graph(saver, snapshot_frequency=4)
        cfg = thread_config()
        for n in range(7):
            await graph.ainvoke({"messages": [f"user {n}"]}, cfg)
        latest = await saver.aget_tuple(cfg)
        assert latest is not None
        got = await saver.aget_delta_channel_history(config=latest.config, channels=["messages"])
        # LangGraph's own walk (one get_tuple per ancestor) over this saver.
        walked = await asyncio.to_thread(
            BaseCheckpointSaver.get_delta_channel_history,
            saver,
            config=latest.config,
            channels=["messages"],
        )
        assert got == walked
        assert "seed" in got["messages"]  # a snapshot is within reach (every 4 updates)
        assert got["messages"]["writes"]
        # Without a cached history (cold tier only), the same answer.
        if saver.cache is not None:
            await saver.aflush(cfg["configurable"]["thread_id"])
            await saver.cache.invalidate(cfg["configurable"]["thread_id"])
        cold = await saver.aget_delta_channel_history(config=latest.config, channels=["messages"])
        assert cold == walked
        empty = await saver.aget_delta_channel_history(
            config={"configurable": {**latest.config["configurable"], "checkpoint_id": "0"}},
            channels=["messages"],
        )
        assert empty == {"messages": {"writes": []}}


@pytest.mark.parametrize(("backend", "redis", "mode"), STACKS, ids=STACK_IDS)
async def test_history_at_an_empty_checkpoint_id_is_the_latest_checkpoints(
    backend: str, redis: bool, mode: str, stack_env: dict[str, str]
) -> None:
    """`checkpoint_id: ""` names no checkpoint (as `get_tuple` and InMemorySaver read it):
    the history asked of it is the latest checkpoint's, not an empty one."""
    settings = settings_for(stack_env, backend, redis, mode)
    async with open_stack(settings) as opened:
        saver = opened.saver
        graph = delta_graph(saver, snapshot_frequency=4)
        cfg = thread_config()
        for n in range(5):
            await graph.ainvoke({"messages": [f"user {n}"]}, cfg)
        latest = await saver.aget_tuple(cfg)
        assert latest is not None
        want = await saver.aget_delta_channel_history(config=latest.config, channels=["messages"])
        assert want["messages"]["writes"]
        blank = {"configurable": {**cfg["configurable"], "checkpoint_id": ""}}
        assert await saver.aget_delta_channel_history(config=blank, channels=["messages"]) == want


@contextmanager
def cosmos_requests() -> Iterator[list[tuple[float, float]]]:
    """(start, end) of every Cosmos HTTP request made inside, at the SDK's transport."""
    from azure.core.pipeline.transport import AioHttpTransport

    spans: list[tuple[float, float]] = []
    send = AioHttpTransport.send

    async def timed(transport: Any, request: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return await send(transport, request, **kwargs)
        finally:
            spans.append((started, time.perf_counter()))

    AioHttpTransport.send = timed  # type: ignore[method-assign]
    try:
        yield spans
    finally:
        AioHttpTransport.send = send  # type: ignore[method-assign]


def sequential(spans: list[tuple[float, float]]) -> int:
    """The longest run of requests each sent after the previous one answered."""
    longest: list[int] = []
    ordered = sorted(spans)
    for n, (start, _) in enumerate(ordered):
        before = [longest[m] for m in range(n) if ordered[m][1] <= start]
        longest.append(1 + max(before, default=0))
    return max(longest, default=0)


@pytest.mark.parametrize("backend", ["postgres", "cosmos"])
async def test_cold_history_round_trips_do_not_grow_with_depth(
    backend: str, stack_env: dict[str, str]
) -> None:
    """The store's own walk: Postgres one statement; Cosmos the lineage query, then the
    chain's writes (and the seed's holder, concurrently), for a short and a long chain.
    A cold load of the thread (get_state, nothing cached) reads the history with the
    checkpoint: Postgres one statement; Cosmos two sequential requests, as without a
    DeltaChannel (the history's range is read with the checkpoint's own writes)."""
    settings = settings_for(stack_env, backend, False, "write-through")
    async with open_stack(settings) as opened:
        counters = opened.backends.cold_counters
        walks, loads = [], []
        for invokes in (3, 30):
            graph = delta_graph(opened.saver, snapshot_frequency=10_000)
            cfg = thread_config()
            for n in range(invokes):
                await graph.ainvoke({"messages": [f"user {n}"]}, cfg)
            latest = await opened.saver.aget_tuple(cfg)
            assert latest is not None
            counters.reset()
            history = await opened.saver.store.delta_history(
                cfg["configurable"]["thread_id"],
                "",
                latest.config["configurable"]["checkpoint_id"],
                ["messages"],
            )
            walks.append(counters.requests)
            # No snapshot in reach: every write from the root, input included.
            assert sum(len(w.value[1]) > 0 for _, w in history["messages"].writes) == 2 * invokes
            assert history["messages"].seed is None

            counters.reset()
            with cosmos_requests() as spans:
                state = await graph.aget_state(cfg)
            assert len(state.values["messages"]) == 3 * invokes
            loads.append(counters.requests if backend == "postgres" else sequential(spans))
        assert walks[0] == walks[1] == (1 if backend == "postgres" else 2)
        assert loads == ([1, 1] if backend == "postgres" else [2, 2])

        # With a snapshot in reach, its holder is read alongside: still the same bounds.
        graph = delta_graph(opened.saver, snapshot_frequency=7)
        cfg = thread_config()
        for n in range(12):
            await graph.ainvoke({"messages": [f"user {n}"]}, cfg)
        latest = await opened.saver.aget_tuple(cfg)
        assert latest is not None
        history = await opened.saver.aget_delta_channel_history(
            config=latest.config, channels=["messages"]
        )
        assert "seed" in history["messages"]
        counters.reset()
        with cosmos_requests() as spans:
            state = await graph.aget_state(cfg)
        assert len(state.values["messages"]) == 36
        assert (counters.requests if backend == "postgres" else sequential(spans)) == (
            1 if backend == "postgres" else 2
        )


@pytest.mark.parametrize("message_bytes", [1024, 24 * 1024], ids=["one-level", "tree"])
@pytest.mark.parametrize("backend", ["postgres", "cosmos"])
async def test_another_process_loads_a_chunked_snapshot_with_its_history(
    backend: str, message_bytes: int, stack_env: dict[str, str]
) -> None:
    """Snapshots are stored as chunks (each stores what the conversation gained since the
    one before), small ones as leaves under the manifest, large ones (over 256 KB) under a
    level of nodes. A process that remembers none of them reads the seed's chunks with the
    history: Postgres in the history's one statement, Cosmos in its second request (one
    query by the blocks' snapshot tag, alongside the writes). A checkpoint that holds a
    snapshot itself: Cosmos reads its blocks alongside its writes (two requests), Postgres
    with one more statement."""
    settings = settings_for(stack_env, backend, False, "write-through")
    cold = (
        postgres_cold(stack_env["POSTGRES_URL"]) if backend == "postgres" else cosmos_cold(settings)
    )
    message = "m" * message_bytes
    reference = delta_graph(InMemorySaver(), snapshot_frequency=7, message=message)
    ref_cfg = thread_config("ref")
    cfg = thread_config()
    thread_id = cfg["configurable"]["thread_id"]
    async with open_stack(settings) as writer:
        graph = delta_graph(writer.saver, snapshot_frequency=7, message=message)
        for n in range(12):
            await graph.ainvoke({"messages": [f"user {n}"]}, cfg)
            await reference.ainvoke({"messages": [f"user {n}"]}, ref_cfg)
        latest = await writer.saver.aget_tuple(cfg)
        assert latest is not None
        holder = None
        async for found in writer.saver.alist(cfg):
            if "messages" in found.checkpoint["channel_values"]:
                holder = found  # the newest checkpoint holding a snapshot
                break
        assert holder is not None
        held = sum(len(m) for m in holder.checkpoint["channel_values"]["messages"].value)
        # Past FANOUT leaves the manifest's roots are nodes: the tree is walked.
        assert (held > chunks.FANOUT * chunks.LEAF_BYTES) is (message_bytes > 1024)
    every, reached = await cold.chunk_sets(thread_id)
    assert reached and reached == every  # the snapshots are manifests over these chunks
    want = (await reference.aget_state(ref_cfg)).values
    async with open_stack(settings) as reader:
        counters = reader.backends.cold_counters
        counters.reset()
        with cosmos_requests() as spans:
            history = await reader.saver.store.delta_history(
                thread_id, "", latest.config["configurable"]["checkpoint_id"], ["messages"]
            )
        assert history["messages"].seed is not None
        assert not history["messages"].seed[0].startswith(chunks.MANIFEST_TYPE_PREFIX)
        assert (counters.requests if backend == "postgres" else sequential(spans)) == (
            1 if backend == "postgres" else 2
        )
        graph = delta_graph(reader.saver, snapshot_frequency=7, message=message)
        counters.reset()
        with cosmos_requests() as spans:
            assert (await graph.aget_state(cfg)).values == want
        # Postgres: this process learns here that the thread has a DeltaChannel (the
        # checkpoint, then its history); Cosmos reads both in two requests from the start.
        assert (counters.requests if backend == "postgres" else sequential(spans)) == 2

        counters.reset()
        with cosmos_requests() as spans:
            at_holder = await reader.saver.aget_tuple(holder.config)
        assert at_holder is not None
        assert at_holder.checkpoint["channel_values"] == holder.checkpoint["channel_values"]
        assert (counters.requests if backend == "postgres" else sequential(spans)) == 2


@pytest.mark.parametrize("mode", ["write-through", "write-behind"])
@pytest.mark.parametrize("backend", ["postgres", "cosmos"])
async def test_warm_load_is_one_round_trip_and_no_cold_request(
    backend: str, mode: str, stack_env: dict[str, str]
) -> None:
    settings = settings_for(stack_env, backend, True, mode)
    async with open_stack(settings) as opened:
        graph = delta_graph(opened.saver)
        cfg = thread_config()
        for n in range(12):
            await graph.ainvoke({"messages": [f"user {n}"]}, cfg)
        await opened.saver.aflush(cfg["configurable"]["thread_id"])
        cache = opened.saver.cache
        assert cache is not None
        hits = cache.stats.hits  # type: ignore[attr-defined]
        calls: list[str] = []
        original = cache.history

        async def counted(*args: Any, **kwargs: Any) -> Any:
            calls.append("history")
            return await original(*args, **kwargs)

        cache.history = counted  # type: ignore[method-assign]
        opened.backends.cold_counters.reset()
        snapshot = await graph.aget_state(cfg)
        assert len(snapshot.values["messages"]) == 36
        assert opened.backends.cold_counters.requests == 0
        # The history came with the cached checkpoint (one HGETALL), no second read.
        assert cache.stats.hits == hits + 1  # type: ignore[attr-defined]
        assert calls == []


@pytest.mark.parametrize(
    ("backend", "redis", "mode"),
    [("postgres", True, "write-through"), ("cosmos", True, "write-behind")],
    ids=["postgres-redis-write-through", "cosmos-redis-write-behind"],
)
@pytest.mark.parametrize("durability", ["exit", "sync"])
async def test_other_durabilities_rebuild_like_in_memory_saver(
    backend: str, redis: bool, mode: str, durability: str, stack_env: dict[str, str]
) -> None:
    """`durability="exit"` stores a run's delta writes at the exit under the checkpoint it
    started from; `"sync"` waits for each write: both rebuild the same state."""
    settings = settings_for(stack_env, backend, redis, mode)
    reference = delta_graph(InMemorySaver(), snapshot_frequency=3)
    ref_cfg = thread_config("ref")
    async with open_stack(settings) as opened:
        graph = delta_graph(opened.saver, snapshot_frequency=3)
        cfg = thread_config()
        for n in range(10):
            got = await graph.ainvoke({"messages": [f"user {n}"]}, cfg, durability=durability)
            want = await reference.ainvoke(
                {"messages": [f"user {n}"]}, ref_cfg, durability=durability
            )
            assert got == want, n
        assert (await graph.aget_state(cfg)).values == (await reference.aget_state(ref_cfg)).values


@pytest.mark.parametrize(("backend", "redis", "mode"), STACKS, ids=STACK_IDS)
async def test_forks_rebuild_only_their_own_branch(
    backend: str, redis: bool, mode: str, stack_env: dict[str, str]
) -> None:
    """A run from an older checkpoint forks the thread: the branch's checkpoints rebuild
    from their own ancestors only, never from the writes of the checkpoints the fork
    left behind (newer ids, in the same range)."""
    settings = settings_for(stack_env, backend, redis, mode)
    reference = delta_graph(InMemorySaver(), snapshot_frequency=4)
    ref_cfg = thread_config("ref")
    async with open_stack(settings) as opened:
        graph = delta_graph(opened.saver, snapshot_frequency=4)
        cfg = thread_config()
        for n in range(6):
            await graph.ainvoke({"messages": [f"user {n}"]}, cfg)
            await reference.ainvoke({"messages": [f"user {n}"]}, ref_cfg)
        ours = [s.config async for s in graph.aget_state_history(cfg)]
        theirs = [s.config async for s in reference.aget_state_history(ref_cfg)]
        assert len(ours) == len(theirs)
        for n in range(6, 10):
            got = await graph.ainvoke({"messages": [f"fork {n}"]}, ours[7])
            want = await reference.ainvoke({"messages": [f"fork {n}"]}, theirs[7])
            assert got == want, n
            # Then the thread goes on from the fork's tip.
            got = await graph.ainvoke({"messages": [f"user {n}"]}, cfg)
            want = await reference.ainvoke({"messages": [f"user {n}"]}, ref_cfg)
            assert got == want, n
        assert await states(graph, cfg) == await states(reference, ref_cfg)


@pytest.mark.parametrize("backend", ["postgres", "cosmos"])
async def test_store_history_follows_the_parent_chain_across_a_fork(
    backend: str, stack_env: dict[str, str]
) -> None:
    """Stored directly (LangGraph snapshots a fork's first checkpoint, so its own runs never
    make this shape): a fork without a snapshot, whose range of ancestors holds a sibling's
    writes. Neither the store's walk nor the history read with the checkpoint takes them."""
    settings = settings_for(stack_env, backend, False, "write-through")
    async with open_stack(settings) as opened:
        store = opened.backends.checkpoints
        thread_id = f"fork-{uuid.uuid4().hex[:8]}"

        def stored(n: int, parent: int | None) -> StoredCheckpoint:
            return StoredCheckpoint(
                thread_id=thread_id,
                checkpoint_ns="",
                checkpoint_id=f"cp-{n:02}",
                parent_checkpoint_id=None if parent is None else f"cp-{parent:02}",
                checkpoint=("json", b"{}"),
                metadata={"counters_since_delta_snapshot": {"messages": [1, 1]}},
                channel_versions={"messages": f"v{n:02}"},
            )

        def write(n: int) -> StoredWrite:
            return StoredWrite(f"t{n}", "~", 0, "messages", ("json", f"[{n}]".encode()))

        seed = ("json", b'"seed"')
        # cp-00 (seed) -> cp-01 -> cp-02 (a sibling), and cp-01 -> cp-03 -> cp-04.
        for n, parent in ((0, None), (1, 0), (2, 1), (3, 1), (4, 3)):
            blobs = [StoredBlob("messages", "v00", seed)] if n == 0 else []
            await store.put_checkpoint(stored(n, parent), blobs)
            await store.put_writes(thread_id, "", f"cp-{n:02}", [write(n)], upsert=False)

        walked = (await store.delta_history(thread_id, "", "cp-04", ["messages"]))["messages"]
        loaded = await store.get_checkpoint(thread_id, "", "cp-04")
        assert loaded is not None and loaded.history is not None
        for history in (walked, loaded.history["messages"]):
            assert sorted(cid for cid, _ in history.writes) == ["cp-00", "cp-01", "cp-03"]
            assert history.seed == seed and history.seed_at == "cp-00"


@pytest.mark.parametrize("backend", ["postgres", "cosmos"])
async def test_write_behind_eviction_with_unflushed_entries(
    backend: str, stack_env: dict[str, str]
) -> None:
    """Write-behind, the flusher stopped so entries wait in the log, then the cache entry is
    evicted: the next load and history come from the cold tier after settling the thread,
    and the rebuilt state includes every unflushed step."""
    settings = settings_for(stack_env, backend, True, "write-behind")
    reference = delta_graph(InMemorySaver(), snapshot_frequency=4)
    ref_cfg = thread_config("ref")
    async with open_stack(settings) as opened:
        flusher = opened.backends.flusher
        assert flusher is not None
        await flusher.stop()
        graph = delta_graph(opened.saver, snapshot_frequency=4)
        cfg = thread_config()
        thread_id = cfg["configurable"]["thread_id"]
        for n in range(5):
            assert await graph.ainvoke({"messages": [f"user {n}"]}, cfg) == await reference.ainvoke(
                {"messages": [f"user {n}"]}, ref_cfg
            )
        assert await flusher.log.pending(thread_id)  # the cold tier lags
        cache = opened.saver.cache
        assert cache is not None
        await cache.invalidate(thread_id)  # evicted
        for n in range(5, 9):
            got = await graph.ainvoke({"messages": [f"user {n}"]}, cfg)
            assert got == await reference.ainvoke({"messages": [f"user {n}"]}, ref_cfg), n
        await opened.saver.aflush(thread_id)
        assert await states(graph, cfg) == await states(reference, ref_cfg)


async def test_postgres_process_that_never_saw_the_thread(stack_env: dict[str, str]) -> None:
    """A process that did not write the thread reads its first checkpoint without the
    history (it cannot know the thread uses a DeltaChannel), asks for it in a statement of
    its own, and from then on reads both in one. The snapshots are stored as chunks (each
    stores what the conversation gained since the one before), and the seed's chunks come
    in those statements too: this process remembers none of them."""
    settings = settings_for(stack_env, "postgres", False, "write-through")
    reference = delta_graph(InMemorySaver(), snapshot_frequency=4)
    ref_cfg = thread_config("ref")
    cfg = thread_config()
    async with open_stack(settings) as writer:
        graph = delta_graph(writer.saver, snapshot_frequency=4)
        for n in range(7):
            await graph.ainvoke({"messages": [f"user {n}"]}, cfg)
            await reference.ainvoke({"messages": [f"user {n}"]}, ref_cfg)
    async with open_stack(settings) as reader:
        graph = delta_graph(reader.saver, snapshot_frequency=4)
        counters = reader.backends.cold_counters
        want = (await reference.aget_state(ref_cfg)).values
        statements = []
        for _ in range(2):
            counters.reset()
            assert (await graph.aget_state(cfg)).values == want
            statements.append(counters.requests)
        assert statements == [2, 1]
    async with await psycopg.AsyncConnection.connect(stack_env["POSTGRES_URL"]) as conn:
        cursor = await conn.execute(
            "SELECT count(*) FROM cp_blobs WHERE thread_id = %s AND type LIKE 'chunked+%%'",
            (cfg["configurable"]["thread_id"],),
        )
        assert await cursor.fetchone() == (2,)


@pytest.mark.parametrize("redis", [False, True], ids=["cold", "redis"])
@pytest.mark.parametrize("backend", ["postgres", "cosmos"])
async def test_a_worker_loading_the_thread_it_writes_does_not_read_the_history_again(
    backend: str, redis: bool, stack_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """While one worker runs a thread, its own chain has the history of the latest
    checkpoint: loading it asks the tier for the checkpoint alone (on Postgres the
    history walk cost 2 of a DeltaChannel invoke's 8 ms; on Cosmos it downloads every
    write back to the snapshot; Redis sent the snapshot of the whole conversation).
    Once another process wrote a newer checkpoint, the worker cannot know that before
    reading: the history comes in a request of its own, and the state is right either
    way."""
    settings = settings_for(stack_env, backend, redis, "write-through")
    reference = delta_graph(InMemorySaver(), snapshot_frequency=4)
    ref_cfg, cfg = thread_config("ref"), thread_config()
    async with open_stack(settings) as worker, open_stack(settings) as other:
        asked: list[str] = []
        store, cache = worker.saver.store, worker.saver.cache
        get_checkpoint, delta_history = store.get_checkpoint, store.delta_history

        async def spy_checkpoint(
            *args: Any, with_history: bool = True, **kwargs: Any
        ) -> StoredCheckpoint | None:
            asked.append("checkpoint with history" if with_history else "checkpoint")
            return await get_checkpoint(*args, with_history=with_history, **kwargs)

        async def spy_history(*args: Any) -> Any:
            asked.append("history")
            return await delta_history(*args)

        monkeypatch.setattr(store, "get_checkpoint", spy_checkpoint)
        monkeypatch.setattr(store, "delta_history", spy_history)
        if cache is not None:
            lookup, cache_history = cache.lookup, cache.history

            async def spy_lookup(*args: Any, with_history: bool = True, **kwargs: Any) -> Any:
                asked.append("cached with history" if with_history else "cached")
                return await lookup(*args, with_history=with_history, **kwargs)

            async def spy_cache_history(*args: Any) -> Any:
                asked.append("cached history")
                return await cache_history(*args)

            monkeypatch.setattr(cache, "lookup", spy_lookup)
            monkeypatch.setattr(cache, "history", spy_cache_history)
        graph = delta_graph(worker.saver, snapshot_frequency=4)
        for n in range(6):
            await graph.ainvoke({"messages": [f"user {n}"]}, cfg)
            await reference.ainvoke({"messages": [f"user {n}"]}, ref_cfg)
        asked.clear()
        assert (await graph.aget_state(cfg)).values == (await reference.aget_state(ref_cfg)).values
        assert asked == (["cached"] if redis else ["checkpoint"])

        await delta_graph(other.saver, snapshot_frequency=4).ainvoke({"messages": ["other"]}, cfg)
        await reference.ainvoke({"messages": ["other"]}, ref_cfg)
        asked.clear()
        assert (await graph.aget_state(cfg)).values == (await reference.aget_state(ref_cfg)).values
        if redis:
            assert asked[:2] == ["cached", "cached history"]
        else:
            assert asked == ["checkpoint", "history"]


def two_questions_graph(saver: BaseCheckpointSaver[Any], snapshot_frequency: int) -> Any:
    """`x`, `y` and `z` in parallel; `y` and `z` each stop on a question the first time."""
    conversation = TypedDict(  # type: ignore[misc]  # noqa: UP013
        "conversation",
        {
            "messages": Annotated[
                list[str], DeltaChannel(append, snapshot_frequency=snapshot_frequency)
            ]
        },
    )

    def asking(name: str) -> Any:
        def node(state: dict[str, list[str]]) -> dict[str, list[str]]:
            if len(state["messages"]) > 2:
                return {"messages": [name]}
            return {"messages": [f"{name}:{interrupt(f'{name}?')}"]}

        return node

    graph = StateGraph(conversation)
    graph.add_node("x", lambda _state: {"messages": ["x"]})
    graph.add_node("y", asking("y"))
    graph.add_node("z", asking("z"))
    for name in ("x", "y", "z"):
        graph.add_edge(START, name)
        graph.add_edge(name, END)
    return graph.compile(checkpointer=saver)


async def answer(graph: Any, config: RunnableConfig, question: str, reply: str) -> Any:
    state = await graph.aget_state(config)
    [asked] = [found for found in state.interrupts if found.value == question]
    return await graph.ainvoke(Command(resume={asked.id: reply}), config)


@pytest.mark.parametrize(("backend", "redis", "mode"), STACKS, ids=STACK_IDS)
async def test_a_write_another_worker_added_to_this_workers_head_is_in_the_next_history(
    backend: str, redis: bool, mode: str, stack_env: dict[str, str]
) -> None:
    """Worker A starts the thread and its step stops on two questions; worker B answers
    one (its task's write lands on A's latest checkpoint, no new checkpoint); A answers
    the other within the minute its chain is trusted. A's chain must not answer for the
    checkpoint that follows: it lacked B's write, so A read, then stored in its next
    snapshot, a conversation without B's answer (found by review; every stack)."""
    settings = settings_for(stack_env, backend, redis, mode)
    frequency = 4
    reference = two_questions_graph(InMemorySaver(), frequency)
    ref_cfg, cfg = thread_config("ref"), thread_config()
    async with open_stack(settings) as a, open_stack(settings) as b:
        on_a, on_b = (
            two_questions_graph(a.saver, frequency),
            two_questions_graph(b.saver, frequency),
        )
        for graph, config in ((on_a, cfg), (reference, ref_cfg)):
            await graph.ainvoke({"messages": ["u0"]}, config)
        for graph, config in ((on_b, cfg), (reference, ref_cfg)):
            await answer(graph, config, "y?", "1")
        for graph, config in ((on_a, cfg), (reference, ref_cfg)):
            await answer(graph, config, "z?", "2")
        for n in range(1, 4):  # on to A's next snapshot
            for graph, config in ((on_a, cfg), (reference, ref_cfg)):
                await graph.ainvoke({"messages": [f"u{n}"]}, config)
            want = sorted((await reference.aget_state(ref_cfg)).values["messages"])
            assert sorted((await on_a.aget_state(cfg)).values["messages"]) == want
    async with open_stack(settings) as fresh:
        got = (await two_questions_graph(fresh.saver, frequency).aget_state(cfg)).values
        assert sorted(got["messages"]) == want


def questions_on_q_graph(saver: BaseCheckpointSaver[Any], nodes: tuple[str, ...]) -> Any:
    """`nodes` in parallel, each asking a question when the last message ends in `Q`."""
    conversation = TypedDict(  # type: ignore[misc]  # noqa: UP013
        "conversation",
        {"messages": Annotated[list[str], DeltaChannel(append, snapshot_frequency=100)]},
    )

    def asking(name: str) -> Any:
        def node(state: dict[str, list[str]]) -> dict[str, list[str]]:
            if state["messages"][-1].endswith("Q"):
                return {"messages": [f"{name}:{interrupt(f'{name}?')}"]}
            return {"messages": [name]}

        return node

    graph = StateGraph(conversation)
    for name in nodes:
        graph.add_node(name, asking(name))
        graph.add_edge(START, name)
        graph.add_edge(name, END)
    return graph.compile(checkpointer=saver)


async def answer_abandoned(graph: Any, config: RunnableConfig, question: str) -> None:
    """Answers `question` at the checkpoint that asked it, long after the thread moved on."""
    async for snapshot in graph.aget_state_history(config):
        if snapshot.interrupts:
            break
    [asked] = [found for found in snapshot.interrupts if found.value == question]
    await graph.ainvoke(Command(resume={asked.id: "late"}), snapshot.config)


@pytest.mark.parametrize("nodes", [("y",), ("y", "z")], ids=["one-question", "two-questions"])
@pytest.mark.parametrize(("backend", "redis", "mode"), STACKS, ids=STACK_IDS)
async def test_an_abandoned_question_answered_later_by_another_worker_joins_the_history(
    backend: str, redis: bool, mode: str, nodes: tuple[str, ...], stack_env: dict[str, str]
) -> None:
    """Worker A's step asks questions, then new input leaves them unanswered; worker B later
    answers one at the checkpoint that asked it. LangGraph rebuilds every later checkpoint
    with that answer (its history walk takes every ancestor's pending writes), and so must
    A, whose chain had moved past that checkpoint: with two questions B's answer puts no
    checkpoint, so nothing A reads shows it (found by a fault hunt; every stack)."""
    settings = settings_for(stack_env, backend, redis, mode)
    reference = questions_on_q_graph(InMemorySaver(), nodes)
    ref_cfg, cfg = thread_config("ref"), thread_config()
    async with open_stack(settings) as a, open_stack(settings) as b:
        on_a, on_b = questions_on_q_graph(a.saver, nodes), questions_on_q_graph(b.saver, nodes)
        heads = []
        for graph, config in ((on_a, cfg), (reference, ref_cfg)):
            for text in ("u0", "u1Q", "u2"):
                await graph.ainvoke({"messages": [text]}, config)
            heads.append((await graph.aget_state(config)).config)
        for graph, config in ((on_b, cfg), (reference, ref_cfg)):
            await answer_abandoned(graph, config, "y?")
        # The checkpoint A put last, by its id; then A's next invoke.
        want = (await reference.aget_state(heads[1])).values["messages"]
        assert sorted((await on_a.aget_state(heads[0])).values["messages"]) == sorted(want)
        want = (await reference.ainvoke({"messages": ["u3"]}, ref_cfg))["messages"]
        assert sorted((await on_a.ainvoke({"messages": ["u3"]}, cfg))["messages"]) == sorted(want)


@pytest.mark.parametrize("redis", [False, True], ids=["cold", "redis"])
@pytest.mark.parametrize("backend", ["postgres", "cosmos"])
async def test_a_worker_whose_thread_another_moved_on_pays_one_more_request_once(
    backend: str, redis: bool, stack_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A started the thread, B ran its next request; A's chain no longer describes the
    latest checkpoint. A's first read learns that (its history then comes apart); from
    then on A reads the checkpoint with its history, one request, as before chains."""
    settings = settings_for(stack_env, backend, redis, "write-through")
    cfg = thread_config()
    async with open_stack(settings) as a, open_stack(settings) as b:
        for n in range(3):
            await delta_graph(a.saver).ainvoke({"messages": [f"u{n}"]}, cfg)
        await delta_graph(b.saver).ainvoke({"messages": ["on b"]}, cfg)
        asked: list[str] = []
        for tier, names in (
            (a.saver.store, ("get_checkpoint", "delta_history")),
            (a.saver.cache, ("lookup", "history")),
        ):
            for name in names if tier is not None else ():
                original = getattr(tier, name)

                def spy(*args: Any, _call: Any = original, _name: str = name, **kw: Any) -> Any:
                    asked.append(_name)
                    return _call(*args, **kw)

                monkeypatch.setattr(tier, name, spy)
        graph = delta_graph(a.saver)
        polls = []
        for _ in range(2):
            asked.clear()
            assert len((await graph.aget_state(cfg)).values["messages"]) == 4 * 3
            polls.append(len(asked))
        assert polls == [2, 1]


@pytest.mark.parametrize(("backend", "redis", "mode"), STACKS, ids=STACK_IDS)
async def test_a_thread_written_with_a_plain_list_continues_as_a_delta_channel(
    backend: str, redis: bool, mode: str, stack_env: dict[str, str]
) -> None:
    """A graph that switches its list to a DeltaChannel reads the list stored before as
    the seed (what an app switching its conversation to a DeltaChannel relies on)."""

    class Plain(TypedDict):
        messages: Annotated[list[str], operator.add]

    def reply(state: Plain) -> dict[str, list[str]]:
        n = len(state["messages"])
        return {"messages": [f"a{n}", f"b{n}"]}

    def plain_graph(saver: BaseCheckpointSaver[Any]) -> Any:
        builder = StateGraph(Plain)
        builder.add_node("reply", reply)
        builder.add_edge(START, "reply")
        builder.add_edge("reply", END)
        return builder.compile(checkpointer=saver)

    reference = InMemorySaver()
    ref_cfg = thread_config("ref")
    async with open_stack(settings_for(stack_env, backend, redis, mode)) as opened:
        cfg = thread_config()
        for before, after in ((plain_graph, plain_graph), (delta_graph, delta_graph)):
            for n in range(4):
                got = await before(opened.saver).ainvoke({"messages": [f"user {n}"]}, cfg)
                want = await after(reference).ainvoke({"messages": [f"user {n}"]}, ref_cfg)
                assert got == want, n
        assert len(got["messages"]) == 24
        await opened.saver.aflush(cfg["configurable"]["thread_id"])
        # Read again from a fresh process's view: the cold tier's history alone.
        cold_only = TieredCheckpointSaver(opened.backends.checkpoints)
        state = await delta_graph(cold_only).aget_state(cfg)
        assert state.values["messages"] == got["messages"]


@pytest.mark.parametrize(("backend", "redis", "mode"), STACKS, ids=STACK_IDS)
async def test_a_copied_checkpoint_keeps_the_values_its_parent_does_not_hold(
    backend: str, redis: bool, mode: str, stack_env: dict[str, str]
) -> None:
    """`update_state(config, None, as_node="__copy__")` puts an older checkpoint's versions
    under that checkpoint's parent, with no new versions: the values that changed at the
    copied checkpoint (the graph input's `__start__`, a DeltaChannel snapshot) are held by
    no ancestor of the copy. Cosmos inherited values from the parent only: the copy of an
    input checkpoint lost its input (it ran nothing), and the copy of a snapshot rebuilt
    its conversation from the parent's chain, which prune(keep_latest) then deleted (the
    copy's counters say it holds the snapshot): 0 messages."""
    settings = settings_for(stack_env, backend, redis, mode)
    reference = delta_graph(InMemorySaver(), snapshot_frequency=2, message="m" * 64)
    ref_cfg = thread_config("ref")
    async with open_stack(settings) as opened:
        graph = delta_graph(opened.saver, snapshot_frequency=2, message="m" * 64)
        cfg = thread_config()
        thread_id = cfg["configurable"]["thread_id"]
        for n in range(4):
            await graph.ainvoke({"messages": [f"user {n}"]}, cfg)
            await reference.ainvoke({"messages": [f"user {n}"]}, ref_cfg)
        ours = [s.config async for s in graph.aget_state_history(cfg)]
        theirs = [s.config async for s in reference.aget_state_history(ref_cfg)]
        assert len(ours) == len(theirs)
        snapshots = []
        for n, (mine, ref) in enumerate(zip(ours, theirs, strict=True)):
            stored = await reference.checkpointer.aget_tuple(ref)
            assert stored is not None
            if "messages" in stored.checkpoint["channel_values"]:
                snapshots.append(n)
            copied = await graph.aupdate_state(mine, None, as_node="__copy__")
            ref_copied = await reference.aupdate_state(ref, None, as_node="__copy__")
            got, want = await graph.aget_state(copied), await reference.aget_state(ref_copied)
            assert (got.values, got.next) == (want.values, want.next), n
            # Run on from the copy (the input's run, when it copied an input checkpoint).
            got_run = await graph.ainvoke(None, cfg)
            assert got_run == await reference.ainvoke(None, ref_cfg), n
        assert snapshots  # a snapshot was among the copied checkpoints
        # The copy of a snapshot as the thread's latest, then pruned to it.
        await graph.aupdate_state(ours[snapshots[0]], None, as_node="__copy__")
        await reference.aupdate_state(theirs[snapshots[0]], None, as_node="__copy__")
        want = (await reference.aget_state(ref_cfg)).values
        assert want["messages"]
        await opened.saver.aprune([thread_id], strategy="keep_latest")
        assert (await graph.aget_state(cfg)).values == want
        if redis:
            await opened.saver.aflush(thread_id)
            client = create_redis_client(settings)
            try:
                await client.flushall()
            finally:
                await client.aclose()
        cold = delta_graph(TieredCheckpointSaver(opened.backends.checkpoints), snapshot_frequency=2)
        assert (await cold.aget_state(cfg)).values == want
        got = await graph.ainvoke({"messages": ["after"]}, cfg)
        assert got == await reference.ainvoke({"messages": ["after"]}, ref_cfg)
