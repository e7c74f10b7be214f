"""Large checkpoint blobs stored as shared chunks (`state.cold.chunks`), on real servers:
a growing `operator.add` message list costs stored bytes linear in its length (before,
every version stored the whole list: quadratic); prune, copy, delete_for_runs,
delete_thread and the retention sweep leave every surviving checkpoint readable and
no chunk that no manifest reaches; a corrupted chunk is a `CorruptState`, never a
wrong value."""

from __future__ import annotations

import asyncio
import json
import operator
import random
import time
import uuid
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any, TypedDict

import psycopg
import pytest
from langchain_core.runnables import RunnableConfig
from langgraph.channels.delta import DeltaChannel
from langgraph.graph import END, START, StateGraph
from langgraph.graph.state import CompiledStateGraph
from langgraph.types import Overwrite

from state import codec
from state.cold import chunks
from state.cold import cosmos_layout as layout
from state.cold.cosmos_checkpoints import CosmosCheckpointStore, block_grace_seconds
from state.cold.cosmos_client import CosmosConnection
from state.errors import CorruptState
from state.settings import Settings
from tests.integration.delta_graph import Opened, open_stack, settings_for, thread_config
from tests.support.cosmos import drop_container

WORDS = [
    "ticket",
    "billing",
    "refund",
    "invoice",
    "account",
    "customer",
    "agent",
    "reply",
    "plan",
    "upgrade",
]


class Conversation(TypedDict):
    messages: Annotated[list[str], operator.add]
    # Replaced every turn (no reducer): each version's chunks are its own.
    notes: str


def text(rng: random.Random) -> str:
    """~1 KB of plausible text (compresses like text, not like one repeated letter)."""
    return " ".join(rng.choice(WORDS) for _ in range(150))[:1024]


def growing_graph(saver: Any, *, notes: bool = False) -> CompiledStateGraph[Any, Any, Any, Any]:
    rng = random.Random(7)

    def reply(state: dict[str, Any]) -> dict[str, Any]:
        update: dict[str, Any] = {"messages": [f"{len(state['messages'])}:{text(rng)}"]}
        if notes:
            update["notes"] = "".join(text(rng) for _ in range(24))
        return update

    graph = StateGraph(Conversation)
    graph.add_node("reply", reply)
    graph.add_edge(START, "reply")
    graph.add_edge("reply", END)
    return graph.compile(checkpointer=saver)


@dataclass
class Cold:
    """What a test reads of a thread in the cold store, below the saver."""

    stored_bytes: Callable[[str], Awaitable[int]]
    # (every chunk digest of the thread, the digests its manifests reach)
    chunk_sets: Callable[[str], Awaitable[tuple[set[bytes], set[bytes]]]]
    corrupt_leaves: Callable[[str], Awaitable[None]]


def postgres_cold(url: str) -> Cold:
    async def query(sql: str, *params: Any) -> list[tuple[Any, ...]]:
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            cursor = await conn.execute(sql, params)
            return await cursor.fetchall() if cursor.description else []

    async def stored_bytes(thread: str) -> int:
        # The benchmark's measure: payload columns as stored (after TOAST compression).
        rows = await query(
            """SELECT
                (SELECT COALESCE(SUM(pg_column_size(checkpoint) + pg_column_size(metadata)
                                     + pg_column_size(channel_versions)), 0)
                 FROM cp_checkpoints WHERE thread_id = %s)
              + (SELECT COALESCE(SUM(pg_column_size(blob)), 0) FROM cp_blobs WHERE thread_id = %s)
              + (SELECT COALESCE(SUM(pg_column_size(blob)), 0) FROM cp_writes WHERE thread_id = %s)
              + (SELECT COALESCE(SUM(pg_column_size(data)), 0) FROM cp_chunks WHERE thread_id = %s)
            """,
            *(thread,) * 4,
        )
        return int(rows[0][0])

    async def chunk_sets(thread: str) -> tuple[set[bytes], set[bytes]]:
        rows = await query("SELECT digest, node, data FROM cp_chunks WHERE thread_id = %s", thread)
        nodes = {
            bytes(d): chunks.Chunk(bytes(d), True, bytes(data)) for d, node, data in rows if node
        }
        manifests = await query(
            "SELECT blob FROM cp_blobs WHERE thread_id = %s AND type LIKE 'chunked+%%'", thread
        )
        reached = chunks.reachable([bytes(m) for (m,) in manifests], nodes)
        return {bytes(d) for d, _, _ in rows}, reached

    async def corrupt_leaves(thread: str) -> None:
        await query(
            # Every leaf: whichever the latest value uses is then wrong.
            "UPDATE cp_chunks SET data = %s WHERE thread_id = %s AND NOT node",
            zlib.compress(b"x" * chunks.LEAF_BYTES),
            thread,
        )

    return Cold(stored_bytes, chunk_sets, corrupt_leaves)


