"""The Cosmos checkpoint store on the emulator: request counts, chunk safety, layout-1
documents, write-behind batches and maintenance that keeps what a checkpoint names."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import operator
import os
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any, TypedDict

import pytest
from langgraph.graph import END, START, StateGraph

from state.checkpoint import TieredCheckpointSaver
from state.cold import cosmos_layout as layout
from state.cold.cosmos_checkpoints import CosmosCheckpointStore
from state.cold.cosmos_client import CosmosConnection, EnvironmentProxyTransport
from state.cold.cosmos_fences import FENCE_TYPE
from state.cold.cosmos_io import CONCURRENT_REQUESTS, BatchRefused, PartitionIO
from state.cold.cosmos_maintenance import CheckpointMaintenance
from state.errors import CorruptState, InvalidValue, ParentGone, StaleFencingToken
from state.ports import CheckpointPut, StoredBlob, StoredCheckpoint, StoredWrite, WritesPut
from state.settings import Settings
from tests.support.cosmos import partition

# Small items, so a 20 kB value is chunked.
ITEM_LIMIT = 4096


def checkpoint_store(connection: CosmosConnection, settings: Settings) -> CosmosCheckpointStore:
    return CosmosCheckpointStore(
        connection,
        max_item_bytes=settings.state_max_item_bytes,
        compress_threshold_bytes=settings.state_compress_threshold_bytes,
    )


@pytest.fixture
def settings(stack_env: dict[str, str]) -> Settings:
    return Settings.model_validate(
        {
            "cosmos_endpoint": stack_env["COSMOS_ENDPOINT"],
            "cosmos_key": stack_env["COSMOS_KEY"],
            "cosmos_create_if_missing": True,
        }
    )


@pytest.fixture
async def connection(settings: Settings) -> AsyncIterator[CosmosConnection]:
    opened = CosmosConnection(settings.cosmos)
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture
async def store(connection: CosmosConnection, settings: Settings) -> CosmosCheckpointStore:
    opened = checkpoint_store(connection, settings)
    await opened.setup()
    return opened


@pytest.fixture
async def small_items(connection: CosmosConnection, settings: Settings) -> CosmosCheckpointStore:
    opened = checkpoint_store(
        connection, settings.model_copy(update={"state_max_item_bytes": ITEM_LIMIT})
    )
    await opened.setup()
    return opened


def thread() -> str:
    return f"cs-{uuid.uuid4().hex[:12]}"


def checkpoint_id(n: int) -> str:
    return f"1f0{n:05x}-0000-6000-8000-000000000000"


def stored(
    thread_id: str, n: int, versions: dict[str, str | int | float], *, run_id: str = "run"
) -> StoredCheckpoint:
    return StoredCheckpoint(
        thread_id=thread_id,
        checkpoint_ns="",
        checkpoint_id=checkpoint_id(n),
        parent_checkpoint_id=checkpoint_id(n - 1) if n > 1 else None,
        checkpoint=("json", f'{{"n": {n}}}'.encode()),
        metadata={"step": n, "run_id": run_id},
        channel_versions=versions,
    )


def comparable(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Documents by id without what Cosmos adds."""
    return {doc["id"]: {k: v for k, v in doc.items() if not k.startswith("_")} for doc in docs}


# --------------------------------------------------------------------------- #13 item 1


async def test_a_retried_large_write_keeps_the_chunks_its_stored_document_uses(
    small_items: CosmosCheckpointStore, connection: CosmosConnection
) -> None:
    thread_id = thread()
    await small_items.put_checkpoint(stored(thread_id, 1, {}), [])
    big = ("bytes", os.urandom(20_000))  # incompressible: several chunks
    write = StoredWrite("task-1", "", 0, "attachment", big)

    await small_items.put_writes(thread_id, "", checkpoint_id(1), [write], upsert=False)
    # The caller retries the same write (its first answer was lost) ...
    await small_items.put_writes(thread_id, "", checkpoint_id(1), [write], upsert=False)
    # ... and a buggy caller sends one write twice in one call.
    await small_items.put_writes(thread_id, "", checkpoint_id(1), [write, write], upsert=False)

    writes = await small_items.get_writes(thread_id, "", checkpoint_id(1))
    assert [(w.task_id, w.idx, w.value) for w in writes] == [("task-1", 0, big)]
    loaded = await small_items.get_checkpoint(thread_id, "", None)
    assert loaded is not None and loaded.writes == writes
    # Exactly the stored document's chunks are left: no loser's chunks, none missing.
    docs = await partition(connection, thread_id)
    [write_doc] = [d for d in docs if d["type"] == "checkpoint_write"]
    chunks = {d["id"] for d in docs if d["type"] == "checkpoint_chunk"}
    assert chunks == set(layout.chunks_of([write_doc]))
    assert len(chunks) >= 5


async def test_racing_large_writes_leave_one_winner_and_only_its_chunks(
    small_items: CosmosCheckpointStore, connection: CosmosConnection, settings: Settings
) -> None:
    thread_id = thread()
    await small_items.put_checkpoint(stored(thread_id, 1, {}), [])
    small = settings.model_copy(update={"state_max_item_bytes": ITEM_LIMIT})
    writers = [checkpoint_store(connection, small) for _ in range(4)]
    values = [("bytes", os.urandom(12_000)) for _ in writers]
    await asyncio.gather(
        *(
            writer.put_writes(
                thread_id, "", checkpoint_id(1), [StoredWrite("t", "", 0, "x", value)], upsert=False
            )
            for writer, value in zip(writers, values, strict=True)
        )
    )
    [write] = await small_items.get_writes(thread_id, "", checkpoint_id(1))
    assert write.value in values
    docs = await partition(connection, thread_id)
    [write_doc] = [d for d in docs if d["type"] == "checkpoint_write"]
    chunks = {d["id"] for d in docs if d["type"] == "checkpoint_chunk"}
    assert chunks == set(layout.chunks_of([write_doc]))


