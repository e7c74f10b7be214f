"""SizedStateStore over in-memory fakes of the record store and the archive: the size
layer's own decisions (what it writes below, when it offloads and writes again), in
milliseconds. Over the real tiers: tests/test_tiered.py."""

from __future__ import annotations

import os

import pytest

from state.errors import StateTooLarge, VersionConflict, WorkflowNotFound
from state.ports import JSON, AuditEntry, WorkflowRecord
from state.size import (
    ARCHIVED_KEY,
    SizePolicy,
    StateSizeManager,
    canonical_json,
    is_offloaded,
    pruned_summary,
)
from state.sized import SizedStateStore

ITEM_LIMIT = 40_000


class MemoryRecords:
    """A `RecordStore` in a dict that refuses records over `limit` bytes, as Cosmos does."""

    def __init__(self, limit: int = ITEM_LIMIT) -> None:
        self.records: dict[str, WorkflowRecord] = {}
        self.limit = limit
        self.reads = 0
        # (section, expected version) of every update tried, refused ones included.
        self.updates: list[tuple[str, int]] = []

    async def get(self, thread_id: str) -> WorkflowRecord | None:
        self.reads += 1
        return self.records.get(thread_id)

    async def create(
        self, thread_id: str, sections: dict[str, JSON], *, agent_id: str
    ) -> WorkflowRecord:
        return self._store(WorkflowRecord(thread_id, 1, dict(sections), 1, "t0", "t0"))

    async def update_section(
        self,
        thread_id: str,
        section: str,
        value: JSON,
        *,
        expected_version: int,
        agent_id: str,
        fencing_token: int | None = None,
    ) -> WorkflowRecord:
        self.updates.append((section, expected_version))
        current = self.records.get(thread_id)
        if current is None:
            raise WorkflowNotFound(thread_id)
        if current.version != expected_version:
            raise VersionConflict(thread_id, expected_version, current.version)
        sections = {**current.sections, section: value}
        return self._store(WorkflowRecord(thread_id, current.version + 1, sections, 1, "t0", "t1"))

    async def audit_trail(self, thread_id: str, *, limit: int = 50) -> list[AuditEntry]:
        return []

    def _store(self, record: WorkflowRecord) -> WorkflowRecord:
        size = len(canonical_json(record.sections))
        if size > self.limit:
            raise StateTooLarge(f"record {record.thread_id!r}", size, self.limit)
        self.records[record.thread_id] = record
        return record


class MemoryArchive:
    def __init__(self) -> None:
        self.values: dict[str, JSON] = {}

    async def archive(self, thread_id: str, section: str, value: JSON) -> str:
        ref = f"{thread_id}~archive~{canonical_json(value).hex()[:32]}"
        self.values[ref] = value
        return ref

    async def fetch_archived(self, ref: str) -> JSON:
        return self.values[ref]


def sized(records: MemoryRecords, **policy: object) -> SizedStateStore:
    values: dict[str, object] = {
        "message_window": 3,
        "message_sections": frozenset({"messages"}),
        "reasoning_sections": frozenset(),
        "reasoning_max_chars": 80,
        "compress_threshold_bytes": 2048,
        "archivable_sections": frozenset({"billing"}),
        "max_item_bytes": ITEM_LIMIT,
    }
    values.update(policy)
    manager = StateSizeManager(SizePolicy(**values), MemoryArchive())  # type: ignore[arg-type]
    return SizedStateStore(records, manager)


def noise(size: int) -> str:
    """Incompressible text: compression cannot make it fit."""
    return os.urandom(size // 2).hex()


async def test_a_refused_section_is_offloaded_and_written_again_at_the_same_version() -> None:
    records = MemoryRecords()
    store = sized(records)
    # Written past the layer: most of an item already, yet each section alone is small.
    await records.create("t", {f"s{n}": noise(11_000) for n in range(3)}, agent_id="x")
    value = noise(9000)
    assert len(value) < ITEM_LIMIT // 4  # inline on its own
    record = await store.update_section("t", "d", value, agent_id="x")
    assert record.version == 2 and record.sections["d"] == value  # plain on the way out
    assert records.updates == [("d", 1), ("d", 1)]  # refused, then the same version again
    assert is_offloaded(records.records["t"].sections["d"])
    fetched = await store.get("t")
    assert fetched is not None and fetched.sections["d"] == value


async def test_a_record_too_large_for_reasons_of_other_sections_is_refused_once() -> None:
    records = MemoryRecords()
    store = sized(records)
    await records.create("t", {f"s{n}": noise(9000) for n in range(4)}, agent_id="x")
    records.limit = ITEM_LIMIT // 2  # what is already there no longer fits
    big = noise(ITEM_LIMIT // 2)  # offloaded by the layer at once: nothing left to move
    with pytest.raises(StateTooLarge):
        await store.update_section("t", "d", big, agent_id="x")
    assert records.updates == [("d", 1)]
    assert records.records["t"].version == 1


async def test_without_an_expected_version_the_current_one_is_read_once_below() -> None:
    records = MemoryRecords()
    store = sized(records)
    await store.create("t", {"s": 0}, agent_id="x")
    reads = records.reads
    for value in (1, 2):
        updated = await store.update_section("t", "s", value, agent_id="x")
    assert updated.version == 3 and records.reads == reads + 2
    assert records.updates == [("s", 1), ("s", 2)]
    with pytest.raises(VersionConflict):
        await store.update_section("t", "s", 3, agent_id="x", expected_version=1)
    with pytest.raises(WorkflowNotFound):
        await store.update_section("missing", "s", 1, agent_id="x")


async def test_stored_forms_go_below_plain_values_come_back_and_sizes_are_reported() -> None:
    records = MemoryRecords()
    store = sized(records)
    reported: list[tuple[str, int]] = []
    store.size_listeners.append(lambda operation, size: reported.append((operation, size)))
    messages = [{"role": "user", "content": f"m{n}"} for n in range(6)]
    billing = {"refund": 120.0}
    created = await store.create(
        "t",
        {"messages": messages, "billing": billing},
        agent_id="x",
        completed_sections={"billing"},
    )
    # Pruned (lossy, configured) and archived (the caller said it is done with it).
    assert created.sections["messages"] == [pruned_summary(3), *messages[3:]]
    assert set(created.sections["billing"]) == {ARCHIVED_KEY}
    assert records.records["t"].sections == created.sections  # the stored form, below
    fetched = await store.get("t", fetch_archived=True)
    assert fetched is not None and fetched.sections["billing"] == billing
    await store.update_section("t", "notes", "n", agent_id="x")
    assert [operation for operation, _ in reported] == ["create", "update_section"]
    assert reported[1][1] == len(canonical_json("n"))
