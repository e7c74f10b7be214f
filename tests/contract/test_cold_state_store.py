"""The `ColdStateStore` contract, run against every cold backend on real servers.

The parametrized cases go through `open_backends`, exactly as the app builds its
tiers, and run against the in-memory fake the unit tests use as well. The Cosmos-only
cases at the end cover what only the Cosmos adapter has: two writes per change
reconciled by readers, documents shared with the checkpoint store in one partition,
and the 2 MB item limit the emulator does not enforce (which the fake enforces too).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from state import schema
from state.cold.cosmos_client import CosmosConnection
from state.cold.cosmos_store import CosmosStateStore, audit_id
from state.cold.postgres_store import PostgresStateStore
from state.errors import (
    CorruptState,
    InvalidValue,
    RequestRejected,
    StaleFencingToken,
    StateTooLarge,
    UnsupportedSchemaVersion,
    VersionConflict,
    WorkflowExists,
    WorkflowNotFound,
)
from state.factory import open_backends
from state.ports import (
    CREATED_SECTION,
    Caller,
    ColdStateStore,
    SectionWrite,
    WorkflowRecord,
    acting_for,
)
from state.settings import Settings
from tests.support.cosmos import partition
from tests.support.cosmos_faults import Fault, FaultyTransport
from tests.support.fakes import MEMORY, MemoryColdStore
from tests.support.records import unique_thread

LOST_UPDATE_WRITERS = 8
LOST_UPDATE_ATTEMPTS = 5


@pytest.fixture
async def cold(any_backend: str, request: pytest.FixtureRequest) -> AsyncIterator[ColdStateStore]:
    if any_backend == MEMORY:
        yield MemoryColdStore()
        return
    make_settings: Callable[..., Settings] = request.getfixturevalue("make_settings")
    backends = await open_backends(make_settings(any_backend, hot=False))
    try:
        yield backends.cold
    finally:
        await backends.close()


def test_store_implements_the_port(cold: ColdStateStore, any_backend: str) -> None:
    assert isinstance(cold, ColdStateStore)
    assert cold.name == any_backend


async def test_create_stores_version_one_and_audits_it(cold: ColdStateStore) -> None:
    thread = unique_thread()
    sections = {"intake": {"text": "I was charged twice"}, "billing": None, "messages": []}
    created = await cold.create(thread, sections, agent_id="intake")
    assert (created.thread_id, created.version, created.sections) == (thread, 1, sections)
    assert (created.fence, created.schema_version) == (0, schema.CURRENT["workflow"])
    assert created.created_at == created.updated_at
    assert created.created_at.endswith("+00:00")
    assert await cold.get(thread) == created

    [entry] = await cold.audit_trail(thread)
    assert (entry.version, entry.agent_id, entry.section) == (1, "intake", CREATED_SECTION)
    assert (entry.before, entry.after) == (None, sections)
    assert entry.schema_version == schema.CURRENT["audit"]


async def test_a_second_create_raises_and_keeps_the_first(cold: ColdStateStore) -> None:
    thread = unique_thread()
    first = await cold.create(thread, {"a": 1}, agent_id="intake")
    with pytest.raises(WorkflowExists):
        await cold.create(thread, {"a": 2}, agent_id="intruder")
    assert await cold.get(thread) == first
    assert [e.agent_id for e in await cold.audit_trail(thread)] == ["intake"]


async def test_an_unknown_thread_has_no_record_and_no_trail(cold: ColdStateStore) -> None:
    thread = unique_thread()
    assert await cold.get(thread) is None
    assert await cold.audit_trail(thread) == []
    with pytest.raises(WorkflowNotFound):
        await cold.update_section(thread, "a", 1, expected_version=1, agent_id="a")


async def test_record_ids_lists_every_thread_holding_a_record(cold: ColdStateStore) -> None:
    """What a repair reads across threads (the run index rebuilt from the case records)."""
    kept, deleted = unique_thread(), unique_thread()
    for thread in (kept, deleted):
        await cold.create(thread, {"a": 1}, agent_id="a")
    await cold.delete(deleted)
    found = await cold.record_ids()
    assert kept in found and deleted not in found
    assert len(found) == len(set(found))


async def test_update_replaces_one_section_and_audits_the_change(cold: ColdStateStore) -> None:
    thread = unique_thread()
    created = await cold.create(
        thread, {"billing": {"refund": 0}, "account": {"locked": True}}, agent_id="intake"
    )
    updated = await cold.update_section(
        thread, "billing", {"refund": 640.0}, expected_version=1, agent_id="billing"
    )
    assert updated.version == 2
    assert updated.sections == {"billing": {"refund": 640.0}, "account": {"locked": True}}
    assert updated.created_at == created.created_at
    assert updated.updated_at >= created.updated_at
    assert await cold.get(thread) == updated

    added = await cold.update_section(
        thread, "policy", {"escalate": True}, expected_version=2, agent_id="policy"
    )
    assert added.sections["policy"] == {"escalate": True}

    trail = await cold.audit_trail(thread)
    assert [(e.version, e.agent_id, e.section, e.before, e.after) for e in trail[:2]] == [
        (3, "policy", "policy", None, {"escalate": True}),
        (2, "billing", "billing", {"refund": 0}, {"refund": 640.0}),
    ]


async def test_update_sections_writes_several_sections_each_audited_under_its_agent(
    cold: ColdStateStore,
) -> None:
    thread = unique_thread()
    await cold.create(thread, {"billing": {"refund": 0}}, agent_id="intake")
    with acting_for(Caller("oid-1", "alice")):
        updated = await cold.update_sections(
            thread,
            [
                SectionWrite("billing", {"refund": 640.0}, "billing-agent"),
                SectionWrite("policy", {"escalate": True}, "policy-agent"),
                SectionWrite("run", {"status": "completed"}, "case-runner"),
            ],
            expected_version=1,
            fencing_token=7,
        )
    assert (updated.version, updated.fence) == (4, 7)
    assert updated.sections == {
        "billing": {"refund": 640.0},
        "policy": {"escalate": True},
        "run": {"status": "completed"},
    }
    assert await cold.get(thread) == updated
    trail = await cold.audit_trail(thread)
    assert [(e.version, e.agent_id, e.section, e.before, e.after) for e in trail] == [
        (4, "case-runner", "run", None, {"status": "completed"}),
        (3, "policy-agent", "policy", None, {"escalate": True}),
        (2, "billing-agent", "billing", {"refund": 0}, {"refund": 640.0}),
        (1, "intake", CREATED_SECTION, None, {"billing": {"refund": 0}}),
    ]
    assert {e.caller for e in trail[:3]} == {Caller("oid-1", "alice")}
    # The next single write continues the chain.
    after = await cold.update_section(thread, "policy", {}, expected_version=4, agent_id="p")
    assert after.version == 5
    assert [e.version for e in await cold.audit_trail(thread)] == [5, 4, 3, 2, 1]


async def test_update_sections_is_all_or_nothing(cold: ColdStateStore) -> None:
    thread = unique_thread()
    await cold.create(thread, {"s": 0}, agent_id="a")
    current = await cold.update_section(
        thread, "s", 1, expected_version=1, agent_id="a", fencing_token=5
    )
    writes = [SectionWrite("s", 2, "late"), SectionWrite("t", 2, "late")]
    with pytest.raises(VersionConflict):
        await cold.update_sections(thread, writes, expected_version=1)
    with pytest.raises(StaleFencingToken):
        await cold.update_sections(thread, writes, expected_version=2, fencing_token=4)
    with pytest.raises(WorkflowNotFound):
        await cold.update_sections(unique_thread(), writes, expected_version=1)
    with pytest.raises(RequestRejected):
        await cold.update_sections(
            thread, [SectionWrite("s", 2, "a"), SectionWrite("s", 3, "b")], expected_version=2
        )
    assert await cold.get(thread) == current
    assert "late" not in {e.agent_id for e in await cold.audit_trail(thread)}


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "infinity"])
async def test_a_number_json_cannot_carry_is_invalid_and_writes_nothing(
    cold: ColdStateStore, value: float
) -> None:
    """NaN and Infinity have no JSON form: refused as `InvalidValue` (HTTP 422 in the app)
    by every store, before anything is written (the Cosmos emulator would answer 500,
    which reads as an outage to be retried)."""
    thread = unique_thread()
    with pytest.raises(InvalidValue):
        await cold.create(thread, {"refund": {"amount": value}}, agent_id="billing")
    assert await cold.get(thread) is None
    await cold.create(thread, {"refund": {"amount": 1.0}}, agent_id="billing")
    with pytest.raises(InvalidValue):
        await cold.update_section(
            thread, "refund", {"amount": value}, expected_version=1, agent_id="billing"
        )
    with pytest.raises(InvalidValue):
        await cold.update_sections(
            thread,
            [
                SectionWrite("refund", {"amount": 2.0}, "billing"),
                SectionWrite("note", [value], "policy"),
            ],
            expected_version=1,
        )
    record = await cold.get(thread)
    assert record is not None
    assert (record.version, dict(record.sections)) == (1, {"refund": {"amount": 1.0}})
    assert len(await cold.audit_trail(thread, limit=10)) == 1


async def test_a_stale_version_is_a_conflict_and_writes_nothing(cold: ColdStateStore) -> None:
    thread = unique_thread()
    await cold.create(thread, {"s": 0}, agent_id="a")
    current = await cold.update_section(thread, "s", 1, expected_version=1, agent_id="a")
    with pytest.raises(VersionConflict) as conflict:
        await cold.update_section(thread, "s", 99, expected_version=1, agent_id="stale")
    assert (conflict.value.expected, conflict.value.actual) == (1, 2)
    assert await cold.get(thread) == current
    assert "stale" not in {e.agent_id for e in await cold.audit_trail(thread)}


async def test_fencing_tokens_refuse_older_holders(cold: ColdStateStore) -> None:
    thread = unique_thread()
    await cold.create(thread, {"s": 0}, agent_id="a")
    record = await cold.update_section(
        thread, "s", 1, expected_version=1, agent_id="a", fencing_token=5
    )
    assert record.fence == 5
    # The same holder may write again; a writer without a token is not fenced.
    record = await cold.update_section(
        thread, "s", 2, expected_version=2, agent_id="a", fencing_token=5
    )
    record = await cold.update_section(thread, "s", 3, expected_version=3, agent_id="api")
    assert (record.version, record.fence) == (4, 5)

    with pytest.raises(StaleFencingToken) as stale:
        await cold.update_section(
            thread, "s", 99, expected_version=4, agent_id="zombie", fencing_token=4
        )
    assert (stale.value.presented, stale.value.highest) == (4, 5)
    assert await cold.get(thread) == record

    newer = await cold.update_section(
        thread, "s", 5, expected_version=4, agent_id="b", fencing_token=9
    )
    assert (newer.version, newer.fence, newer.sections["s"]) == (5, 9, 5)


async def test_audit_trail_is_newest_first_and_limited(cold: ColdStateStore) -> None:
    thread = unique_thread()
    await cold.create(thread, {"n": 0}, agent_id="intake")
    for version in range(1, 13):
        await cold.update_section(
            thread, "n", version, expected_version=version, agent_id=f"agent-{version}"
        )
    assert [e.version for e in await cold.audit_trail(thread, limit=5)] == [13, 12, 11, 10, 9]
    full = await cold.audit_trail(thread, limit=100)
    assert [e.version for e in full] == list(range(13, 0, -1))
    assert [e.after for e in full[:-1]] == list(range(12, 0, -1))
    assert [e.before for e in full[:-1]] == list(range(11, -1, -1))
    assert all(newer.at >= older.at for newer, older in itertools.pairwise(full))
    assert await cold.audit_trail(thread, limit=0) == []


async def test_audit_entries_carry_the_caller_they_were_written_for(cold: ColdStateStore) -> None:
    thread = unique_thread()
    alice = Caller(id="00000000-0000-0000-0000-00000000a11c", name="Alice Reviewer")
    with acting_for(alice):
        await cold.create(thread, {"review": None}, agent_id="case-api")
        await cold.update_section(
            thread, "review", {"decision": "approve"}, expected_version=1, agent_id="reviewer"
        )
    await cold.update_section(
        thread, "run", {"status": "done"}, expected_version=2, agent_id="runner"
    )
    trail = await cold.audit_trail(thread, limit=10)
    assert [(e.agent_id, e.caller) for e in trail] == [
        ("runner", None),
        ("reviewer", alice),
        ("case-api", alice),
    ]


async def test_concurrent_read_then_update_writers_lose_no_update(
    cold: ColdStateStore, any_backend: str
) -> None:
    thread = unique_thread()
    await cold.create(thread, {"billing": None}, agent_id="intake")

    async def writer(n: int) -> list[tuple[WorkflowRecord, Any] | VersionConflict]:
        outcomes: list[tuple[WorkflowRecord, Any] | VersionConflict] = []
        for attempt in range(LOST_UPDATE_ATTEMPTS):
            current = await cold.get(thread)
            assert current is not None
            await asyncio.sleep(0)  # let the other writers read the same version
            value = {"writer": n, "attempt": attempt}
            try:
                record = await cold.update_section(
                    thread,
                    "billing",
                    value,
                    expected_version=current.version,
                    agent_id=f"writer-{n}",
                )
            except VersionConflict as conflict:
                outcomes.append(conflict)
            else:
                outcomes.append((record, value))
        return outcomes

    results = await asyncio.gather(*(writer(n) for n in range(LOST_UPDATE_WRITERS)))
    outcomes = [outcome for per_writer in results for outcome in per_writer]
    successes = [o for o in outcomes if not isinstance(o, VersionConflict)]
    conflicts = [o for o in outcomes if isinstance(o, VersionConflict)]
    print(
        f"\n[{any_backend}] lost-update: {len(outcomes)} attempts, {len(successes)} successes,"
        f" {len(conflicts)} conflicts"
    )
    assert successes and len(successes) + len(conflicts) == len(outcomes)
    assert all(c.actual is not None and c.actual > c.expected for c in conflicts)

    final = await cold.get(thread)
    assert final is not None
    assert final.version == 1 + len(successes)  # 0 silent overwrites
    versions = sorted(record.version for record, _ in successes)
    assert versions == list(range(2, final.version + 1))
    trail = await cold.audit_trail(thread, limit=len(successes) + 10)
    assert [e.version for e in trail] == list(range(final.version, 0, -1))
    by_version = {e.version: e for e in trail}
    for record, value in successes:
        entry = by_version[record.version]
        assert (entry.after, entry.agent_id) == (value, f"writer-{value['writer']}")
    # Each change starts from what the previous one wrote: nothing in between was lost.
    for version in range(3, final.version + 1):
        assert by_version[version].before == by_version[version - 1].after
    assert final.sections["billing"] == by_version[final.version].after


async def test_writers_at_one_version_leave_one_winner_and_one_audit_entry(
    cold: ColdStateStore,
) -> None:
    thread = unique_thread()
    await cold.create(thread, {"counter": 0}, agent_id="intake")
    writers = 8
    results = await asyncio.gather(
        *(
            cold.update_section(thread, "counter", n, expected_version=1, agent_id=f"agent-{n}")
            for n in range(writers)
        ),
        return_exceptions=True,
    )
    winners = [r for r in results if isinstance(r, WorkflowRecord)]
    losers = [r for r in results if isinstance(r, VersionConflict)]
    assert len(winners) == 1 and len(losers) == writers - 1
    assert all(loser.actual == 2 for loser in losers)
    record = await cold.get(thread)
    assert record is not None and record.version == 2
    assert record.sections["counter"] == winners[0].sections["counter"]
    trail = await cold.audit_trail(thread)
    # Exactly one change was recorded for version 2: the winner's.
    assert [(e.version, e.after) for e in trail if e.version == 2] == [
        (2, winners[0].sections["counter"])
    ]


async def test_delete_removes_record_and_trail_and_the_thread_can_start_over(
    cold: ColdStateStore,
) -> None:
    thread = unique_thread()
    await cold.create(thread, {"s": 0}, agent_id="a")
    for version in range(1, 4):
        await cold.update_section(thread, "s", version, expected_version=version, agent_id="a")
    await cold.delete(thread)
    assert await cold.get(thread) is None
    assert await cold.audit_trail(thread) == []
    await cold.delete(thread)  # deleting nothing is fine

    again = await cold.create(thread, {"s": "new"}, agent_id="b")
    assert again.version == 1
    assert [(e.version, e.agent_id) for e in await cold.audit_trail(thread)] == [(1, "b")]


async def test_records_are_upcast_on_read(
    cold: ColdStateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    thread = unique_thread()
    await cold.create(thread, {"customer": "Ada"}, agent_id="intake")

    def rename_customer(document: schema.Document) -> schema.Document:
        sections = dict(document["sections"])
        sections["customer_name"] = sections.pop("customer")
        return {**document, "sections": sections}

    monkeypatch.setitem(schema.CURRENT, "workflow", schema.CURRENT["workflow"] + 1)
    monkeypatch.setitem(
        schema._UPCASTERS, ("workflow", schema.CURRENT["workflow"] - 1), rename_customer
    )
    record = await cold.get(thread)
    assert record is not None
    assert record.sections == {"customer_name": "Ada"}
    assert record.schema_version == schema.CURRENT["workflow"]
    updated = await cold.update_section(thread, "x", 1, expected_version=1, agent_id="a")
    assert updated.sections == {"customer_name": "Ada", "x": 1}


async def store_sections_as_a_list(cold: ColdStateStore, thread: str) -> None:
    """Damage written by hand, as stored: the record's sections a list, its version kept."""
    if isinstance(cold, MemoryColdStore):
        cold._records[thread]["sections"] = []
    elif isinstance(cold, PostgresStateStore):
        async with cold._pg.connection("test") as conn:
            await conn.execute(
                "UPDATE workflow_records SET sections = '[]'::jsonb WHERE thread_id = %s",
                (thread,),
            )
    else:
        assert isinstance(cold, CosmosStateStore)
        container = await cold._connection.container()
        record = await container.read_item("wf", partition_key=thread)
        await container.replace_item("wf", {**record, "sections": []})


