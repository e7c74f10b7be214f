"""The Cosmos adapters within Azure's request limits, which the local emulator does not enforce.

Every request goes through `LimitedTransport` (tests/support/cosmos_limits.py): one
that Azure would refuse (a body over 2 MB, a batch over 100 operations, an id it does
not accept...) is refused here the same way, so these tests fail where Azure would.
"""

from __future__ import annotations

import base64
import dataclasses
import os
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import pytest
from langgraph.checkpoint.base import empty_checkpoint

from state.checkpoint import TieredCheckpointSaver
from state.cold import cosmos_client
from state.cold.cosmos_checkpoints import CosmosCheckpointStore
from state.cold.cosmos_client import CosmosConnection
from state.cold.cosmos_io import PartitionIO
from state.cold.cosmos_store import CosmosStateStore
from state.errors import VersionConflict
from state.factory import backends_for
from state.ports import (
    CheckpointPut,
    SectionWrite,
    StoredBlob,
    StoredCheckpoint,
    StoredWrite,
    WritesPut,
)
from state.settings import Settings
from state.size import ColdRecordArchive
from tests.support.cosmos import partition, stores_over
from tests.support.cosmos_limits import REQUEST_BYTES, LimitedTransport


@dataclass
class Limited:
    cold: CosmosStateStore
    checkpoints: CosmosCheckpointStore
    transport: LimitedTransport
    settings: Settings
    connection: CosmosConnection


@pytest.fixture
async def limited(settings_for: Callable[..., Settings]) -> AsyncIterator[Limited]:
    settings = settings_for("cosmos", redis_url=None)
    transport = LimitedTransport()
    async with stores_over(settings, transport) as (connection, cold, checkpoints):
        yield Limited(cold, checkpoints, transport, settings, connection)


def text(size: int) -> str:
    """Incompressible ASCII of `size` characters."""
    return base64.b64encode(os.urandom(size))[:size].decode()


# ------------------------------------------------------------------- records


async def test_a_record_and_its_audit_entry_over_one_request_are_stored(limited: Limited) -> None:
    """Each document is under the item limit, together they are over a request's 2 MB:
    a create and an update send the record and its audit entry (`before`, `after`) in
    one transactional batch."""
    thread_id = f"lim-rec-{uuid.uuid4().hex[:8]}"
    cold = limited.cold
    first = {"a": text(1_100_000)}
    created = await cold.create(thread_id, first, agent_id="limits")
    assert created.sections == first
    second = text(600_000)
    updated = await cold.update_section(
        thread_id, "a", second, expected_version=1, agent_id="limits"
    )
    assert updated.version == 2 and updated.sections["a"] == second
    trail = await cold.audit_trail(thread_id)
    assert [entry.version for entry in trail] == [2, 1]
    assert trail[0].after == second and trail[0].before == first["a"]
    assert limited.transport.violations == []


async def test_non_ascii_text_is_sent_as_utf8_not_escaped(limited: Limited) -> None:
    """A record of accented text under the item limit in UTF-8 (its size as this project
    checks it): sent with each character escaped (`\\u00e9`, six bytes for two), the
    request would be three times that and over Azure's 2 MB."""
    thread_id = f"lim-utf8-{uuid.uuid4().hex[:8]}"
    accented = "é" * 400_000  # 800 KB in UTF-8; 2.4 MB escaped
    created = await limited.cold.create(thread_id, {"a": accented}, agent_id="limits")
    assert created.sections == {"a": accented}
    assert (await limited.cold.get(thread_id)) == created
    assert limited.transport.violations == []