async def test_a_repeat_that_adds_indexes_merges_and_the_first_write_wins(
    small_items: CosmosCheckpointStore, connection: CosmosConnection
) -> None:
    """LangGraph saves the null task's writes again with one more each time."""
    thread_id = thread()
    await small_items.put_checkpoint(stored(thread_id, 1, {}), [])
    first = StoredWrite("task-1", "", 0, "a", ("bytes", os.urandom(9_000)))
    later = StoredWrite("task-1", "", 0, "a", ("json", b'"late"'))
    second = StoredWrite("task-1", "", 1, "b", ("bytes", os.urandom(9_000)))

    await small_items.put_writes(thread_id, "", checkpoint_id(1), [first], upsert=False)
    await small_items.put_writes(thread_id, "", checkpoint_id(1), [later, second], upsert=False)

    writes = await small_items.get_writes(thread_id, "", checkpoint_id(1))
    assert [(w.idx, w.value) for w in writes] == [(0, first.value), (1, second.value)]
    docs = await partition(connection, thread_id)
    [write_doc] = [d for d in docs if d["type"] == "checkpoint_write"]
    chunks = {d["id"] for d in docs if d["type"] == "checkpoint_chunk"}
    assert chunks == set(layout.chunks_of([write_doc]))


async def test_special_writes_replace_per_index(store: CosmosCheckpointStore) -> None:
    thread_id = thread()
    await store.put_checkpoint(stored(thread_id, 1, {}), [])
    ordinary = StoredWrite("task-1", "", 0, "a", ("json", b"1"))
    await store.put_writes(thread_id, "", checkpoint_id(1), [ordinary], upsert=False)
    for value in (b'"first"', b'"second"'):
        interrupt = StoredWrite("task-1", "", -3, "__interrupt__", ("json", value))
        await store.put_writes(thread_id, "", checkpoint_id(1), [interrupt], upsert=True)
    writes = await store.get_writes(thread_id, "", checkpoint_id(1))
    assert [(w.idx, w.value) for w in writes] == [(-3, ("json", b'"second"')), (0, ordinary.value)]


# --------------------------------------------------------------------------- request counts


async def test_a_put_and_a_put_writes_are_one_request_each(
    store: CosmosCheckpointStore, connection: CosmosConnection, settings: Settings
) -> None:
    thread_id = thread()
    value = ("json", b'["' + b"x" * 2000 + b'"]')
    await store.put_checkpoint(stored(thread_id, 1, {"a": "1"}), [StoredBlob("a", "1", value)])
    for n in (2, 3):
        connection.counters.reset()
        await store.put_checkpoint(
            stored(thread_id, n, {"a": "1", "b": str(n)}), [StoredBlob("b", str(n), value)]
        )
        assert connection.counters.requests == 1
        connection.counters.reset()
        await store.put_writes(
            thread_id,
            "",
            checkpoint_id(n),
            [StoredWrite("t", "", 0, "a", value), StoredWrite("t", "", 1, "b", value)],
            upsert=False,
        )
        assert connection.counters.requests == 1

    # A process that has not seen the parent reads it once.
    fresh = checkpoint_store(connection, settings)
    connection.counters.reset()
    await fresh.put_checkpoint(
        stored(thread_id, 4, {"a": "1", "b": "3", "c": "4"}), [StoredBlob("c", "4", value)]
    )
    assert connection.counters.requests == 2

    # Latest: the TOP 1 query, then its writes and (concurrently) the ancestors holding
    # `a` and `b`: two round trips, three requests.
    connection.counters.reset()
    latest = await checkpoint_store(connection, settings).get_checkpoint(thread_id, "", None)
    assert connection.counters.requests == 3
    assert latest is not None and latest.checkpoint_id == checkpoint_id(4)
    assert latest.blobs == {"a": value, "b": value, "c": value}


class Chat(TypedDict, total=False):
    messages: Annotated[list[dict[str, str]], operator.add]


async def test_a_four_node_invoke_costs_at_most_twelve_requests(
    store: CosmosCheckpointStore, connection: CosmosConnection
) -> None:
    """The benchmark's workload: each node appends one ~1 KB message (was 27 requests)."""
    graph = StateGraph(Chat)
    names = ["intake", "billing", "policy", "response"]
    for name in names:
        graph.add_node(name, lambda state, n=name: {"messages": [{"role": n, "content": n * 200}]})
    for a, b in zip([START, *names], [*names, END], strict=True):
        graph.add_edge(a, b)
    compiled = graph.compile(checkpointer=TieredCheckpointSaver(store))
    for _ in range(3):
        config = {"configurable": {"thread_id": thread()}}
        connection.counters.reset()
        done = await compiled.ainvoke({"messages": []}, config)  # type: ignore[arg-type]
        assert len(done["messages"]) == 4
        # 1 latest read + 6 puts + 5 put_writes.
        assert connection.counters.requests <= 12
        latest = await TieredCheckpointSaver(store).aget_tuple(config)  # type: ignore[arg-type]
        assert latest is not None and latest.checkpoint["channel_values"] == done


# --------------------------------------------------------------------------- layout 1


async def test_threads_written_in_layout_1_read_and_continue(
    store: CosmosCheckpointStore, connection: CosmosConnection, settings: Settings
) -> None:
    """Documents exactly as the previous code wrote them (blob documents, a pointer)."""
    thread_id = thread()
    container = await connection.container()
    cp_id = checkpoint_id(1)
    messages = ("json", b'["hello"]')
    base = {"thread_id": thread_id, "schema_version": 1}
    entry = {"enc": "raw", "parts": 1, "chunk_set": ""}
    checkpoint_doc = {
        **base,
        **entry,
        "id": f"cp::{cp_id}",
        "type": "checkpoint",
        "checkpoint_ns": "",
        "checkpoint_id": cp_id,
        "parent_checkpoint_id": None,
        "metadata": {"step": 1},
        "channel_versions": {"messages": "1", "count": "1"},
        "serde": "json",
        "data": "eyJuIjogMX0=",  # {"n": 1}
    }
    for doc in (
        checkpoint_doc,
        {**checkpoint_doc, "id": "ptr:", "type": "checkpoint_pointer", "inline": True},
        {
            **base,
            **entry,
            "id": "blob::messages:1",
            "type": "checkpoint_blob",
            "checkpoint_ns": "",
            "channel": "messages",
            "version": "1",
            "serde": "json",
            "data": "WyJoZWxsbyJd",  # ["hello"]
        },
        {
            **base,
            **entry,
            "id": f"write::{cp_id}:task-1:0",
            "type": "checkpoint_write",
            "checkpoint_ns": "",
            "checkpoint_id": cp_id,
            "task_id": "task-1",
            "task_path": "",
            "idx": 0,
            "channel": "messages",
            "serde": "json",
            "data": "WyJoaSJd",  # ["hi"]
        },
    ):
        await container.upsert_item(doc)

    old = await store.get_checkpoint(thread_id, "", None)
    assert old is not None and old.checkpoint == ("json", b'{"n": 1}')
    assert old.blobs == {"messages": messages}
    assert old.writes == [StoredWrite("task-1", "", 0, "messages", ("json", b'["hi"]'))]
    assert await store.get_blobs(thread_id, "", {"messages": "1"}) == {"messages": messages}

    # A new step on top of it: unchanged `messages` still comes from the blob document.
    count = ("json", b"2")
    # (by a process that has not seen the parent: it reads the layout-1 document)
    await checkpoint_store(connection, settings).put_checkpoint(
        stored(thread_id, 2, {"messages": "1", "count": "2"}), [StoredBlob("count", "2", count)]
    )
    new = await store.get_checkpoint(thread_id, "", None)
    assert new is not None and new.checkpoint_id == checkpoint_id(2)
    assert new.blobs == {"messages": messages, "count": count}
    assert [c.checkpoint_id async for c in _list(store, thread_id)] == [
        checkpoint_id(2),
        cp_id,
    ]
    await store.delete_thread(thread_id)
    assert await partition(connection, thread_id) == []