async def test_a_record_of_no_record_shape_is_replaced_whole_at_its_version(
    cold: ColdStateStore,
) -> None:
    thread = unique_thread()
    await cold.create(thread, {"cases": {"a": "t0"}}, agent_id="intake")
    await cold.update_section(
        thread, "cases", {"a": "t1"}, expected_version=1, agent_id="a", fencing_token=7
    )
    await store_sections_as_a_list(cold, thread)
    with pytest.raises(CorruptState):
        await cold.get(thread)
    with pytest.raises(CorruptState):  # a section's update cannot write over it either
        await cold.update_section(thread, "cases", {}, expected_version=2, agent_id="a")
    assert await cold.stored_version(thread) == 2

    replaced = await cold.replace_damaged(
        thread, {"cases": {"b": "t2"}}, expected_version=2, agent_id="repair"
    )
    assert (replaced.version, replaced.sections, replaced.fence) == (3, {"cases": {"b": "t2"}}, 7)
    assert await cold.get(thread) == replaced
    newest = (await cold.audit_trail(thread))[0]
    assert (newest.version, newest.section, newest.agent_id) == (3, CREATED_SECTION, "repair")
    assert (newest.before, newest.after) == ([], {"cases": {"b": "t2"}})
    assert [e.version for e in await cold.audit_trail(thread)] == [3, 2, 1]


