"""The tiered checkpoint saver on real servers: cost of reads, what a step writes, paging,
size limits, hot-tier loss and failure, namespaces, and synchronous use."""

from __future__ import annotations

import asyncio
import json
import operator
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any, TypedDict

import pytest
import redis.asyncio as aioredis
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import empty_checkpoint
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, StateGraph
from langgraph.graph.state import CompiledStateGraph
from langgraph.types import Command, interrupt

from devstack import RedisServer, free_port
from state.checkpoint import TieredCheckpointSaver
from state.cold.cosmos_checkpoints import CosmosCheckpointStore
from state.cold.cosmos_client import CosmosConnection
from state.errors import StateError
from state.hot.redis_checkpoints import RedisCheckpointCache
from state.hot.redis_client import create_redis_client, hot_namespace
from state.ports import StoredBlob, StoredCheckpoint
from state.settings import Settings
from tests.support.cosmos import partition
from tests.support.redis_round_trips import RedisRoundTrips

COSMOS_ITEM_LIMIT = 2 * 1024 * 1024

# --------------------------------------------------------------------------- the case graph


class CaseState(TypedDict, total=False):
    case_id: str
    amount: float
    completed_steps: Annotated[list[str], operator.add]
    refund: float
    decision: str
    reply: str


def build_case_graph(
    checkpointer: TieredCheckpointSaver | InMemorySaver, *, review_over: float = 500.0
) -> CompiledStateGraph[Any, Any, Any, Any]:
    """intake -> billing || account -> policy (human review over a threshold) -> response."""

    def intake(state: CaseState) -> CaseState:
        return {"completed_steps": ["intake"]}

    def billing(state: CaseState) -> CaseState:
        return {"completed_steps": ["billing"], "refund": state["amount"]}

    def account(state: CaseState) -> CaseState:
        return {"completed_steps": ["account"]}

    def policy(state: CaseState) -> CaseState:
        decision = "auto-approved"
        if state["refund"] > review_over:
            decision = interrupt({"refund": state["refund"], "question": "approve refund?"})
        return {"completed_steps": ["policy"], "decision": decision}

    def response(state: CaseState) -> CaseState:
        return {"completed_steps": ["response"], "reply": f"refund {state['decision']}"}

    graph = StateGraph(CaseState)
    for name, node in [
        ("intake", intake),
        ("billing", billing),
        ("account", account),
        ("policy", policy),
        ("response", response),
    ]:
        graph.add_node(name, node)
    graph.add_edge(START, "intake")
    graph.add_edge("intake", "billing")
    graph.add_edge("intake", "account")
    graph.add_edge(["billing", "account"], "policy")
    graph.add_edge("policy", "response")
    graph.add_edge("response", END)
    return graph.compile(checkpointer=checkpointer)


def case_input(amount: float) -> CaseState:
    return {"case_id": "case_8842", "amount": amount, "completed_steps": []}


def thread_config(thread_id: str | None = None) -> RunnableConfig:
    return {"configurable": {"thread_id": thread_id or f"cp-{uuid.uuid4().hex[:12]}"}}


ALL_STEPS = sorted(["intake", "billing", "account", "policy", "response"])

# --------------------------------------------------------------------------- tiers


@dataclass
class Tiers:
    connection: CosmosConnection
    store: CosmosCheckpointStore
    saver: TieredCheckpointSaver
    cache: RedisCheckpointCache | None
    redis: aioredis.Redis | None
    redis_calls: RedisRoundTrips

    def reset_counts(self) -> None:
        self.connection.counters.reset()
        self.redis_calls.reset()

    @property
    def cosmos_requests(self) -> int:
        return self.connection.counters.requests


def make_settings(stack_env: dict[str, str], **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "cosmos_endpoint": stack_env["COSMOS_ENDPOINT"],
        "cosmos_key": stack_env["COSMOS_KEY"],
        "cosmos_create_if_missing": True,
        "redis_url": stack_env["REDIS_URL"],
    }
    values.update(overrides)
    return Settings.model_validate(values)