async def test_a_large_update_that_loses_a_race_leaves_no_entry_in_the_trail(
    limited: Limited,
) -> None:
    """Its entries that did not fit the record's batch were written first: the record's
    write refused (changed meanwhile), they are orphans no chain reaches."""
    thread_id = f"lim-race-{uuid.uuid4().hex[:8]}"
    mine = limited.cold  # remembers the record it created: it will not read first
    other = CosmosStateStore(
        limited.connection, max_item_bytes=limited.settings.state_max_item_bytes
    )
    await mine.create(thread_id, {"a": text(1_100_000)}, agent_id="mine")
    await other.update_section(thread_id, "b", 1, expected_version=1, agent_id="other")
    with pytest.raises(VersionConflict):
        await mine.update_section(
            thread_id, "a", text(600_000), expected_version=1, agent_id="mine"
        )
    assert [e.agent_id for e in await mine.audit_trail(thread_id)] == ["other", "mine"]
    value = text(600_000)
    await mine.update_section(thread_id, "a", value, expected_version=2, agent_id="mine")
    trail = await mine.audit_trail(thread_id)
    assert [(e.version, e.agent_id) for e in trail] == [(3, "mine"), (2, "other"), (1, "mine")]
    assert trail[0].after == value
    assert limited.transport.violations == []


async def test_an_update_of_more_sections_than_a_batch_holds_is_stored(limited: Limited) -> None:
    thread_id = f"lim-many-{uuid.uuid4().hex[:8]}"
    cold = limited.cold
    await cold.create(thread_id, {}, agent_id="limits")
    writes = [SectionWrite(f"s{n:03d}", n, "limits") for n in range(120)]
    record = await cold.update_sections(thread_id, writes, expected_version=1)
    assert record.version == 121 and record.sections["s119"] == 119
    trail = await cold.audit_trail(thread_id, limit=200)
    assert [entry.version for entry in trail] == list(range(121, 0, -1))
    assert limited.transport.violations == []


async def test_an_archived_value_over_one_item_is_stored(limited: Limited) -> None:
    """The archive splits a value into records of one item each; each record is created
    with its audit entry (which holds the chunk again) in one batch."""
    archive = ColdRecordArchive(
        limited.cold,
        max_item_bytes=limited.settings.state_max_item_bytes,
        compress_threshold_bytes=limited.settings.state_compress_threshold_bytes,
    )
    value = {"blob": text(2_500_000)}
    ref = await archive.archive(f"lim-arch-{uuid.uuid4().hex[:8]}", "big", value)
    assert await archive.fetch_archived(ref) == value
    assert limited.transport.violations == []


# ------------------------------------------------------------------- checkpoints


def checkpoint(thread_id: str, ns: str, index: int, parent: str | None) -> StoredCheckpoint:
    return StoredCheckpoint(
        thread_id=thread_id,
        checkpoint_ns=ns,
        checkpoint_id=f"1ef{index:05d}-0000-6000-8000-000000000000",
        parent_checkpoint_id=parent,
        checkpoint=("json", b'{"v": 1}'),
        metadata={"step": index},
        channel_versions={"messages": f"{index:032d}"},
    )


async def test_checkpoint_ids_from_any_namespace_and_task_are_accepted(limited: Limited) -> None:
    """Namespaces, task ids and channels with the characters Azure refuses in ids, and
    ones long enough that an id built from them would pass 1,023 bytes."""
    thread_id = f"lim-ids-{uuid.uuid4().hex[:8]}"
    store = limited.checkpoints
    for ns in ["graph|sub:1/2\\3?4#5", "é" * 600]:
        stored = checkpoint(thread_id, ns, 1, None)
        blob = StoredBlob("messages", f"{1:032d}", ("json", b'["x"]'))
        await store.put_checkpoint(stored, [blob])
        task = "task/with?odd#chars\\" + "t" * 900
        write = StoredWrite(task, "path", 0, "ch/a#n", ("json", b"1"))
        await store.put_writes(thread_id, ns, stored.checkpoint_id, [write], upsert=False)
        special = StoredWrite(task, "path", -1, "__error__", ("json", b"2"))
        await store.put_writes(thread_id, ns, stored.checkpoint_id, [special], upsert=True)
        found = await store.get_checkpoint(thread_id, ns, stored.checkpoint_id)
        assert found is not None and found.blobs is not None and found.writes is not None
        assert found.blobs["messages"] == ("json", b'["x"]')
        assert {(w.task_id, w.idx) for w in found.writes} == {(task, 0), (task, -1)}
    await store.delete_thread(thread_id)
    assert limited.transport.violations == []