def cosmos_cold(settings: Settings) -> Cold:
    @asynccontextmanager
    async def container() -> AsyncIterator[Any]:
        connection = CosmosConnection(settings.cosmos)
        try:
            yield await connection.container()
        finally:
            await connection.close()

    async def docs(thread: str, where: str = "true") -> list[dict[str, Any]]:
        async with container() as found:
            return [
                doc
                async for doc in found.query_items(
                    f"SELECT * FROM c WHERE c.thread_id = @thread AND {where}",
                    parameters=[{"name": "@thread", "value": thread}],
                    partition_key=thread,
                )
            ]

    async def stored_bytes(thread: str) -> int:
        # The benchmark's measure: the JSON of every document of the thread.
        return sum(len(json.dumps(doc).encode()) for doc in await docs(thread))

    async def chunk_sets(thread: str) -> tuple[set[bytes], set[bytes]]:
        found = await docs(thread)
        blocks = [layout.block_of(doc) for doc in found if doc["type"] == layout.BLOCK]
        spill = {doc["id"]: doc for doc in found if doc["type"] == layout.CHUNK}
        holders = [
            layout.to_layout_2(doc)
            for doc in found
            if doc["type"] in (layout.CHECKPOINT, layout.VALUES)
        ]
        reached = chunks.reachable(
            layout.manifests_of(holders, spill),
            {block.digest: block for block in blocks if block.node},
        )
        return {block.digest for block in blocks}, reached

    async def corrupt_leaves(thread: str) -> None:
        bad = codec.to_text(zlib.compress(b"x" * chunks.LEAF_BYTES))
        async with container() as found:
            for doc in await docs(thread, f"c.type = '{layout.BLOCK}' AND NOT c.node"):
                await found.upsert_item({**doc, "data": bad})

    return Cold(stored_bytes, chunk_sets, corrupt_leaves)


BACKENDS = ["postgres", "cosmos"]


def cold_for(backend: str, stack_env: dict[str, str], **extra: Any) -> Cold:
    if backend == "postgres":
        return postgres_cold(stack_env["POSTGRES_URL"])
    return cosmos_cold(settings_for(stack_env, backend, False, "write-through", **extra))


@asynccontextmanager
async def stack(
    stack_env: dict[str, str],
    backend: str,
    redis: bool = False,
    mode: str = "write-through",
    **extra: Any,
) -> AsyncIterator[Opened]:
    async with open_stack(settings_for(stack_env, backend, redis, mode, **extra)) as opened:
        yield opened


async def settle(opened: Opened, thread: str) -> None:
    """Write-behind: everything the thread's run wrote is in the cold store."""
    await opened.saver.aflush(thread)


async def grow(graph: Any, cfg: RunnableConfig, invokes: int) -> list[str]:
    """`invokes` turns of a user message and a reply; returns the run ids."""
    rng = random.Random(cfg["configurable"]["thread_id"])
    runs = []
    for _ in range(invokes):
        run_id = str(uuid.uuid4())
        runs.append(run_id)
        run_cfg: RunnableConfig = {"configurable": {**cfg["configurable"], "run_id": run_id}}
        await graph.ainvoke({"messages": [text(rng)]}, run_cfg)
    return runs