@asynccontextmanager
async def open_tiers(
    settings: Settings, *, hot: bool = True, page_size: int = 50
) -> AsyncIterator[Tiers]:
    """The saver over its adapters, built directly so the test can count their requests."""
    connection = CosmosConnection(settings.cosmos)
    redis = create_redis_client(settings) if hot else None
    undo: list[Callable[[], None]] = []
    try:
        store = CosmosCheckpointStore(
            connection,
            max_item_bytes=settings.state_max_item_bytes,
            compress_threshold_bytes=settings.state_compress_threshold_bytes,
            page_size=page_size,
        )
        await store.setup()
        calls = RedisRoundTrips()
        cache = None
        if redis is not None:
            undo.append(calls.watch(redis))
            cache = RedisCheckpointCache(
                redis,
                namespace=hot_namespace(settings),
                ttl_seconds=settings.state_hot_ttl_seconds,
            )
        yield Tiers(connection, store, TieredCheckpointSaver(store, cache), cache, redis, calls)
    finally:
        for unwatch in undo:
            unwatch()
        if redis is not None:
            await redis.aclose()
        await connection.close()


@pytest.fixture
def settings(stack_env: dict[str, str]) -> Settings:
    return make_settings(stack_env)


@pytest.fixture
async def tiers(settings: Settings) -> AsyncIterator[Tiers]:
    async with open_tiers(settings) as opened:
        yield opened


def stored_values(docs: list[dict[str, Any]]) -> int:
    """Channel values held by a thread's documents (checkpoints and values holders)."""
    return sum(len(doc.get("values") or {}) for doc in docs)


# --------------------------------------------------------------------------- O(1) latest


async def test_warm_latest_read_is_one_redis_round_trip_and_no_cosmos_request(
    tiers: Tiers,
) -> None:
    graph = build_case_graph(tiers.saver)
    config = thread_config()
    await graph.ainvoke(case_input(120.0), config)
    # The first read on a Redis loads its script (a NoScript answer, then SCRIPT LOAD):
    # once per server, not per read. Run alone, this test is that first read.
    await tiers.saver.aget_tuple(config)

    tiers.reset_counts()
    warm = await tiers.saver.aget_tuple(config)

    assert tiers.cosmos_requests == 0
    assert tiers.redis_calls.count == 1
    assert warm is not None
    assert sorted(warm.checkpoint["channel_values"]["completed_steps"]) == ALL_STEPS
    # The hot copy is the same tuple the cold tier holds.
    cold = await TieredCheckpointSaver(tiers.store).aget_tuple(config)
    assert cold is not None
    assert warm.config == cold.config
    assert warm.checkpoint == cold.checkpoint
    assert warm.metadata == cold.metadata
    assert warm.parent_config == cold.parent_config
    assert warm.pending_writes == cold.pending_writes


async def test_cold_reads_cost_at_most_two_cosmos_round_trips(settings: Settings) -> None:
    async with open_tiers(settings, hot=False) as tiers:
        graph = build_case_graph(tiers.saver)
        config = thread_config()
        await graph.ainvoke(case_input(120.0), config)
        history = [t async for t in tiers.saver.alist(config)]
        assert len(history) >= 5

        tiers.reset_counts()
        latest = await tiers.saver.aget_tuple(config)
        assert latest is not None and latest.checkpoint["id"] == history[0].checkpoint["id"]
        assert tiers.cosmos_requests <= 2

        for older in history[1:4]:
            tiers.reset_counts()
            by_id = await tiers.saver.aget_tuple(older.config)
            assert by_id is not None and by_id.checkpoint == older.checkpoint
            assert tiers.cosmos_requests <= 2

        tiers.reset_counts()
        assert await tiers.saver.aget_tuple(thread_config()) is None
        assert tiers.cosmos_requests <= 1


async def test_an_invoke_costs_one_request_per_put_and_per_put_writes(settings: Settings) -> None:
    """Plus one for the latest read that starts it (was 26 for the benchmark's 4-node graph)."""
    async with open_tiers(settings, hot=False) as tiers:
        calls = {"put": 0, "put_writes": 0}
        put_checkpoint, put_writes = tiers.store.put_checkpoint, tiers.store.put_writes

        async def counted_put(*args: Any, **kwargs: Any) -> None:
            calls["put"] += 1
            await put_checkpoint(*args, **kwargs)

        async def counted_writes(*args: Any, **kwargs: Any) -> None:
            calls["put_writes"] += 1
            await put_writes(*args, **kwargs)

        tiers.store.put_checkpoint = counted_put  # type: ignore[method-assign]
        tiers.store.put_writes = counted_writes  # type: ignore[method-assign]
        graph = build_case_graph(tiers.saver)
        await graph.ainvoke(case_input(120.0), thread_config())  # warm the connection
        calls.update(put=0, put_writes=0)
        tiers.reset_counts()
        done = await graph.ainvoke(case_input(120.0), thread_config())
        assert sorted(done["completed_steps"]) == ALL_STEPS
        assert calls == {"put": 6, "put_writes": 6}
        assert tiers.cosmos_requests == 1 + 6 + 6