async def test_a_damaged_record_replaced_meanwhile_is_not_replaced_again(
    cold: ColdStateStore,
) -> None:
    """Two repairs that read the damaged record's version: one replaces it, the other is
    refused (a conflict) and writes nothing, whichever comes first."""
    thread = unique_thread()
    await cold.create(thread, {"cases": {}}, agent_id="intake")
    await store_sections_as_a_list(cold, thread)
    version = await cold.stored_version(thread)
    assert version == 1
    results = await asyncio.gather(
        *(
            cold.replace_damaged(
                thread, {"cases": {f"c{n}": "t"}}, expected_version=version, agent_id=f"r{n}"
            )
            for n in range(4)
        ),
        return_exceptions=True,
    )
    winners = [r for r in results if isinstance(r, WorkflowRecord)]
    losers = [r for r in results if isinstance(r, VersionConflict)]
    assert len(winners) == 1 and len(losers) == 3, results
    assert all(loser.actual == 2 for loser in losers)
    assert await cold.get(thread) == winners[0]
    assert [e.version for e in await cold.audit_trail(thread)] == [2, 1]

    missing = unique_thread()
    assert await cold.stored_version(missing) is None
    with pytest.raises(WorkflowNotFound):
        await cold.replace_damaged(missing, {}, expected_version=1, agent_id="r")