async def test_a_large_write_behind_flush_stays_within_batch_limits(limited: Limited) -> None:
    """Hundreds of steps with large values in one flush, then copied, pruned and deleted:
    every batch is within 100 operations and 2 MB."""
    thread_id = f"lim-flush-{uuid.uuid4().hex[:8]}"
    ops: list[CheckpointPut] = []
    parent = None
    for index in range(1, 151):
        stored = checkpoint(thread_id, "", index, parent)
        value = ("json", f'"{text(20_000 if index % 50 else 1_500_000)}"'.encode())
        ops.append(CheckpointPut(stored, [StoredBlob("messages", f"{index:032d}", value)]))
        parent = stored.checkpoint_id
    store = limited.checkpoints
    await store.apply_batch(ops, fence=1)
    found = await store.get_checkpoint(thread_id, "", None)
    assert found is not None and found.checkpoint_id == parent
    # Maintenance moves the same documents in bulk.
    copy = f"{thread_id}-copy"
    await store.copy_thread(thread_id, copy)
    await store.prune([copy], strategy="keep_latest")
    found = await store.get_checkpoint(copy, "", None)
    assert found is not None and found.checkpoint_id == parent
    await store.delete_thread(thread_id, fence=2)
    await store.delete_thread(copy)
    assert await store.get_checkpoint(thread_id, "", None) is None
    assert limited.transport.violations == []
    assert limited.transport.batches
    assert all(size <= REQUEST_BYTES and count <= 100 for size, count in limited.transport.batches)


# ------------------------------------------------------------------- one id twice


def write_value(found: StoredCheckpoint | None, task: str, idx: int) -> bytes:
    assert found is not None and found.writes is not None
    [write] = [w for w in found.writes if (w.task_id, w.idx) == (task, idx)]
    return write.value[1]


@pytest.mark.parametrize("fence", [None, 1])
async def test_a_flush_that_repeats_a_document_sends_it_once_per_batch(
    limited: Limited, fence: int | None
) -> None:
    """The log holds each put as it came: an error recorded twice for one task, a task's
    writes retried with one more index, a checkpoint put again. Applied in one flush, the
    result is the calls' in order, and no batch names a document twice."""
    thread_id = f"lim-dup-{uuid.uuid4().hex[:8]}"
    stored = checkpoint(thread_id, "", 1, None)
    large = ("json", f'"{text(600_000)}"'.encode())
    where = (thread_id, "", stored.checkpoint_id)
    ops = [
        CheckpointPut(stored, [StoredBlob("messages", f"{1:032d}", large)]),
        CheckpointPut(stored, [StoredBlob("messages", f"{1:032d}", large)]),
        WritesPut(*where, [StoredWrite("t1", "p", -1, "__error__", ("json", b'"one"'))], True),
        WritesPut(*where, [StoredWrite("t1", "p", -1, "__error__", ("json", b'"two"'))], True),
        WritesPut(*where, [StoredWrite("t2", "p", 0, "a", ("json", b'"first"'))], False),
        WritesPut(
            *where,
            [
                StoredWrite("t2", "p", 0, "a", ("json", b'"retried"')),
                StoredWrite("t2", "p", 1, "b", ("json", b'"added"')),
            ],
            False,
        ),
    ]
    await limited.checkpoints.apply_batch(ops, fence=fence)
    assert limited.transport.violations == []
    found = await limited.checkpoints.get_checkpoint(thread_id, "", stored.checkpoint_id)
    assert write_value(found, "t1", -1) == b'"two"'
    assert write_value(found, "t2", 0) == b'"first"'
    assert write_value(found, "t2", 1) == b'"added"'
    assert found is not None and found.blobs is not None
    assert found.blobs["messages"] == large