async def test_a_hot_miss_reads_cold_once_then_serves_from_redis(tiers: Tiers) -> None:
    graph = build_case_graph(tiers.saver)
    config = thread_config()
    await graph.ainvoke(case_input(120.0), config)
    assert tiers.cache is not None
    await tiers.cache.invalidate(config["configurable"]["thread_id"])

    tiers.reset_counts()
    first = await tiers.saver.aget_tuple(config)
    assert 0 < tiers.cosmos_requests <= 2

    tiers.reset_counts()
    second = await tiers.saver.aget_tuple(config)
    assert tiers.cosmos_requests == 0
    assert first is not None and second is not None
    assert second.checkpoint == first.checkpoint
    assert second.pending_writes == first.pending_writes


# --------------------------------------------------------------------------- what a step writes


class LedgerState(TypedDict, total=False):
    ledger: list[str]  # large, written once
    notes: Annotated[list[str], operator.add]


async def test_a_step_writes_only_the_channels_it_changed(tiers: Tiers) -> None:
    written: list[list[str]] = []
    put_checkpoint = tiers.store.put_checkpoint

    async def recording(checkpoint: StoredCheckpoint, blobs: Any) -> None:
        written.append(sorted(blob.channel for blob in blobs))
        await put_checkpoint(checkpoint, blobs)

    tiers.store.put_checkpoint = recording  # type: ignore[method-assign]

    def load(state: LedgerState) -> LedgerState:
        return {"ledger": [f"entry {i} " + "x" * 200 for i in range(200)], "notes": ["loaded"]}

    def note(name: str) -> Callable[[LedgerState], LedgerState]:
        return lambda state: {"notes": [name]}

    graph = StateGraph(LedgerState)
    graph.add_node("load", load)
    for name in ("check", "summarise", "close"):
        graph.add_node(name, note(name))
    graph.add_edge(START, "load")
    graph.add_edge("load", "check")
    graph.add_edge("check", "summarise")
    graph.add_edge("summarise", "close")
    graph.add_edge("close", END)
    config = thread_config()
    await graph.compile(checkpointer=tiers.saver).ainvoke({"notes": []}, config)

    # The large ledger is stored once, in the step that wrote it, never again.
    assert sum(channels.count("ledger") for channels in written) == 1
    assert all(channels.count("notes") <= 1 for channels in written)
    docs = await partition(tiers.connection, config["configurable"]["thread_id"])
    holding_ledger = [d for d in docs if "ledger" in (d.get("values") or {})]
    assert len(holding_ledger) == 1
    # Every checkpoint still reads back complete, from blobs of different steps.
    cold = TieredCheckpointSaver(tiers.store)
    history = [t async for t in cold.alist(config)]
    assert len(history) == len(written)
    assert history[0].checkpoint["channel_values"]["notes"] == [
        "loaded",
        "check",
        "summarise",
        "close",
    ]
    assert len(history[0].checkpoint["channel_values"]["ledger"]) == 200


# --------------------------------------------------------------------------- list paging