async def assert_every_checkpoint_reads(graph: Any, cfg: RunnableConfig) -> int:
    """Each checkpoint of the thread, read by id, has as many messages as its step says."""
    count = 0
    async for snapshot in graph.aget_state_history(cfg):
        at = await graph.aget_state(snapshot.config)
        assert at.values == snapshot.values
        count += 1
    return count


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("redis", "mode"), [(False, "write-through"), (True, "write-behind")])
async def test_stored_bytes_grow_linearly_with_an_appended_list(
    backend: str, redis: bool, mode: str, stack_env: dict[str, str]
) -> None:
    cold = cold_for(backend, stack_env)
    async with stack(stack_env, backend, redis, mode) as opened:
        graph = growing_graph(opened.saver)
        cfg = thread_config("grow")
        thread = cfg["configurable"]["thread_id"]
        sizes = {}
        done = 0
        for target in (40, 80, 160):
            # Invokes: 80, 160, 320 messages (the last ones past one level of nodes).
            await grow(graph, cfg, target - done)
            done = target
            await settle(opened, thread)
            sizes[2 * target] = await cold.stored_bytes(thread)
        state = (await graph.aget_state(cfg)).values
        assert len(state["messages"]) == 320
        async with stack(stack_env, backend) as fresh:  # a process that never saw it
            assert (await growing_graph(fresh.saver).aget_state(cfg)).values == state
    first = (sizes[160] - sizes[80]) / 80
    second = (sizes[320] - sizes[160]) / 160
    # Linear: each added message costs the same, whatever the list's length (a full
    # copy per version would make the second step cost about twice the first). What a
    # message costs here is mostly LangGraph's own per turn (three checkpoints, two
    # pending writes; Cosmos counts their JSON, base64 payloads included), not the
    # list's: a full copy per version would cost some 50 KB per message by then.
    assert abs(second - first) <= 0.25 * first, sizes
    assert second < 10 * 1024, sizes