@pytest.mark.parametrize("fence", [None, 1])
async def test_one_large_value_in_two_channels_and_namespaces_is_flushed(
    limited: Limited, fence: int | None
) -> None:
    """Its blocks are documents named by their digest: two channels of one checkpoint, and
    a subgraph's checkpoint in the same flush, store the same block documents."""
    thread_id = f"lim-blk-{uuid.uuid4().hex[:8]}"
    large = ("json", f'"{text(40_000)}"'.encode())  # blocks of a few steps fit one batch
    ops = []
    for ns in ["", "sub:1"]:
        stored = dataclasses.replace(
            checkpoint(thread_id, ns, 1, None),
            channel_versions={"messages": f"{1:032d}", "copy": f"{1:032d}"},
        )
        blobs = [StoredBlob(ch, f"{1:032d}", large) for ch in ("messages", "copy")]
        ops.append(CheckpointPut(stored, blobs))
    await limited.checkpoints.apply_batch(ops, fence=fence)
    assert limited.transport.violations == []
    for op in ops:
        found = await limited.checkpoints.get_checkpoint(
            thread_id, op.checkpoint.checkpoint_ns, op.checkpoint.checkpoint_id
        )
        assert found is not None and found.blobs == {"messages": large, "copy": large}


async def test_writes_repeated_before_a_write_behind_flush_are_flushed(
    settings_for: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the saver: a resume put twice for one task, and a task's writes retried,
    wait in the log as entries naming one document each (neither is a boundary, so one
    flush takes them all); the flush stores the second resume and the first writes."""
    transport = LimitedTransport()
    monkeypatch.setattr(cosmos_client, "EnvironmentProxyTransport", lambda: transport)
    settings = settings_for("cosmos", state_write_mode="write-behind")
    async with backends_for(settings) as backends:
        saver = TieredCheckpointSaver.from_backends(backends)
        thread = f"lim-saver-{uuid.uuid4().hex[:8]}"
        config = await saver.aput(
            {"configurable": {"thread_id": thread, "checkpoint_ns": ""}},
            empty_checkpoint(),
            {},
            {},
        )
        await saver.aput_writes(config, [("__resume__", "first answer")], "task-1")
        await saver.aput_writes(config, [("__resume__", "second answer")], "task-1")
        await saver.aput_writes(config, [("a", "first")], "task-2")
        await saver.aput_writes(config, [("a", "retried"), ("b", "added")], "task-2")
        await saver.aflush(thread)
        assert transport.violations == []
        assert backends.hot_checkpoints is not None
        await backends.hot_checkpoints.invalidate(thread)
        latest = await saver.aget_tuple({"configurable": {"thread_id": thread}})
        assert latest is not None
        assert sorted(latest.pending_writes or []) == [
            ("task-1", "__resume__", "second answer"),
            ("task-2", "a", "first"),
            ("task-2", "b", "added"),
        ]


async def test_documents_upserted_twice_in_one_call_are_stored_as_the_last(
    limited: Limited,
) -> None:
    """`upsert_all` (a step's blocks and chunks, stored ahead of it) with one id twice: one
    operation for it, with the last document."""
    thread_id = f"lim-upsert-{uuid.uuid4().hex[:8]}"
    io = PartitionIO(limited.connection)
    await io.upsert_all(
        [
            {"id": doc_id, "thread_id": thread_id, "v": v}
            for doc_id, v in [("a", 1), ("b", 1), ("a", 2)]
        ]
    )
    assert limited.transport.violations == []
    stored = {doc["id"]: doc["v"] for doc in await partition(limited.connection, thread_id)}
    assert stored == {"a": 2, "b": 1}