async def test_list_pages_through_a_long_thread_without_loading_it(settings: Settings) -> None:
    async with open_tiers(settings, hot=False, page_size=10) as tiers:
        saver = tiers.saver
        thread_id = f"cp-{uuid.uuid4().hex[:12]}"
        config: RunnableConfig = {"configurable": {"thread_id": thread_id, "checkpoint_ns": ""}}
        ids = []
        for step in range(125):
            checkpoint = empty_checkpoint()
            checkpoint["channel_values"] = {"step": step, "log": [f"line {step}"] * 3}
            checkpoint["channel_versions"] = {"step": step + 1, "log": step + 1}
            stored = await saver.aput(
                config,
                checkpoint,
                {"source": "loop", "step": step, "parity": step % 2},
                {"step": step + 1, "log": step + 1},
            )
            config = {"configurable": {**stored["configurable"]}}
            ids.append(checkpoint["id"])
        base: RunnableConfig = {"configurable": {"thread_id": thread_id}}

        # Reading the first few costs one page (+ its blobs and writes), not the thread.
        tiers.reset_counts()
        listing = saver.alist(base)
        first = [await anext(listing) for _ in range(5)]
        await listing.aclose()
        assert [t.checkpoint["id"] for t in first] == ids[::-1][:5]
        assert tiers.cosmos_requests <= 3

        tiers.reset_counts()
        everything = [t async for t in saver.alist(base)]
        assert [t.checkpoint["id"] for t in everything] == ids[::-1]
        assert everything[0].checkpoint["channel_values"]["log"] == ["line 124"] * 3
        # 13 pages of 10 (each with one query for its values): paged, not one big read.
        assert tiers.cosmos_requests >= 13

        before = [t async for t in saver.alist(base, before=first[2].config, limit=4)]
        assert [t.checkpoint["id"] for t in before] == ids[::-1][3:7]

        filtered = [t async for t in saver.alist(base, filter={"parity": 1}, limit=15)]
        assert len(filtered) == 15
        assert all(t.metadata["parity"] == 1 for t in filtered)
        assert [t.metadata["step"] for t in filtered] == list(range(123, 93, -2))


# --------------------------------------------------------------------------- size limits