async def test_health_reports_the_tier_up(cold: ColdStateStore, any_backend: str) -> None:
    health = await cold.health()
    assert (health.name, health.up) == (any_backend, True)
    assert health.latency_ms is not None


# --------------------------------------------------------------------------- Cosmos only


@pytest.fixture
async def cosmos_connection(
    make_settings: Callable[..., Settings],
) -> AsyncIterator[CosmosConnection]:
    connection = CosmosConnection(make_settings("cosmos", hot=False).cosmos)
    try:
        yield connection
    finally:
        await connection.close()


@pytest.fixture
async def cosmos(
    cosmos_connection: CosmosConnection, make_settings: Callable[..., Settings]
) -> CosmosStateStore:
    store = CosmosStateStore(
        cosmos_connection, max_item_bytes=make_settings("cosmos", hot=False).state_max_item_bytes
    )
    await store.setup()
    return store


async def test_cosmos_documents_are_typed_versioned_and_keep_clear_of_checkpoints(
    cosmos: CosmosStateStore, cosmos_connection: CosmosConnection
) -> None:
    thread = unique_thread()
    await cosmos.create(thread, {"s": 0}, agent_id="a")
    await cosmos.update_section(thread, "s", 1, expected_version=1, agent_id="a")
    documents = await partition(cosmos_connection, thread)
    assert len(documents) == 3
    for document in documents:
        assert document["thread_id"] == thread
        assert document["schema_version"] == schema.CURRENT[document["type"]]
        expected_prefix = "wf" if document["type"] == "workflow" else "audit:"
        assert document["id"].startswith(expected_prefix)
        assert not document["id"].startswith(("cp:", "blob:", "write:", "ptr:"))