@pytest.mark.parametrize("backend", BACKENDS)
async def test_maintenance_keeps_chunks_reachable_and_only_those(
    backend: str, stack_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A container of its own on Cosmos: the retention sweep at the end deletes every thread
    # it finds, and on the shared container that is every other test's too (document by
    # document, minutes on the emulator once the suite has written many).
    own = {"cosmos_container": f"chunks-{uuid.uuid4().hex[:12]}"} if backend == "cosmos" else {}
    cold = cold_for(backend, stack_env, **own)
    async with stack(stack_env, backend, state_cold_ttl_seconds=3600, **own) as opened:
        if backend == "cosmos":
            # Collected as by a collection past the grace: the blocks this test just wrote
            # are too new to be judged (`block_grace_seconds`) by the service's clock.
            store = opened.backends.checkpoints
            assert isinstance(store, CosmosCheckpointStore)
            grace = block_grace_seconds(opened.backends.settings.cosmos_operation_timeout_seconds)
            monkeypatch.setattr(store, "_clock", lambda: time.time() + grace + 1)
        try:
            await maintenance_keeps_chunks_reachable(opened, cold)
        finally:
            if own:
                await drop_container(opened.backends.settings)


async def maintenance_keeps_chunks_reachable(opened: Opened, cold: Cold) -> None:
    saver = opened.saver
    graph = growing_graph(saver, notes=True)
    cfg = thread_config("maint")
    thread = cfg["configurable"]["thread_id"]
    runs = await grow(graph, cfg, 25)
    every, reached = await cold.chunk_sets(thread)
    assert every == reached and len(every) > 100

    copy_cfg = thread_config("copy")
    copy = copy_cfg["configurable"]["thread_id"]
    await saver.acopy_thread(thread, copy)
    assert await assert_every_checkpoint_reads(
        graph, copy_cfg
    ) == await assert_every_checkpoint_reads(graph, cfg)
    assert await cold.chunk_sets(copy) == (every, reached)

    # The last run goes: the checkpoint before it is the latest, read in full.
    before_last = (await graph.aget_state(cfg)).values["messages"][:-2]
    await saver.adelete_for_runs([runs[-1]])
    assert (await graph.aget_state(cfg)).values["messages"] == before_last
    await assert_every_checkpoint_reads(graph, cfg)
    every_after, reached_after = await cold.chunk_sets(thread)
    assert every_after == reached_after and every_after < every

    latest = (await graph.aget_state(cfg)).values
    await saver.aprune([thread], strategy="keep_latest")
    assert (await graph.aget_state(cfg)).values == latest
    assert await assert_every_checkpoint_reads(graph, cfg) == 1
    every_pruned, reached_pruned = await cold.chunk_sets(thread)
    assert every_pruned == reached_pruned and every_pruned < every_after
    # The copy (its checkpoints carry the same run ids: it lost the last run too)
    # kept its own chunks, all of them reached.
    every_copy, reached_copy = await cold.chunk_sets(copy)
    assert every_copy == reached_copy and every_pruned < every_copy
    assert await assert_every_checkpoint_reads(graph, copy_cfg) > 1

    await saver.adelete_thread(thread)
    assert await cold.chunk_sets(thread) == (set(), set())

    # Retention: an expired thread goes with its chunks.
    far_future = time.time() + 10 * opened.backends.settings.state_cold_ttl_seconds
    while await cold.chunk_sets(copy) != (set(), set()):
        assert await opened.backends.retention.sweep(limit=1000, now=far_future)


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_corrupted_chunk_is_detected(backend: str, stack_env: dict[str, str]) -> None:
    cold = cold_for(backend, stack_env)
    async with stack(stack_env, backend) as opened:
        graph = growing_graph(opened.saver)
        cfg = thread_config("corrupt")
        await grow(graph, cfg, 12)
        thread = cfg["configurable"]["thread_id"]
        await cold.corrupt_leaves(thread)
    # Read by another process: the writer itself serves the values it wrote from memory.
    async with stack(stack_env, backend) as reader:
        with pytest.raises(CorruptState):
            await reader.backends.checkpoints.get_checkpoint(thread, "", None)
        with pytest.raises(CorruptState):
            await growing_graph(reader.saver).aget_state(cfg)


class Chat(TypedDict):
    messages: Annotated[list[str], operator.add]


def chat_graph(saver: Any) -> CompiledStateGraph[Any, Any, Any, Any]:
    """A short reply per turn: the customer's ~1 KB message fills leaves at the step that
    takes the input, so a run that is deleted can own a leaf its predecessor lacks."""
    graph = StateGraph(Chat)
    graph.add_node("reply", lambda state: {"messages": [f"ok {len(state['messages'])}"]})
    graph.add_edge(START, "reply")
    graph.add_edge("reply", END)
    return graph.compile(checkpointer=saver)


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_run_redone_after_another_process_deleted_it_reads_back_whole(
    backend: str, stack_env: dict[str, str]
) -> None:
    # Process A runs a turn; process B rolls it back (its chunks collected); A, still
    # remembering what it stored for that turn, runs it again with the same message.
    # The repeated value must not lean on chunks B deleted.
    cfg = thread_config("redo")
    rng = random.Random(11)
    async with stack(stack_env, backend) as writer, stack(stack_env, backend) as other:
        graph = chat_graph(writer.saver)
        for turn in range(16):
            message = text(rng)
            run_id = str(uuid.uuid4())
            await graph.ainvoke({"messages": [message]}, _with_run(cfg, run_id))
            await other.saver.adelete_for_runs([run_id])
            await graph.ainvoke({"messages": [message]}, _with_run(cfg, str(uuid.uuid4())))
            async with stack(stack_env, backend) as reader:  # sees only what is stored
                values = (await chat_graph(reader.saver).aget_state(cfg)).values
            assert len(values["messages"]) == 2 * (turn + 1), turn


def _with_run(cfg: RunnableConfig, run_id: str) -> RunnableConfig:
    return {"configurable": {**cfg["configurable"], "run_id": run_id}}


class Retrieval(TypedDict):
    messages: Annotated[list[str], operator.add]
    context: str


CONTEXT = " ".join(text(random.Random(5)) for _ in range(20))  # ~20 KB, the same every turn


def retrieval_graph(saver: Any) -> CompiledStateGraph[Any, Any, Any, Any]:
    """A retrieval step puts a large context; the answer step clears it (a small value)."""
    graph = StateGraph(Retrieval)
    graph.add_node("fetch", lambda _state: {"context": CONTEXT})
    graph.add_node("answer", lambda s: {"context": "", "messages": [f"ok {len(s['messages'])}"]})
    graph.add_edge(START, "fetch")
    graph.add_edge("fetch", "answer")
    graph.add_edge("answer", END)
    return graph.compile(checkpointer=saver)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("maintenance", ["prune", "delete_for_runs"])
async def test_a_value_large_again_after_another_process_collected_it_reads_back_whole(
    backend: str, maintenance: str, stack_env: dict[str, str]
) -> None:
    # Found by review: the writer's chain goes on (its tip is the latest checkpoint), but
    # the tip holds the channel as a small value, so the large one's chunks were no longer
    # reached and another process collected them.
    cfg = thread_config("again")
    thread = cfg["configurable"]["thread_id"]
    async with stack(stack_env, backend) as writer, stack(stack_env, backend) as other:
        graph = retrieval_graph(writer.saver)
        first = str(uuid.uuid4())
        await graph.ainvoke({"messages": ["hi"]}, _with_run(cfg, first))
        if maintenance == "prune":
            await other.saver.aprune([thread], strategy="keep_latest")
        else:
            await graph.aupdate_state(_with_run(cfg, str(uuid.uuid4())), {"messages": ["note"]})
            await other.saver.adelete_for_runs([first])
        await graph.ainvoke(
            {"messages": ["again"]}, _with_run(cfg, str(uuid.uuid4())), interrupt_after=["fetch"]
        )
        async with stack(stack_env, backend) as reader:
            state = await retrieval_graph(reader.saver).aget_state(cfg)
        assert state.values["context"] == CONTEXT


class Document(TypedDict):
    document: str
    messages: Annotated[list[str], operator.add]


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_large_input_sent_again_after_another_process_pruned_reads_back_whole(
    backend: str, stack_env: dict[str, str]
) -> None:
    # LangGraph keeps a run's input in `__start__` at the input checkpoint only (the next
    # step clears it): the latest checkpoint never holds it.
    cfg = thread_config("input")
    thread = cfg["configurable"]["thread_id"]
    graph_of = StateGraph(Document)
    graph_of.add_node("answer", lambda s: {"messages": [f"ok {len(s['messages'])}"]})
    graph_of.add_edge(START, "answer")
    graph_of.add_edge("answer", END)
    async with stack(stack_env, backend) as writer, stack(stack_env, backend) as other:
        graph = graph_of.compile(checkpointer=writer.saver)
        turn = {"document": CONTEXT, "messages": ["q"]}
        await graph.ainvoke(turn, _with_run(cfg, str(uuid.uuid4())))
        await other.saver.aprune([thread], strategy="keep_latest")
        await graph.ainvoke(turn, _with_run(cfg, str(uuid.uuid4())))
        async with stack(stack_env, backend) as reader:
            fresh = graph_of.compile(checkpointer=reader.saver)
            read = [await fresh.aget_state(s.config) async for s in fresh.aget_state_history(cfg)]
        assert len(read) == 4


def _replace_batches(state: list[str], batches: list[list[str]]) -> list[str]:
    return [*state, *(item for batch in batches for item in batch)]


class SnapshottedContext(TypedDict):
    context: Annotated[list[str], DeltaChannel(_replace_batches, snapshot_frequency=1)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("small", [["done"], [], ["ab"]], ids=["ext8", "empty", "fixext4"])
async def test_a_large_snapshot_after_a_small_one_and_another_process_pruning_reads_back(
    backend: str, small: list[str], stack_env: dict[str, str]
) -> None:
    # Found by review: a DeltaChannel snapshot large (chunked), then small (stored whole):
    # maintenance keeps the chain back to the small one only, so the large one's chunks
    # go; the next large snapshot must not build on them.
    documents = [text(random.Random(n)) for n in range(24)]
    graph_of = StateGraph(SnapshottedContext)
    graph_of.add_node("fetch", lambda _state: {"context": Overwrite(list(documents))})
    graph_of.add_node("answer", lambda _state: {"context": Overwrite(list(small))})
    graph_of.add_edge(START, "fetch")
    graph_of.add_edge("fetch", "answer")
    graph_of.add_edge("answer", END)
    cfg = thread_config("snapshots")
    thread = cfg["configurable"]["thread_id"]
    async with stack(stack_env, backend) as writer, stack(stack_env, backend) as other:
        graph = graph_of.compile(checkpointer=writer.saver)
        await graph.ainvoke({"context": []}, _with_run(cfg, str(uuid.uuid4())))
        await other.saver.aprune([thread], strategy="keep_latest")
        await graph.ainvoke(
            {"context": []}, _with_run(cfg, str(uuid.uuid4())), interrupt_after=["fetch"]
        )
        async with stack(stack_env, backend) as reader:
            state = await graph_of.compile(checkpointer=reader.saver).aget_state(cfg)
        assert state.values["context"] == documents


class PickedContext(TypedDict):
    pick: str
    context: Annotated[list[str], DeltaChannel(_replace_batches, snapshot_frequency=1)]


# ~1 KB each: 250 fill 62 leaves (the roots of the manifest), 275 fill 68 (a node over
# the first 64, another over the rest); "other" shares none of their bytes.
POOL = [text(random.Random(1000 + n)) for n in range(275)]
PICKS = {"short": POOL[:250], "long": POOL, "other": [text(random.Random(-n)) for n in range(40)]}


async def test_a_snapshot_reads_back_beside_an_unreached_node_whose_leaves_were_collected(
    stack_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Found by review: a snapshot's blocks come by their tag, older snapshots' unreached
    # blocks with them. A node younger than the grace outlives its older leaves in a
    # collection; the read walked down every node fetched, and reported the value it
    # did not need as missing chunks (`CorruptState`).
    graph_of = StateGraph(PickedContext)
    graph_of.add_node("fetch", lambda state: {"context": Overwrite(list(PICKS[state["pick"]]))})
    graph_of.add_edge(START, "fetch")
    graph_of.add_edge("fetch", END)
    cfg = thread_config("tagged")
    thread = cfg["configurable"]["thread_id"]
    async with stack(stack_env, "cosmos") as writer:
        graph = graph_of.compile(checkpointer=writer.saver)
        await graph.ainvoke({"pick": "short", "context": []}, _with_run(cfg, str(uuid.uuid4())))
        await asyncio.sleep(
            1.5
        )  # `_ts` counts seconds: the short value's leaves are older than ...
        between = time.time()
        await asyncio.sleep(1.5)
        # ... the node the long one adds over them (this process builds on its split).
        await graph.ainvoke({"pick": "long", "context": []}, _with_run(cfg, str(uuid.uuid4())))
        await graph.ainvoke({"pick": "other", "context": []}, _with_run(cfg, str(uuid.uuid4())))
        store = writer.backends.checkpoints
        assert isinstance(store, CosmosCheckpointStore)
        grace = block_grace_seconds(writer.backends.settings.cosmos_operation_timeout_seconds)
        # Collected as by a collection whose grace ends between the two.
        monkeypatch.setattr(store, "_clock", lambda: between + grace)
        await writer.saver.aprune([thread], strategy="keep_latest")
    async with stack(stack_env, "cosmos") as reader:
        state = await graph_of.compile(checkpointer=reader.saver).aget_state(cfg)
    assert state.values["context"] == PICKS["other"]


@pytest.mark.parametrize(
    "damage", [{"data": None}, {"data": 7}, {"node": None}], ids=["no data", "data", "no kind"]
)
async def test_a_damaged_block_document_is_corrupt_state(
    damage: dict[str, Any], stack_env: dict[str, str]
) -> None:
    cfg = thread_config("damaged-block")
    thread = cfg["configurable"]["thread_id"]
    settings = settings_for(stack_env, "cosmos", False, "write-through")
    async with stack(stack_env, "cosmos") as opened:
        await grow(growing_graph(opened.saver), cfg, 12)
    connection = CosmosConnection(settings.cosmos)
    try:
        container = await connection.container()
        async for doc in container.query_items(
            "SELECT * FROM c WHERE c.thread_id = @thread AND c.type = @type",
            parameters=[
                {"name": "@thread", "value": thread},
                {"name": "@type", "value": layout.BLOCK},
            ],
            partition_key=thread,
        ):
            changed = {**doc, **damage}
            await container.upsert_item({k: v for k, v in changed.items() if v is not None})
    finally:
        await connection.close()
    # Read by another process: the writer serves the values it wrote from memory.
    async with stack(stack_env, "cosmos") as reader:
        with pytest.raises(CorruptState):
            await reader.backends.checkpoints.get_checkpoint(thread, "", None)