@asynccontextmanager
async def item_size_guard(tiers: Tiers) -> AsyncIterator[list[int]]:
    """Fails any document write over Cosmos's 2 MB item limit (the emulator does not)."""
    container = await tiers.connection.container()
    sizes: list[int] = []
    originals = {
        name: getattr(container, name) for name in ("upsert_item", "create_item", "replace_item")
    }

    def guarded(call: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def write(*args: Any, **kwargs: Any) -> Any:
            body = kwargs.get("body", args[-1] if args else None)
            size = len(json.dumps(body).encode())
            sizes.append(size)
            assert size <= COSMOS_ITEM_LIMIT, f"a {size}-byte document would exceed 2 MB"
            return await call(*args, **kwargs)

        return write

    for name, call in originals.items():
        setattr(container, name, guarded(call))
    try:
        yield sizes
    finally:
        for name, call in originals.items():
            setattr(container, name, call)


async def test_a_5_mb_value_is_chunked_under_the_item_limit_and_read_back_intact(
    tiers: Tiers,
) -> None:
    huge = os.urandom(5 * 1024 * 1024)  # incompressible: must be split, not just compressed
    huge_text = "support transcript line\n" * 220_000  # ~5 MB that compresses
    config: RunnableConfig = {"configurable": {"thread_id": f"cp-{uuid.uuid4().hex[:12]}"}}
    config["configurable"]["checkpoint_ns"] = ""
    checkpoint = empty_checkpoint()
    checkpoint["channel_values"] = {"attachment": huge, "transcript": huge_text}
    checkpoint["channel_versions"] = {"attachment": 1, "transcript": 1}
    async with item_size_guard(tiers) as sizes:
        stored = await tiers.saver.aput(
            config, checkpoint, {"source": "input", "step": -1}, {"attachment": 1, "transcript": 1}
        )
        await tiers.saver.aput_writes(stored, [("attachment", huge)], "task-1")
    assert max(sizes) > 1_000_000  # the guard saw the chunks

    cold = await TieredCheckpointSaver(tiers.store).aget_tuple(stored)
    warm = await tiers.saver.aget_tuple(stored)
    for read in (cold, warm):
        assert read is not None
        assert read.checkpoint["channel_values"]["attachment"] == huge
        assert read.checkpoint["channel_values"]["transcript"] == huge_text
        assert read.pending_writes == [("task-1", "attachment", huge)]
    docs = await partition(tiers.connection, config["configurable"]["thread_id"])
    assert max(len(json.dumps(doc).encode()) for doc in docs) <= COSMOS_ITEM_LIMIT
    assert sum(doc["type"] == "checkpoint_chunk" for doc in docs) >= 4


# --------------------------------------------------------------------------- hot tier loss


async def test_an_interrupt_survives_redis_losing_every_key(
    stack_env: dict[str, str], own_redis: RedisServer
) -> None:
    hot_settings = make_settings(stack_env, redis_url=own_redis.url)
    config = thread_config()
    async with open_tiers(hot_settings) as tiers:
        graph = build_case_graph(tiers.saver)
        paused = await graph.ainvoke(case_input(1250.0), config)
        assert paused["__interrupt__"][0].value["refund"] == 1250.0
        assert tiers.redis is not None
        await tiers.redis.flushall()

    # A fresh process (new clients) after the hot tier lost everything.
    async with open_tiers(hot_settings) as tiers:
        graph = build_case_graph(tiers.saver)
        state = await graph.aget_state(config)
        assert state.next == ("policy",)
        assert state.tasks[0].interrupts[0].value["refund"] == 1250.0
        done = await graph.ainvoke(Command(resume="approved by reviewer"), config)
    assert done["decision"] == "approved by reviewer"
    assert sorted(done["completed_steps"]) == ALL_STEPS


async def test_an_interrupt_survives_a_redis_restart(
    stack_env: dict[str, str], own_redis: RedisServer
) -> None:
    hot_settings = make_settings(stack_env, redis_url=own_redis.url)
    config = thread_config()
    async with open_tiers(hot_settings) as tiers:
        graph = build_case_graph(tiers.saver)
        await graph.ainvoke(case_input(900.0), config)
        own_redis.stop()  # no persistence configured: the restart comes back empty
        own_redis.start()
        assert tiers.cache is not None
        done = await graph.ainvoke(Command(resume="approved"), config)
    assert done["decision"] == "approved"
    assert sorted(done["completed_steps"]) == ALL_STEPS


async def test_redis_failures_never_fail_the_saver(stack_env: dict[str, str]) -> None:
    dead = make_settings(stack_env, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    async with open_tiers(dead) as tiers:
        graph = build_case_graph(tiers.saver)
        config = thread_config()
        paused = await graph.ainvoke(case_input(700.0), config)
        assert "__interrupt__" in paused
        done = await graph.ainvoke(Command(resume="approved"), config)
        assert sorted(done["completed_steps"]) == ALL_STEPS
        assert (await tiers.saver.aget_tuple(config)) is not None
        assert tiers.cache is not None and tiers.cache.stats.errors > 0
        assert tiers.cache.stats.hits == 0


async def test_an_unreadable_cache_entry_is_dropped_and_read_from_cold(tiers: Tiers) -> None:
    config = thread_config()
    await build_case_graph(tiers.saver).ainvoke(case_input(30.0), config)
    assert tiers.redis is not None and tiers.cache is not None
    key = tiers.cache.key(config["configurable"]["thread_id"], "")
    await tiers.redis.hset(key, "cp", b"\x00\x00\x00\xffcut short")

    latest = await tiers.saver.aget_tuple(config)

    assert latest is not None
    assert sorted(latest.checkpoint["channel_values"]["completed_steps"]) == ALL_STEPS
    assert tiers.cache.stats.errors == 1
    assert await tiers.redis.hget(key, "cp") is None  # dropped; the next read refills it


async def test_writes_that_arrive_before_their_checkpoint_is_cached_are_not_lost(
    tiers: Tiers,
) -> None:
    """LangGraph saves a step's writes concurrently with its checkpoint (durability async)."""
    saver = tiers.saver
    base: RunnableConfig = {"configurable": {"thread_id": f"cp-{uuid.uuid4().hex[:12]}"}}
    base["configurable"]["checkpoint_ns"] = ""
    first = empty_checkpoint()
    parent = await saver.aput(base, first, {"source": "input", "step": -1}, {})
    second = empty_checkpoint()
    second_config: RunnableConfig = {
        "configurable": {**parent["configurable"], "checkpoint_id": second["id"]}
    }
    await saver.aput_writes(second_config, [("notes", "early")], "task-early")
    await saver.aput(parent, second, {"source": "loop", "step": 0}, {})

    latest = await saver.aget_tuple(base)
    assert latest is not None and latest.checkpoint["id"] == second["id"]
    assert latest.pending_writes == [("task-early", "notes", "early")]
    again = await saver.aget_tuple(base)  # now filled from the cold tier
    assert again is not None and again.pending_writes == latest.pending_writes


async def test_a_fill_lease_is_revoked_by_a_write_meanwhile(tiers: Tiers) -> None:
    assert tiers.cache is not None
    saver = tiers.saver
    base: RunnableConfig = {"configurable": {"thread_id": f"cp-{uuid.uuid4().hex[:12]}"}}
    base["configurable"]["checkpoint_ns"] = ""
    stored = await saver.aput(base, empty_checkpoint(), {"source": "input", "step": -1}, {})
    thread_id = base["configurable"]["thread_id"]
    await tiers.cache.invalidate(thread_id)

    # A reader misses and takes a lease, then reads the cold tier ...
    lookup = await tiers.cache.lookup(thread_id, "", lease=True)
    assert lookup.checkpoint is None and lookup.lease is not None
    before_write = await tiers.store.get_checkpoint(thread_id, "", None)
    assert before_write is not None
    # ... a write lands meanwhile ...
    await saver.aput_writes(stored, [("notes", "late")], "task-late")
    # ... so its (older) fill must not be installed.
    await tiers.cache.fill(before_write, lookup.lease)
    latest = await saver.aget_tuple(base)
    assert latest is not None and latest.pending_writes == [("task-late", "notes", "late")]


async def test_the_cache_never_moves_backwards(tiers: Tiers) -> None:
    assert tiers.cache is not None
    saver = tiers.saver
    base: RunnableConfig = {"configurable": {"thread_id": f"cp-{uuid.uuid4().hex[:12]}"}}
    base["configurable"]["checkpoint_ns"] = ""
    old, new = empty_checkpoint(), empty_checkpoint()
    old["channel_values"], old["channel_versions"] = {"v": ["old"]}, {"v": 1}
    new["channel_values"], new["channel_versions"] = {"v": ["new"]}, {"v": 2}
    first = await saver.aput(base, old, {"source": "input", "step": -1}, {"v": 1})
    await saver.aput(first, new, {"source": "loop", "step": 0}, {"v": 2})
    # A late, out-of-order advance of the older checkpoint is refused by the Lua compare.
    thread_id = base["configurable"]["thread_id"]
    stale = await tiers.store.get_checkpoint(thread_id, "", old["id"])
    assert stale is not None
    await tiers.cache.advance(stale, [StoredBlob("v", 1, saver.serde.dumps_typed(["old"]))])
    tiers.reset_counts()
    latest = await saver.aget_tuple(base)
    assert tiers.cosmos_requests == 0
    assert latest is not None and latest.checkpoint["channel_values"]["v"] == ["new"]


# --------------------------------------------------------------------------- namespaces


class OuterState(TypedDict, total=False):
    topic: str
    trail: Annotated[list[str], operator.add]


async def test_subgraph_namespaces_checkpoint_interrupt_and_resume(tiers: Tiers) -> None:
    def draft(state: OuterState) -> OuterState:
        return {"trail": ["draft"]}

    def review(state: OuterState) -> OuterState:
        verdict = interrupt("review the draft")
        return {"trail": [f"review:{verdict}"]}

    inner = StateGraph(OuterState)
    inner.add_node("draft", draft)
    inner.add_node("review", review)
    inner.add_edge(START, "draft")
    inner.add_edge("draft", "review")
    inner.add_edge("review", END)

    outer = StateGraph(OuterState)
    outer.add_node("start", lambda state: {"trail": ["start"]})
    outer.add_node("writer", inner.compile())
    outer.add_node("finish", lambda state: {"trail": ["finish"]})
    outer.add_edge(START, "start")
    outer.add_edge("start", "writer")
    outer.add_edge("writer", "finish")
    outer.add_edge("finish", END)
    graph = outer.compile(checkpointer=tiers.saver)
    reference = outer.compile(checkpointer=InMemorySaver())
    config = thread_config()

    await graph.ainvoke({"topic": "refund", "trail": []}, config)
    await reference.ainvoke({"topic": "refund", "trail": []}, config)
    state = await graph.aget_state(config, subgraphs=True)
    assert state.next == ("writer",)
    sub_state = state.tasks[0].state
    assert sub_state is not None and sub_state.next == ("review",)  # type: ignore[union-attr]
    child_ns = sub_state.config["configurable"]["checkpoint_ns"]  # type: ignore[union-attr]
    assert child_ns.startswith("writer:")
    namespaces = {
        t.config["configurable"]["checkpoint_ns"]
        async for t in tiers.saver.alist(
            {"configurable": {"thread_id": config["configurable"]["thread_id"]}}
        )
    }
    assert namespaces == {"", child_ns}
    root_only = [
        t
        async for t in tiers.saver.alist(
            {**config, "configurable": {**config["configurable"], "checkpoint_ns": ""}}
        )
    ]
    assert {t.config["configurable"]["checkpoint_ns"] for t in root_only} == {""}

    done = await graph.ainvoke(Command(resume="ok"), config)
    assert done == await reference.ainvoke(Command(resume="ok"), config)
    assert done["trail"][-2:] == ["review:ok", "finish"]


# --------------------------------------------------------------------------- sync use


def test_a_saver_built_outside_any_loop_without_one_is_refused_with_a_typed_error(
    settings: Settings,
) -> None:
    """No running loop and none named: the stores' loop is unknown, so no call could be
    handed to it. Refused as the library's own error (also the `asyncio.InvalidStateError`
    it was), saying what to do instead."""
    with TieredCheckpointSaver.open_sync(settings) as opened:
        with pytest.raises(StateError, match="open_sync") as refused:
            TieredCheckpointSaver(opened.store)
        assert isinstance(refused.value, asyncio.InvalidStateError)


def test_purely_synchronous_use_with_a_saver_owned_loop(settings: Settings) -> None:
    with TieredCheckpointSaver.open_sync(settings) as saver:
        graph = build_case_graph(saver)
        config = thread_config()
        paused = graph.invoke(case_input(800.0), config)
        assert paused["__interrupt__"][0].value["refund"] == 800.0
        done = graph.invoke(Command(resume="approved"), config)
        assert sorted(done["completed_steps"]) == ALL_STEPS
        history = list(saver.list(config, limit=3))
        assert len(history) == 3
        assert saver.get_tuple(config) is not None
        saver.delete_thread(config["configurable"]["thread_id"])
        assert saver.get_tuple(config) is None


async def test_sync_invoke_from_a_worker_thread_uses_the_saver_loop(tiers: Tiers) -> None:
    graph = build_case_graph(tiers.saver)
    config = thread_config()
    done = await asyncio.to_thread(graph.invoke, case_input(50.0), config)
    assert sorted(done["completed_steps"]) == ALL_STEPS
    resumed = await graph.aget_state(config)
    assert resumed.values["reply"] == "refund auto-approved"
    # On the saver's own loop a blocking call would deadlock: it refuses instead.
    with pytest.raises(asyncio.InvalidStateError):
        tiers.saver.get_tuple(config)


async def test_async_calls_from_another_loop_are_handed_to_the_saver_loop(tiers: Tiers) -> None:
    config = thread_config()
    await build_case_graph(tiers.saver).ainvoke(case_input(10.0), config)

    def other_loop() -> tuple[int, list[str]]:
        async def read() -> tuple[int, list[str]]:
            history = [t async for t in tiers.saver.alist(config)]
            latest = await tiers.saver.aget_tuple(config)
            assert latest is not None
            return len(history), latest.checkpoint["channel_values"]["completed_steps"]

        return asyncio.run(read())

    count, steps = await asyncio.to_thread(other_loop)
    assert count >= 5 and sorted(steps) == ALL_STEPS


# --------------------------------------------------------------------------- maintenance


async def test_prune_keeps_the_latest_and_drops_unreferenced_blobs(tiers: Tiers) -> None:
    graph = build_case_graph(tiers.saver)
    config = thread_config()
    await graph.ainvoke(case_input(75.0), config)
    thread_id = config["configurable"]["thread_id"]
    before = await partition(tiers.connection, thread_id)
    latest = await tiers.saver.aget_tuple(config)

    await tiers.saver.aprune([thread_id], strategy="keep_latest")

    after = await partition(tiers.connection, thread_id)
    [kept] = [d for d in after if d["type"] == "checkpoint"]
    assert stored_values(after) < stored_values(before)
    # What stays besides the checkpoint holds values it still names, nothing else.
    holders = {d["id"] for d in after if d["type"] == "checkpoint_values"}
    assert holders <= set(kept["value_at"].values())
    assert {d["type"] for d in after} <= {"checkpoint", "checkpoint_values", "checkpoint_write"}
    cold = await TieredCheckpointSaver(tiers.store).aget_tuple(config)
    assert latest is not None and cold is not None
    assert cold.checkpoint == latest.checkpoint