async def test_cosmos_crash_between_audit_entry_and_record_is_reconciled(
    cosmos: CosmosStateStore, cosmos_connection: CosmosConnection
) -> None:
    thread = unique_thread()
    await cosmos.create(thread, {"billing": "v1"}, agent_id="intake")
    head = await cosmos.update_section(thread, "billing", "v2", expected_version=1, agent_id="a")
    container = await cosmos_connection.container()
    stored = await container.read_item("wf", partition_key=thread)

    # An entry no chain reaches (a writer of the earlier two-request layout crashed after
    # its audit entry for version 3, before replacing the record).
    crashed_write = uuid.uuid4().hex
    await container.create_item(
        {
            "id": audit_id(3, crashed_write),
            "thread_id": thread,
            "type": "audit",
            "schema_version": schema.CURRENT["audit"],
            "version": 3,
            "write_id": crashed_write,
            "prev_write_id": stored["last_write_id"],
            "agent_id": "crashed",
            "section": "billing",
            "before": "v2",
            "after": "never applied",
            "at": "2999-01-01T00:00:00+00:00",
        }
    )
    assert await cosmos.get(thread) == head
    assert [e.version for e in await cosmos.audit_trail(thread)] == [2, 1]

    # The next writer produces version 3 too; only its entry belongs to the record.
    after = await cosmos.update_section(thread, "billing", "v3", expected_version=2, agent_id="b")
    trail = await cosmos.audit_trail(thread)
    assert [(e.version, e.agent_id, e.after) for e in trail] == [
        (3, "b", "v3"),
        (2, "a", "v2"),
        (1, "intake", {"billing": "v1"}),
    ]
    assert after.sections["billing"] == trail[0].after
    at_version_3 = [d for d in await partition(cosmos_connection, thread) if d.get("version") == 3]
    assert len(at_version_3) == 3  # record, the real entry, and the orphan still stored