async def test_a_put_whose_parent_is_gone_or_spared_is_refused_at_no_request_more(
    store: CosmosCheckpointStore, connection: CosmosConnection, settings: Settings
) -> None:
    """A write-through put goes on only from a parent still stored: one this store
    remembers (its own last put) is read by the put's own batch, so a delete by another
    process is seen; one it does not is read anyway, and spared is refused too."""
    thread_id = thread()
    await store.put_checkpoint(stored(thread_id, 1, {}), [])
    await store.put_checkpoint(stored(thread_id, 2, {}, run_id="doomed"), [])
    await checkpoint_store(connection, settings).delete_for_runs(["doomed"])
    connection.counters.reset()
    with pytest.raises(ParentGone):
        await store.put_checkpoint(stored(thread_id, 3, {}, run_id="doomed"), [])
    assert connection.counters.requests == 1

    await PartitionIO(connection).patch(
        layout.checkpoint_doc_id("", checkpoint_id(1)),
        thread_id,
        [{"op": "add", "path": "/spared", "value": True}],
    )
    fresh = checkpoint_store(connection, settings)
    connection.counters.reset()
    with pytest.raises(ParentGone):
        await fresh.put_checkpoint(stored(thread_id, 2, {}), [])
    assert connection.counters.requests == 1
    assert [c.checkpoint_id async for c in _list(store, thread_id)] == [checkpoint_id(1)]
    # Vouched for by the caller (a write-behind log holds it): stored.
    await fresh.put_checkpoint(stored(thread_id, 3, {}), [], parent_vouched=True)
    listed = [c.checkpoint_id async for c in _list(store, thread_id)]
    assert listed == [checkpoint_id(3), checkpoint_id(1)]


@pytest.mark.parametrize("value_bytes", [10, 450_000], ids=["batched", "one-request-at-a-time"])
async def test_a_put_whose_parent_was_read_cannot_land_after_a_delete_thread(
    small_items: CosmosCheckpointStore,
    connection: CosmosConnection,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    value_bytes: int,
) -> None:
    """A process that has not seen the parent (or a step too large for a batch) reads it,
    then writes: a `delete_thread` of another process between the two must not leave the
    thread holding the late step alone. The checkpoint's write reads the parent again in
    its own batch (no request more), so it is refused."""
    store = small_items
    thread_id = thread()
    await store.put_checkpoint(stored(thread_id, 1, {}), [])
    held_up, go_on = asyncio.Event(), asyncio.Event()
    batch, upsert_all = PartitionIO.batch, PartitionIO.upsert_all

    async def pause_before_the_late_checkpoint(docs: list[Any]) -> None:
        if any(doc.get("checkpoint_id") == checkpoint_id(2) for doc in docs):
            held_up.set()
            await go_on.wait()

    async def paused_batch(
        self: PartitionIO, partition: str, operations: Any, **options: Any
    ) -> Any:
        await pause_before_the_late_checkpoint(
            [op[1][-1] for op in operations if op[0] not in ("delete", "read")]
        )
        return await batch(self, partition, operations, **options)

    async def paused_upsert_all(self: PartitionIO, docs: Any) -> None:
        await pause_before_the_late_checkpoint(list(docs))
        await upsert_all(self, docs)

    monkeypatch.setattr(PartitionIO, "batch", paused_batch)
    monkeypatch.setattr(PartitionIO, "upsert_all", paused_upsert_all)
    fresh = checkpoint_store(
        connection, settings.model_copy(update={"state_max_item_bytes": ITEM_LIMIT})
    )
    late_put = stored(thread_id, 2, {"a": "2"})
    value = StoredBlob("a", "2", ("bytes", os.urandom(value_bytes)))
    late = asyncio.create_task(fresh.put_checkpoint(late_put, [value]))
    await asyncio.wait_for(held_up.wait(), timeout=20)
    await checkpoint_store(connection, settings).delete_thread(thread_id)
    go_on.set()
    with pytest.raises(ParentGone):
        await late
    assert await store.get_checkpoint(thread_id, "", None) is None


async def test_a_step_too_large_for_a_batch_whose_remembered_parent_was_spared_is_refused(
    small_items: CosmosCheckpointStore, connection: CosmosConnection, settings: Settings
) -> None:
    """This store's last put is the parent (no read before packing); another process goes
    on from it and deletes its run, which keeps it only as the DeltaChannel history of the
    later checkpoint (spared). The step too large for a batch reads the parent apart before
    its documents, and refuses it as spared like a gone one, storing no checkpoint."""
    store = small_items
    thread_id = thread()
    await store.put_checkpoint(
        stored(thread_id, 1, {"m": "1"}), [StoredBlob("m", "1", ("json", b"[1]"))]
    )
    await store.put_checkpoint(stored(thread_id, 2, {"m": "1"}, run_id="doomed"), [])
    other = checkpoint_store(connection, settings)
    later = dataclasses.replace(
        stored(thread_id, 3, {"m": "3"}, run_id="later"),
        metadata={"step": 3, "run_id": "later", "counters_since_delta_snapshot": {"m": 1}},
    )
    await other.put_checkpoint(later, [])
    await other.delete_for_runs(["doomed"])
    assert await other.get_checkpoint(thread_id, "", checkpoint_id(2), spared=False) is None

    fork = dataclasses.replace(
        stored(thread_id, 4, {"m": "1", "a": "4"}), parent_checkpoint_id=checkpoint_id(2)
    )
    value = StoredBlob("a", "4", ("bytes", os.urandom(TOO_LARGE_FOR_A_BATCH)))
    with pytest.raises(ParentGone):
        await store.put_checkpoint(fork, [value])
    listed = [c.checkpoint_id async for c in _list(other, thread_id)]
    assert listed == [checkpoint_id(3), checkpoint_id(2), checkpoint_id(1)]


async def test_a_parentless_put_of_a_run_landing_during_its_delete_is_deleted_too(
    store: CosmosCheckpointStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A put with no parent (a subgraph's first step: nothing refuses it) of the run
    `delete_for_runs` deletes, in a namespace the listing did not find the run in, stored
    during the delete: it survived the call."""
    thread_id = thread()
    run_id = f"run-{uuid.uuid4().hex[:8]}"
    await store.put_checkpoint(stored(thread_id, 1, {}), [])
    await store.put_checkpoint(stored(thread_id, 2, {}, run_id=run_id), [])
    remove = CheckpointMaintenance._remove
    stepped: list[bool] = []

    async def remove_then_step(self: CheckpointMaintenance, *args: Any, **kwargs: Any) -> None:
        await remove(self, *args, **kwargs)
        if not stepped:  # the thread's delete is done: the subgraph's first step arrives
            stepped.append(True)
            subgraph = dataclasses.replace(
                stored(thread_id, 3, {}, run_id=run_id),
                checkpoint_ns="child:1",
                parent_checkpoint_id=None,
            )
            await store.put_checkpoint(subgraph, [])

    monkeypatch.setattr(CheckpointMaintenance, "_remove", remove_then_step)
    assert await store.delete_for_runs([run_id]) == {thread_id}
    assert stepped
    left = store.list_checkpoints(
        thread_id=thread_id, checkpoint_ns=None, before=None, limit=None, metadata_filter=None
    )
    assert [(c.checkpoint_ns, c.checkpoint_id) async for c in left] == [("", checkpoint_id(1))]


@pytest.mark.parametrize("maintenance", ["delete_thread", "prune"])
async def test_a_put_built_on_the_chunk_memo_held_across_a_delete_names_no_block_it_removed(
    store: CosmosCheckpointStore,
    connection: CosmosConnection,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    maintenance: str,
) -> None:
    """A put prepared while the chunker remembered its parent's blocks (it sends only the
    blocks its value added), held until the same store's `delete_thread` or prune, which
    forget the memo only before deleting, is done: it names blocks only its parent's value
    reaches. A delete of the whole thread took the parent: the put is refused. A prune
    keeps the parent (the thread's latest), so its blocks too, however old (the collector
    here judges every block): the put reads back whole, by a store that remembers nothing."""
    thread_id = thread()
    values = [os.urandom(20_000)]
    values += [values[-1] + os.urandom(10_000), values[-1] + os.urandom(20_000)]
    for n in (1, 2):
        await store.put_checkpoint(
            stored(thread_id, n, {"m": f"v{n}"}),
            [StoredBlob("m", f"v{n}", ("bytes", values[n - 1]))],
        )
    assert store._chunker.remembered((thread_id, "", "m")) is not None  # the put builds on it
    store._clock = lambda: time.time() + 3600
    held, go_on = asyncio.Event(), asyncio.Event()
    batch, upsert_all = PartitionIO.batch, PartitionIO.upsert_all

    async def hold(docs: list[Any]) -> None:
        if any(doc.get("checkpoint_id") == checkpoint_id(3) for doc in docs):
            held.set()
            await go_on.wait()

    async def held_batch(self: PartitionIO, partition: str, operations: Any, **options: Any) -> Any:
        await hold([op[1][-1] for op in operations if op[0] not in ("delete", "read")])
        return await batch(self, partition, operations, **options)

    async def held_upsert_all(self: PartitionIO, docs: Any) -> None:
        await hold(list(docs))
        await upsert_all(self, docs)

    monkeypatch.setattr(PartitionIO, "batch", held_batch)
    monkeypatch.setattr(PartitionIO, "upsert_all", held_upsert_all)
    put = asyncio.create_task(
        store.put_checkpoint(
            stored(thread_id, 3, {"m": "v3"}), [StoredBlob("m", "v3", ("bytes", values[2]))]
        )
    )
    await asyncio.wait_for(held.wait(), timeout=20)
    if maintenance == "delete_thread":
        await store.delete_thread(thread_id)
    else:
        await store.prune([thread_id], strategy="keep_latest")
    go_on.set()
    fresh = checkpoint_store(connection, settings)
    if maintenance == "delete_thread":
        with pytest.raises(ParentGone):
            await put
        assert await fresh.get_checkpoint(thread_id, "", None) is None
        return
    await put
    latest = await fresh.get_checkpoint(thread_id, "", None)
    assert latest is not None and latest.checkpoint_id == checkpoint_id(3)
    assert latest.blobs == {"m": ("bytes", values[2])}


def _list(store: CosmosCheckpointStore, thread_id: str) -> AsyncIterator[StoredCheckpoint]:
    return store.list_checkpoints(
        thread_id=thread_id, checkpoint_ns="", before=None, limit=None, metadata_filter=None
    )


# --------------------------------------------------------------------------- write-behind batches


async def test_apply_batch_is_idempotent_and_keeps_each_threads_order(
    small_items: CosmosCheckpointStore, connection: CosmosConnection, settings: Settings
) -> None:
    threads = [thread(), thread()]
    big = ("bytes", os.urandom(12_000))
    ops: list[CheckpointPut | WritesPut] = []
    for thread_id in threads:
        ops.append(CheckpointPut(stored(thread_id, 1, {"a": "1"}), [StoredBlob("a", "1", big)]))
        for n in (2, 3):
            ops.append(
                WritesPut(
                    thread_id,
                    "",
                    checkpoint_id(n - 1),
                    [StoredWrite(f"t{n}", "", 0, "b", ("json", str(n).encode()))],
                    upsert=False,
                )
            )
            ops.append(
                CheckpointPut(
                    stored(thread_id, n, {"a": "1", "b": str(n)}),
                    [StoredBlob("b", str(n), ("json", str(n).encode()))],
                )
            )

    await small_items.apply_batch(ops[:4])  # a prefix (a flusher that died) ...
    await small_items.apply_batch(ops)  # ... then all of it ...
    once = {t: comparable(await partition(connection, t)) for t in threads}
    # ... and again by another flusher that knows nothing of this thread.
    again_store = checkpoint_store(
        connection, settings.model_copy(update={"state_max_item_bytes": ITEM_LIMIT})
    )
    await again_store.apply_batch(ops)
    assert {t: comparable(await partition(connection, t)) for t in threads} == once
    for thread_id in threads:
        latest = await small_items.get_checkpoint(thread_id, "", None)
        assert latest is not None and latest.checkpoint_id == checkpoint_id(3)
        assert latest.blobs == {"a": big, "b": ("json", b"3")}
        history = [c async for c in _list(small_items, thread_id)]
        assert [c.writes for c in history][1:] == [
            [StoredWrite("t3", "", 0, "b", ("json", b"3"))],
            [StoredWrite("t2", "", 0, "b", ("json", b"2"))],
        ]


# Random bytes (chunks never shared) of this size make a step of more than a batch's 100
# operations at ITEM_LIMIT: stored a request at a time.
TOO_LARGE_FOR_A_BATCH = 450_000


def _fenced_ops(thread_id: str, first: int, last: int, value_bytes: int) -> list[CheckpointPut]:
    """Puts `first`..`last`, each with a value of its own."""
    return [
        CheckpointPut(
            stored(thread_id, n, {"a": str(n)}),
            [StoredBlob("a", str(n), ("bytes", os.urandom(value_bytes)))],
        )
        for n in range(first, last + 1)
    ]


@pytest.mark.parametrize(
    "value_bytes", [10, TOO_LARGE_FOR_A_BATCH], ids=["batched", "one-request-at-a-time"]
)
async def test_a_fenced_flush_is_refused_behind_a_newer_fence_and_a_delete_keeps_it(
    small_items: CosmosCheckpointStore,
    connection: CosmosConnection,
    settings: Settings,
    value_bytes: int,
) -> None:
    """The fence travels in the batch (for a step too large for one, in the batch of its
    checkpoint document, after its blocks): an older token is refused with nothing a
    reader reaches, in this process or another, and a delete under a newer token leaves
    no way back for the older one."""
    thread_id = thread()
    connection.counters.reset()
    await small_items.apply_batch(_fenced_ops(thread_id, 1, 2, value_bytes), fence=100)
    if value_bytes == 10:
        assert connection.counters.requests == 1  # a new thread: its fence created in the batch
    connection.counters.reset()
    await small_items.apply_batch(_fenced_ops(thread_id, 3, 3, value_bytes), fence=100)
    if value_bytes == 10:
        assert connection.counters.requests == 1  # the fence rides in the batch, its ETag known

    other_process = checkpoint_store(
        connection, settings.model_copy(update={"state_max_item_bytes": ITEM_LIMIT})
    )
    await other_process.apply_batch(_fenced_ops(thread_id, 4, 4, value_bytes), fence=200)
    with pytest.raises(StaleFencingToken) as refused:
        await small_items.apply_batch(_fenced_ops(thread_id, 5, 5, value_bytes), fence=150)
    assert (refused.value.presented, refused.value.highest) == (150, 200)
    latest = await small_items.get_checkpoint(thread_id, "", None)
    assert latest is not None and latest.checkpoint_id == checkpoint_id(4)

    await other_process.delete_thread(thread_id, fence=300)
    for late in (small_items, other_process):
        with pytest.raises(StaleFencingToken):
            await late.apply_batch(_fenced_ops(thread_id, 6, 6, value_bytes), fence=250)
    assert await small_items.get_checkpoint(thread_id, "", None) is None
    left = [doc["type"] for doc in await partition(connection, thread_id)]
    # A refused step stored a request at a time leaves its blocks and chunks: unreached.
    assert [t for t in left if t not in (layout.BLOCK, layout.CHUNK)] == [FENCE_TYPE]
    assert value_bytes == TOO_LARGE_FOR_A_BATCH or left == [FENCE_TYPE]
    # The next holder's flush goes on as on a new thread.
    await small_items.apply_batch(_fenced_ops(thread_id, 7, 7, value_bytes), fence=400)
    latest = await other_process.get_checkpoint(thread_id, "", None)
    assert latest is not None and latest.checkpoint_id == checkpoint_id(7)


async def test_a_step_too_large_for_a_batch_held_up_after_its_blocks_cannot_land_after_a_delete(
    small_items: CosmosCheckpointStore,
    connection: CosmosConnection,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A late flusher of a step stored a request at a time, paused just before it sends
    the step's checkpoint document (its blocks written, its fence checked if it checks it
    apart): a delete under a newer fence goes ahead, and the document, sent in a batch
    behind the fence, is refused."""
    thread_id = thread()
    await small_items.apply_batch(_fenced_ops(thread_id, 1, 1, TOO_LARGE_FOR_A_BATCH), fence=100)
    held_up, go_on = asyncio.Event(), asyncio.Event()
    batch, upsert_all = PartitionIO.batch, PartitionIO.upsert_all

    async def pause_before_the_late_checkpoint(docs: list[Any]) -> None:
        if any(doc.get("checkpoint_id") == checkpoint_id(2) for doc in docs):
            held_up.set()
            await go_on.wait()

    async def paused_batch(
        self: PartitionIO, partition: str, operations: Any, **options: Any
    ) -> Any:
        await pause_before_the_late_checkpoint(
            [op[1][-1] for op in operations if op[0] != "delete"]
        )
        return await batch(self, partition, operations, **options)

    async def paused_upsert_all(self: PartitionIO, docs: Any) -> None:
        await pause_before_the_late_checkpoint(list(docs))
        await upsert_all(self, docs)

    monkeypatch.setattr(PartitionIO, "batch", paused_batch)
    monkeypatch.setattr(PartitionIO, "upsert_all", paused_upsert_all)
    late = asyncio.create_task(
        small_items.apply_batch(_fenced_ops(thread_id, 2, 2, TOO_LARGE_FOR_A_BATCH), fence=100)
    )
    await asyncio.wait_for(held_up.wait(), timeout=20)
    other_process = checkpoint_store(
        connection, settings.model_copy(update={"state_max_item_bytes": ITEM_LIMIT})
    )
    await other_process.delete_thread(thread_id, fence=300)
    go_on.set()
    with pytest.raises(StaleFencingToken):
        await late
    assert await other_process.get_checkpoint(thread_id, "", None) is None


async def test_a_step_too_large_for_a_batch_stores_and_deletes_its_blocks_a_batch_at_a_time(
    small_items: CosmosCheckpointStore, connection: CosmosConnection
) -> None:
    """Its blocks cost a request per hundred, each way, not one each: a flush of a
    2 MB state sent 530 upserts one at a time and held the thread's lock so long that
    a delete waiting for it gave up."""
    thread_id = thread()
    connection.counters.reset()
    await small_items.apply_batch(_fenced_ops(thread_id, 1, 1, TOO_LARGE_FOR_A_BATCH))
    stored_with = connection.counters.requests
    documents = len(await partition(connection, thread_id))
    assert documents > 100
    assert stored_with <= math.ceil(documents / 100) + 1

    connection.counters.reset()
    await small_items.delete_thread(thread_id)
    # A query per hundred ids and one finding none, for the checkpoints and the rest.
    assert connection.counters.requests <= 2 * math.ceil(documents / 100) + 4
    assert await partition(connection, thread_id) == []


async def test_a_flush_asks_for_no_documents_back_but_a_fenced_one_reads_its_fence(
    store: CosmosCheckpointStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch whose results nobody reads asks the service to leave the documents out of
    its answer (a large flush would otherwise get every document it sent back); a fenced
    batch still gets the fence document it needs the ETag of. (The emulator answers with
    the documents whatever it is asked: the request is what can be checked here.)"""
    asked: list[str | None] = []
    send = EnvironmentProxyTransport.send

    async def recorded(transport: Any, request: Any, **kwargs: Any) -> Any:
        if request.headers.get("x-ms-cosmos-is-batch-request"):
            asked.append(request.headers.get("Prefer"))
        return await send(transport, request, **kwargs)

    monkeypatch.setattr(EnvironmentProxyTransport, "send", recorded)
    thread_id = thread()
    await store.apply_batch(_fenced_ops(thread_id, 1, 3, 10))
    assert asked == ["return=minimal"]
    await store.apply_batch(_fenced_ops(thread_id, 4, 6, 10), fence=5)
    assert asked == ["return=minimal", None]
    latest = await store.get_checkpoint(thread_id, "", None)
    assert latest is not None and latest.checkpoint_id == checkpoint_id(6)


async def test_a_threads_flush_is_one_transactional_batch_per_hundred_documents(
    store: CosmosCheckpointStore, connection: CosmosConnection, settings: Settings
) -> None:
    """A run's worth of steps (20 puts, 20 put_writes) in one round trip, read back whole."""
    thread_id = thread()
    ops: list[CheckpointPut | WritesPut] = []
    for n in range(1, 21):
        ops.append(
            CheckpointPut(
                stored(thread_id, n, {"a": str(n)}),
                [StoredBlob("a", str(n), ("json", f'"{n}"'.encode()))],
            )
        )
        ops.append(
            WritesPut(
                thread_id,
                "",
                checkpoint_id(n),
                [StoredWrite("t", "", 0, "a", ("json", f'"w{n}"'.encode()))],
                upsert=False,
            )
        )
    connection.counters.reset()
    await store.apply_batch(ops)
    assert connection.counters.requests == 1
    fresh = checkpoint_store(connection, settings)
    latest = await fresh.get_checkpoint(thread_id, "", None)
    assert latest is not None and latest.checkpoint_id == checkpoint_id(20)
    assert latest.blobs == {"a": ("json", b'"20"')}
    assert latest.writes == [StoredWrite("t", "", 0, "a", ("json", b'"w20"'))]
    assert len([c async for c in _list(fresh, thread_id)]) == 20


async def test_many_upserts_refused_as_a_batch_fail_typed_and_store_none_of_it(
    connection: CosmosConnection,
) -> None:
    """A refusal of a batch of upserts is the typed error the same refusal of one upsert
    is (here a document without an id), and the batch's other documents are not stored."""
    io = PartitionIO(connection)
    thread_id = thread()
    docs = [{"id": f"doc{n}", "thread_id": thread_id} for n in range(3)]
    with pytest.raises(InvalidValue, match="HTTP 400"):
        await io.upsert_all([*docs, {"thread_id": thread_id}])
    with pytest.raises(InvalidValue, match="HTTP 400"):
        await io.upsert({"thread_id": thread_id})
    assert await partition(connection, thread_id) == []


async def test_ids_deleted_one_each_after_their_batches_met_a_missing_one_stay_bounded(
    connection: CosmosConnection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Batches refused for an id already gone fall back to one delete per id, all of
    them in one bounded gather: no more in flight than any other gather."""
    io = PartitionIO(connection)
    thread_id = thread()
    docs = [{"id": f"doc{n}", "thread_id": thread_id} for n in range(300)]
    await io.upsert_all(docs)
    in_flight = peak = 0
    delete = PartitionIO.delete

    async def counted_delete(self: PartitionIO, doc_id: str, partition_key: str) -> bool:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        try:
            return await delete(self, doc_id, partition_key)
        finally:
            in_flight -= 1

    monkeypatch.setattr(PartitionIO, "delete", counted_delete)
    # Each batch of a hundred names one id that is not there.
    ids = [doc["id"] for doc in docs]
    await io.delete_ids(thread_id, [*ids[:50], "gone0", *ids[50:149], "gone1", *ids[149:]])
    assert await partition(connection, thread_id) == []
    assert 1 < peak <= CONCURRENT_REQUESTS


async def test_a_transactional_batch_applies_all_of_it_or_nothing(
    connection: CosmosConnection,
) -> None:
    """The emulator's batch (scripts/cosmos-emulator.js) is all or nothing, as Cosmos's is."""
    io = PartitionIO(connection)
    thread_id = thread()
    kept = {"id": "kept", "thread_id": thread_id, "v": 1}
    await io.upsert(kept)

    with pytest.raises(BatchRefused) as refused:
        await io.batch(
            thread_id,
            [
                ("upsert", ({"id": "kept", "thread_id": thread_id, "v": 2},)),
                ("upsert", ({"id": "new", "thread_id": thread_id},)),
                ("create", ({"id": "kept", "thread_id": thread_id},)),  # exists: refused
            ],
        )
    assert (refused.value.status, refused.value.index) == (409, 2)
    assert comparable(await partition(connection, thread_id)) == {"kept": kept}

    applied = await io.batch(
        thread_id,
        [
            ("upsert", ({"id": "kept", "thread_id": thread_id, "v": 2},)),
            ("create", ({"id": "new", "thread_id": thread_id},)),
        ],
    )
    assert [doc["id"] for doc in applied] == ["kept", "new"]
    assert comparable(await partition(connection, thread_id)) == {
        "kept": {"id": "kept", "thread_id": thread_id, "v": 2},
        "new": {"id": "new", "thread_id": thread_id},
    }


# --------------------------------------------------------------------------- maintenance


async def test_removing_checkpoints_keeps_the_values_kept_ones_name(
    small_items: CosmosCheckpointStore, connection: CosmosConnection
) -> None:
    thread_id = thread()
    ledger = ("bytes", os.urandom(15_000))  # chunked, written once in run A
    await small_items.put_checkpoint(
        stored(thread_id, 1, {"ledger": "1"}, run_id="A"), [StoredBlob("ledger", "1", ledger)]
    )
    for n, run in ((2, "A"), (3, "B"), (4, "B")):
        await small_items.put_checkpoint(
            stored(thread_id, n, {"ledger": "1", "n": str(n)}, run_id=run),
            [StoredBlob("n", str(n), ("json", str(n).encode()))],
        )
    await small_items.put_writes(
        thread_id,
        "",
        checkpoint_id(1),
        [StoredWrite("t", "", 0, "x", ("json", b"1"))],
        upsert=False,
    )

    await small_items.delete_for_runs(["A"])
    left = [c async for c in _list(small_items, thread_id)]
    assert [c.checkpoint_id for c in left] == [checkpoint_id(4), checkpoint_id(3)]
    assert all(c.blobs is not None and c.blobs["ledger"] == ledger for c in left)
    docs = await partition(connection, thread_id)
    # (Chunks, and the blocks of the ledger, shared by every version: checked by reading.)
    assert sorted(
        d["type"] for d in docs if d["type"] not in ("checkpoint_chunk", "checkpoint_block")
    ) == [
        "checkpoint",
        "checkpoint",
        "checkpoint_values",  # checkpoint 1 reduced to the ledger checkpoint 3 and 4 name
    ]

    await small_items.prune([thread_id], strategy="keep_latest")
    [latest] = [c async for c in _list(small_items, thread_id)]
    assert latest.checkpoint_id == checkpoint_id(4)
    assert latest.blobs == {"ledger": ledger, "n": ("json", b"4")}
    docs = await partition(connection, thread_id)
    holders = [d for d in docs if d["type"] == "checkpoint_values"]
    assert [sorted(d["values"]) for d in holders] == [["ledger"]]
    chunks = {d["id"] for d in docs if d["type"] == "checkpoint_chunk"}
    assert chunks == set(layout.chunks_of([layout.to_layout_2(d) for d in docs]))


async def test_a_copied_thread_reads_like_its_source(
    small_items: CosmosCheckpointStore,
) -> None:
    source, target = thread(), thread()
    ledger = ("bytes", os.urandom(15_000))
    await small_items.put_checkpoint(
        stored(source, 1, {"ledger": "1"}), [StoredBlob("ledger", "1", ledger)]
    )
    await small_items.put_checkpoint(stored(source, 2, {"ledger": "1"}), [])
    await small_items.put_writes(
        source, "", checkpoint_id(2), [StoredWrite("t", "", 0, "x", ("json", b"1"))], upsert=False
    )
    await small_items.copy_thread(source, target)
    copied = [c async for c in _list(small_items, target)]
    original = [c async for c in _list(small_items, source)]
    assert [(c.checkpoint_id, c.blobs, c.writes) for c in copied] == [
        (c.checkpoint_id, c.blobs, c.writes) for c in original
    ]
    assert {c.thread_id for c in copied} == {target}


@pytest.mark.parametrize("damage", [{"data": None}, {"data": 7}], ids=["no data", "data"])
async def test_a_damaged_chunk_document_is_corrupt_state(
    small_items: CosmosCheckpointStore, connection: CosmosConnection, damage: dict[str, Any]
) -> None:
    # As a damaged block document is (`layout.block_of`): a spilled value's chunk that
    # lost its data, or holds something else, reads as damage, not a KeyError.
    thread_id = thread()
    await small_items.put_checkpoint(stored(thread_id, 1, {}), [])
    big = ("bytes", os.urandom(20_000))  # incompressible: several chunks
    write = StoredWrite("task-1", "", 0, "attachment", big)
    await small_items.put_writes(thread_id, "", checkpoint_id(1), [write], upsert=False)
    container = await connection.container()
    docs = await partition(connection, thread_id)
    chunk = next(doc for doc in docs if doc["type"] == layout.CHUNK)
    changed = {k: v for k, v in {**chunk, **damage}.items() if not k.startswith("_")}
    await container.upsert_item({k: v for k, v in changed.items() if v is not None})
    with pytest.raises(CorruptState):
        await small_items.get_writes(thread_id, "", checkpoint_id(1))


async def _damage(
    connection: CosmosConnection, thread_id: str, doc_id: str, damage: dict[str, Any]
) -> None:
    """The stored document `doc_id` with `damage` applied (a field None: removed; a
    callable: applied to the document)."""
    container = await connection.container()
    [doc] = [doc for doc in await partition(connection, thread_id) if doc["id"] == doc_id]
    doc = {k: v for k, v in doc.items() if not k.startswith("_")}
    for key, value in damage.items():
        doc[key] = value(doc) if callable(value) else value
    await container.upsert_item({k: v for k, v in doc.items() if v is not None})


def _in_entry(field: str, value: Any) -> Any:
    """Damage to the checkpoint's own entry (None: the field removed)."""
    return lambda doc: {
        k: v for k, v in {**doc["checkpoint"], field: value}.items() if v is not None
    }


def _in_value(field: str, value: Any) -> Any:
    """Damage to the entry of the `ledger` value the checkpoint holds."""
    return lambda doc: {
        "ledger": {
            k: v for k, v in {**doc["values"]["ledger"], field: value}.items() if v is not None
        }
    }


CHECKPOINT_DAMAGE = {
    "no parts": {"checkpoint": _in_entry("parts", None)},
    "parts text": {"checkpoint": _in_entry("parts", "x")},
    "no data": {"checkpoint": _in_entry("data", None)},
    "data number": {"checkpoint": _in_entry("data", 5)},
    "no enc": {"checkpoint": _in_entry("enc", None)},
    "no serde": {"checkpoint": _in_entry("serde", None)},
    "entry a list": {"checkpoint": []},
    "value parts": {"values": _in_value("parts", [2])},
    "value no version": {"values": _in_value("version", None)},
    "value a string": {"values": {"ledger": "x"}},
    "values a list": {"values": []},
    "metadata a list": {"metadata": [1]},
    "metadata_json not JSON": {"metadata_json": "{"},
    "no metadata": {"metadata": None},
    "versions a list": {"channel_versions": ["ledger"]},
    "no versions": {"channel_versions": None},
    "value_at a list": {"value_at": ["x"]},
    "value_at holder a list": {"value_at": {"ledger": ["x"]}},
    "parent a list": {"parent_checkpoint_id": [1]},
    "delta_seed a list": {"delta_seed": [1]},
    "delta_seed entry a string": {"delta_seed": {"ledger": "x"}},
    "delta_seed entry without since": {"delta_seed": {"ledger": {"holder": None}}},
    "layout text": {"layout": "two"},
    "schema_version text": {"schema_version": "x"},
}


@pytest.mark.parametrize("damage", CHECKPOINT_DAMAGE.values(), ids=CHECKPOINT_DAMAGE.keys())
async def test_a_damaged_checkpoint_document_is_corrupt_state(
    store: CosmosCheckpointStore, connection: CosmosConnection, damage: dict[str, Any]
) -> None:
    # A checkpoint document of the wrong shape reads as damage, typed, from every reader
    # (not a KeyError or TypeError past the saver's handlers). The damaged one has a
    # parent, so one with a `delta_seed` is read by the delta-history fast path.
    thread_id = thread()
    ledger = ("json", b'"ledger"')
    await store.put_checkpoint(stored(thread_id, 1, {}), [])
    await store.put_checkpoint(
        stored(thread_id, 2, {"ledger": "1"}), [StoredBlob("ledger", "1", ledger)]
    )
    await _damage(connection, thread_id, layout.checkpoint_doc_id("", checkpoint_id(2)), damage)
    with pytest.raises(CorruptState):
        await store.get_checkpoint(thread_id, "", checkpoint_id(2))
    with pytest.raises(CorruptState):
        await store.get_checkpoint(thread_id, "", None)
    with pytest.raises(CorruptState):
        [c async for c in _list(store, thread_id)]
    # Maintenance reads less of a checkpoint (not its metadata_json): damage there or none.
    with contextlib.suppress(CorruptState):
        await store.copy_thread(thread_id, thread())
    with contextlib.suppress(CorruptState):
        await store.prune([thread_id], strategy="keep_latest")


WRITE_DAMAGE = {
    "writes a dict": {"writes": {"a": 1}},
    "no writes": {"writes": None},
    "write no idx": {"writes": lambda doc: [{**doc["writes"][0], "idx": None}]},
    "write idx text": {"writes": lambda doc: [{**doc["writes"][0], "idx": "zero"}]},
    "write no channel": {
        "writes": lambda doc: [{k: v for k, v in doc["writes"][0].items() if k != "channel"}]
    },
    "write no data": {
        "writes": lambda doc: [{k: v for k, v in doc["writes"][0].items() if k != "data"}]
    },
    "write parts a list": {"writes": lambda doc: [{**doc["writes"][0], "parts": [2]}]},
    "write a string": {"writes": ["x"]},
    "no task_id": {"task_id": None},
    "no task_path": {"task_path": None},
}


@pytest.mark.parametrize("damage", WRITE_DAMAGE.values(), ids=WRITE_DAMAGE.keys())
async def test_a_damaged_write_document_is_corrupt_state(
    store: CosmosCheckpointStore, connection: CosmosConnection, damage: dict[str, Any]
) -> None:
    thread_id = thread()
    await store.put_checkpoint(stored(thread_id, 1, {}), [])
    write = StoredWrite("task-1", "", 0, "x", ("json", b"1"))
    await store.put_writes(thread_id, "", checkpoint_id(1), [write], upsert=False)
    doc_id = layout.task_writes_doc_id("", checkpoint_id(1), "task-1")
    await _damage(connection, thread_id, doc_id, damage)
    with pytest.raises(CorruptState):
        await store.get_writes(thread_id, "", checkpoint_id(1))
    with pytest.raises(CorruptState):
        await store.get_checkpoint(thread_id, "", checkpoint_id(1))
    # A later write of the task merges into the stored document (as a flush does).
    more = StoredWrite("task-1", "", 1, "y", ("json", b"2"))
    with pytest.raises(CorruptState):
        await store.put_writes(thread_id, "", checkpoint_id(1), [more], upsert=False)
    with pytest.raises(CorruptState):
        [c async for c in _list(store, thread_id)]


async def test_a_damaged_values_holder_is_corrupt_state(
    store: CosmosCheckpointStore, connection: CosmosConnection
) -> None:
    # The values a pruned checkpoint leaves for a kept one (a `checkpoint_values`
    # document) are read by the kept one and by the collection of blocks.
    thread_id = thread()
    ledger = ("json", b'"ledger"')
    await store.put_checkpoint(
        stored(thread_id, 1, {"ledger": "1"}), [StoredBlob("ledger", "1", ledger)]
    )
    await store.put_checkpoint(stored(thread_id, 2, {"ledger": "1"}), [])
    await store.prune([thread_id], strategy="keep_latest")
    holder_id = layout.checkpoint_doc_id("", checkpoint_id(1))
    docs = {doc["id"]: doc for doc in await partition(connection, thread_id)}
    assert docs[holder_id]["type"] == layout.VALUES
    await _damage(connection, thread_id, holder_id, {"values": _in_value("parts", None)})
    with pytest.raises(CorruptState):
        await store.get_checkpoint(thread_id, "", checkpoint_id(2))
    with pytest.raises(CorruptState):
        await store.prune([thread_id], strategy="keep_latest")


async def test_a_damaged_value_at_is_corrupt_state_to_a_delta_history(
    store: CosmosCheckpointStore, connection: CosmosConnection
) -> None:
    # The lineage `delta_history` walks is read as rows of a query, not whole documents.
    thread_id = thread()
    ledger = ("json", b'"ledger"')
    await store.put_checkpoint(
        stored(thread_id, 1, {"ledger": "1"}), [StoredBlob("ledger", "1", ledger)]
    )
    await store.put_checkpoint(stored(thread_id, 2, {"ledger": "1"}), [])
    await _damage(
        connection,
        thread_id,
        layout.checkpoint_doc_id("", checkpoint_id(1)),
        {"value_at": {"ledger": ["x"]}},
    )
    with pytest.raises(CorruptState):
        await store.delta_history(thread_id, "", checkpoint_id(2), ["ledger"])