async def test_cosmos_losing_writers_leave_no_audit_entry(
    cosmos: CosmosStateStore, cosmos_connection: CosmosConnection
) -> None:
    thread = unique_thread()
    await cosmos.create(thread, {"s": 0}, agent_id="a")
    results = await asyncio.gather(
        *(
            cosmos.update_section(thread, "s", n, expected_version=1, agent_id=f"w{n}")
            for n in range(6)
        ),
        return_exceptions=True,
    )
    conflicts = [r for r in results if isinstance(r, VersionConflict)]
    assert len(conflicts) == 5 and all(c.actual == 2 for c in conflicts)
    entries = [d for d in await partition(cosmos_connection, thread) if d["type"] == "audit"]
    assert sorted(e["version"] for e in entries) == [1, 2]


async def test_cosmos_a_retried_write_that_had_landed_is_not_a_conflict(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings("cosmos", hot=False)
    transport = FaultyTransport()
    connection = CosmosConnection(settings.cosmos, transport=transport)
    try:
        store = CosmosStateStore(connection, max_item_bytes=settings.state_max_item_bytes)
        thread = unique_thread()
        # The connection drops after the server applied each write (the batch of the
        # create, then the batch of the update); the SDK sends each again.
        transport.inject(Fault("reset_after", frozenset({"batch"}), times=2, body_contains=thread))
        created = await store.create(thread, {"s": 0}, agent_id="a")
        updated = await store.update_section(thread, "s", 1, expected_version=1, agent_id="a")
        assert transport.count("batch", "reset_after") == 2
        assert (created.version, updated.version) == (1, 2)
        assert await store.get(thread) == updated
        assert [(e.version, e.after) for e in await store.audit_trail(thread)] == [
            (2, 1),
            (1, {"s": 0}),
        ]
    finally:
        await connection.close()


async def test_cosmos_a_retried_write_that_had_landed_before_another_is_not_refused(
    make_settings: Callable[..., Settings], cosmos_connection: CosmosConnection
) -> None:
    """The connection drops after the server applied the batch, and another process writes
    on top before the SDK sends it again: the resent batch is refused, yet the write (and
    the create) happened, so the caller must not be told it did not (a caller told of a
    conflict or an existing record re-reads, and may write it all again)."""
    settings = make_settings("cosmos", hot=False)
    transport = FaultyTransport()
    connection = CosmosConnection(settings.cosmos, transport=transport)
    elsewhere = CosmosStateStore(cosmos_connection, max_item_bytes=settings.state_max_item_bytes)
    try:
        store = CosmosStateStore(connection, max_item_bytes=settings.state_max_item_bytes)
        thread = unique_thread()

        async def write_on_top(version: int) -> None:
            await elsewhere.update_section(
                thread, "other", version, expected_version=version, agent_id="b"
            )

        transport.inject(
            Fault(
                "reset_after",
                frozenset({"batch"}),
                body_contains=thread,
                meanwhile=lambda: write_on_top(1),
            )
        )
        created = await store.create(thread, {"s": 0}, agent_id="a")
        assert created.version == 1
        transport.inject(
            Fault(
                "reset_after",
                frozenset({"batch"}),
                body_contains=thread,
                meanwhile=lambda: write_on_top(3),
            )
        )
        updated = await store.update_section(thread, "s", 1, expected_version=2, agent_id="a")
        assert transport.count("batch", "reset_after") == 2
        assert (updated.version, updated.sections) == (3, {"s": 1, "other": 1})
        assert [(e.version, e.agent_id) for e in await store.audit_trail(thread)] == [
            (4, "b"),
            (3, "a"),
            (2, "b"),
            (1, "a"),
        ]
    finally:
        await connection.close()


@pytest.mark.parametrize("backend", ["cosmos", MEMORY])
async def test_an_item_limit_refuses_a_document_over_it_and_writes_nothing(
    backend: str, request: pytest.FixtureRequest
) -> None:
    limit = 64 * 1024
    connection: CosmosConnection | None = None
    store: ColdStateStore
    if backend == MEMORY:
        store = MemoryColdStore(max_item_bytes=limit)
    else:
        make_settings: Callable[..., Settings] = request.getfixturevalue("make_settings")
        settings = make_settings("cosmos", hot=False, state_max_item_bytes=limit)
        connection = CosmosConnection(settings.cosmos)
        store = CosmosStateStore(connection, max_item_bytes=settings.state_max_item_bytes)
    try:
        thread = unique_thread()
        created = await store.create(thread, {"notes": "x" * (limit // 2)}, agent_id="a")
        with pytest.raises(StateTooLarge) as too_large:
            await store.update_section(
                thread, "transcript", "y" * limit, expected_version=1, agent_id="a"
            )
        assert too_large.value.limit == limit and too_large.value.size > limit
        with pytest.raises(StateTooLarge):
            await store.create(unique_thread(), {"blob": "z" * limit}, agent_id="a")
        assert await store.get(thread) == created
        assert [e.version for e in await store.audit_trail(thread)] == [1]
        if connection is not None:
            documents = await partition(connection, thread)
            assert len(documents) == 2
            assert all(len(json.dumps(d).encode()) <= limit for d in documents)
    finally:
        if connection is not None:
            await connection.close()


@pytest.mark.parametrize("backend", ["cosmos", "postgres", MEMORY])
async def test_a_write_at_a_version_moved_past_elsewhere_is_a_conflict_whatever_its_size(
    backend: str, request: pytest.FixtureRequest
) -> None:
    """Another process shrank the record: a write at the version before is a conflict (the
    caller must re-read), never `StateTooLarge` measured against sections no longer stored,
    which would send the size layer offloading a value for a write that cannot land."""
    limit = 64 * 1024
    opened = []
    here: ColdStateStore
    elsewhere: ColdStateStore
    if backend == MEMORY:
        here = elsewhere = MemoryColdStore(max_item_bytes=limit)
    else:
        make_settings: Callable[..., Settings] = request.getfixturevalue("make_settings")
        settings = make_settings(backend, hot=False, state_max_item_bytes=limit)
        opened = [await open_backends(settings), await open_backends(settings)]
        here, elsewhere = (backends.cold for backends in opened)
    try:
        thread = unique_thread()
        await here.create(thread, {"notes": "x" * (limit // 2)}, agent_id="a")
        await elsewhere.update_section(thread, "notes", "", expected_version=1, agent_id="b")

        with pytest.raises(VersionConflict) as conflict:
            await here.update_section(
                thread, "transcript", "y" * (limit // 2), expected_version=1, agent_id="a"
            )
        assert conflict.value.actual == 2
        done = await here.update_section(
            thread, "transcript", "y" * (limit // 2), expected_version=2, agent_id="a"
        )
        assert done.version == 3 and done.sections["notes"] == ""
        assert [e.agent_id for e in await here.audit_trail(thread)] == ["a", "b", "a"]
    finally:
        for backends in opened:
            await backends.close()


@pytest.mark.parametrize("backend", ["cosmos", "postgres", MEMORY])
async def test_a_stale_holder_at_a_version_moved_past_elsewhere_sees_the_conflict_first(
    backend: str, request: pytest.FixtureRequest
) -> None:
    """The precedence every backend keeps (a stale version, then the fence) holds for a
    process that wrote the version it expects: what it remembers is not what decides."""
    opened = []
    here: ColdStateStore
    elsewhere: ColdStateStore
    if backend == MEMORY:
        here = elsewhere = MemoryColdStore()
    else:
        make_settings: Callable[..., Settings] = request.getfixturevalue("make_settings")
        settings = make_settings(backend, hot=False)
        opened = [await open_backends(settings), await open_backends(settings)]
        here, elsewhere = (backends.cold for backends in opened)
    try:
        thread = unique_thread()
        await here.create(thread, {"n": 0}, agent_id="a")
        await here.update_section(thread, "n", 1, expected_version=1, agent_id="a", fencing_token=5)
        await elsewhere.update_section(
            thread, "n", 2, expected_version=2, agent_id="b", fencing_token=7
        )

        with pytest.raises(VersionConflict) as conflict:
            await here.update_section(
                thread, "n", 3, expected_version=2, agent_id="a", fencing_token=4
            )
        assert conflict.value.actual == 3
    finally:
        for backends in opened:
            await backends.close()


async def test_cosmos_refuses_a_record_written_by_newer_code(
    cosmos: CosmosStateStore, cosmos_connection: CosmosConnection
) -> None:
    thread = unique_thread()
    await cosmos.create(thread, {"s": 0}, agent_id="a")
    container = await cosmos_connection.container()
    stored = await container.read_item("wf", partition_key=thread)
    stored["schema_version"] = schema.CURRENT["workflow"] + 1
    await container.replace_item("wf", stored)
    with pytest.raises(UnsupportedSchemaVersion):
        await cosmos.get(thread)
    with pytest.raises(UnsupportedSchemaVersion):
        await cosmos.update_section(thread, "s", 1, expected_version=1, agent_id="a")


async def test_cosmos_a_record_changed_elsewhere_is_read_again_never_overwritten(
    cosmos: CosmosStateStore, cosmos_connection: CosmosConnection
) -> None:
    """What a process remembers of a record only spares a read: the batch's If-Match
    refuses it once the record changed elsewhere."""
    thread = unique_thread()
    await cosmos.create(thread, {"n": 0}, agent_id="a")
    other = CosmosStateStore(cosmos_connection, max_item_bytes=1_800_000)
    await other.update_section(thread, "n", 1, expected_version=1, agent_id="other")

    with pytest.raises(VersionConflict) as conflict:
        await cosmos.update_section(thread, "n", 2, expected_version=1, agent_id="a")
    assert conflict.value.actual == 2

    # Same version, new ETag (a retention hold patches the record): read and applied.
    container = await cosmos_connection.container()
    stored = await container.read_item("wf", partition_key=thread)
    await container.replace_item("wf", {k: v for k, v in stored.items() if k[0] != "_"})
    await other.get(thread)  # `other` now knows the new ETag; `cosmos` an older one
    await other.update_section(thread, "n", 2, expected_version=2, agent_id="other")
    stale = await container.read_item("wf", partition_key=thread)
    await container.replace_item("wf", {k: v for k, v in stale.items() if k[0] != "_"})
    done = await other.update_section(thread, "n", 3, expected_version=3, agent_id="other")
    assert (done.version, done.sections["n"]) == (4, 3)
    trail = await cosmos.audit_trail(thread)
    assert [(e.version, e.after) for e in trail][:3] == [(4, 3), (3, 2), (2, 1)]


async def test_cosmos_round_trips_do_not_grow_with_history(
    cosmos: CosmosStateStore, cosmos_connection: CosmosConnection
) -> None:
    thread = unique_thread()
    await cosmos.create(thread, {"n": 0}, agent_id="a")
    for version in range(1, 41):
        await cosmos.update_section(thread, "n", version, expected_version=version, agent_id="a")
    counters = cosmos_connection.counters

    counters.reset()
    await cosmos.get(thread)
    assert counters.requests == 1

    counters.reset()
    await cosmos.update_section(thread, "n", 41, expected_version=41, agent_id="a")
    assert counters.requests == 1  # audit entry and conditional replace in one batch

    elsewhere = CosmosStateStore(cosmos_connection, max_item_bytes=1_800_000)
    counters.reset()
    await elsewhere.update_section(thread, "n", 42, expected_version=42, agent_id="a")
    assert counters.requests == 2  # a process that has not seen the record reads it first

    counters.reset()
    trail = await cosmos.audit_trail(thread, limit=5)
    assert [e.version for e in trail] == [43, 42, 41, 40, 39]
    assert counters.requests == 2  # the record, one page of entries


@pytest.mark.parametrize(("text", "kept"), [("é" * 100_000, True), ("e" * 300_000, False)])
async def test_cosmos_knows_a_record_up_to_its_stored_bytes(
    cosmos: CosmosStateStore, cosmos_connection: CosmosConnection, text: str, kept: bool
) -> None:
    # The bound counts the document's UTF-8 JSON as stored (200 kB of "é"), not an
    # ASCII-escaped rendering ("\u00e9": 600 kB).
    thread = unique_thread()
    await cosmos.create(thread, {"notes": text}, agent_id="a")
    cosmos_connection.counters.reset()
    await cosmos.update_section(thread, "n", 1, expected_version=1, agent_id="a")
    assert cosmos_connection.counters.requests == (1 if kept else 2)
