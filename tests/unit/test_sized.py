"""SizedStateStore over the in-memory cold store (tests/support/fakes.py) and the real
archive: the size layer's own decisions (what it writes below, when it offloads and
writes again), in milliseconds. Over the real tiers: tests/integration/test_tiered.py."""

from __future__ import annotations

import os

import pytest

from state.errors import StateTooLarge, VersionConflict, WorkflowNotFound
from state.ports import SectionWrite
from state.size import (
    ARCHIVED_KEY,
    ColdRecordArchive,
    SizePolicy,
    StateSizeManager,
    canonical_json,
    is_offloaded,
    pruned_summary,
)
from state.sized import SizedStateStore
from tests.support.fakes import MemoryColdStore

ITEM_LIMIT = 40_000


def sized(cold: MemoryColdStore, archive_to: MemoryColdStore | None = None) -> SizedStateStore:
    policy = SizePolicy(
        message_window=3,
        message_sections=frozenset({"messages"}),
        reasoning_sections=frozenset(),
        reasoning_max_chars=80,
        compress_threshold_bytes=2048,
        archivable_sections=frozenset({"billing"}),
        max_item_bytes=ITEM_LIMIT,
    )
    archive = ColdRecordArchive(
        archive_to or cold, max_item_bytes=ITEM_LIMIT, compress_threshold_bytes=2048
    )
    return SizedStateStore(cold, StateSizeManager(policy, archive))


def noise(size: int) -> str:
    """Incompressible text: compression cannot make it fit."""
    return os.urandom(size // 2).hex()


async def test_a_refused_section_is_offloaded_and_written_again_at_the_same_version() -> None:
    cold = MemoryColdStore(max_item_bytes=ITEM_LIMIT)
    store = sized(cold)
    # Written past the layer: most of an item already, yet each section alone is small.
    await cold.create("t", {f"s{n}": noise(11_000) for n in range(3)}, agent_id="x")
    value = noise(9000)
    assert len(value) < ITEM_LIMIT // 4  # inline on its own
    record = await store.update_section("t", "d", value, agent_id="x")
    # Refused, then written again: at the version read first, or it would conflict.
    assert cold.requests["update_section"] == 2 and record.version == 2
    assert record.sections["d"] == value  # plain on the way out
    stored = await cold.get("t")
    assert stored is not None and is_offloaded(stored.sections["d"])
    fetched = await store.get("t")
    assert fetched is not None and fetched.sections["d"] == value


async def test_a_record_too_large_for_reasons_of_other_sections_moves_them_out() -> None:
    cold = MemoryColdStore(max_item_bytes=ITEM_LIMIT)
    store = sized(cold, archive_to=MemoryColdStore())
    others = {f"s{n}": noise(9000) for n in range(4)}
    await cold.create("t", dict(others), agent_id="x")
    cold.max_item_bytes = ITEM_LIMIT // 2  # what is already there no longer fits
    big = noise(ITEM_LIMIT // 2)  # offloaded by the layer at once
    record = await store.update_section("t", "d", big, agent_id="x")
    # Refused once, then one write at the same version with the largest others moved out.
    assert cold.requests["update_section"] == 1 and cold.requests["update_sections"] == 1
    assert record.version > 1 and record.sections == {**others, "d": big}
    stored = await cold.get("t")
    assert stored is not None and is_offloaded(stored.sections["d"])
    assert any(is_offloaded(stored.sections[name]) for name in others)
    fetched = await store.get("t")
    assert fetched is not None and fetched.sections == {**others, "d": big}


async def test_a_record_too_large_with_nothing_left_to_move_is_refused() -> None:
    cold = MemoryColdStore(max_item_bytes=ITEM_LIMIT)
    store = sized(cold, archive_to=MemoryColdStore())
    await cold.create("t", {"s": 0}, agent_id="x")
    cold.max_item_bytes = 100  # not even a reference fits
    with pytest.raises(StateTooLarge):
        await store.update_section("t", "d", noise(ITEM_LIMIT // 2), agent_id="x")
    current = await cold.get("t")
    assert current is not None and current.version == 1


async def test_without_an_expected_version_the_current_one_is_read_once_below() -> None:
    cold = MemoryColdStore()
    store = sized(cold)
    await store.create("t", {"s": 0}, agent_id="x")
    reads = cold.requests["get"]
    for value in (1, 2):
        updated = await store.update_section("t", "s", value, agent_id="x")
    assert updated.version == 3 and cold.requests["get"] == reads + 2
    with pytest.raises(VersionConflict):
        await store.update_section("t", "s", 3, agent_id="x", expected_version=1)
    with pytest.raises(WorkflowNotFound):
        await store.update_section("missing", "s", 1, agent_id="x")


async def test_stored_forms_go_below_plain_values_come_back_and_sizes_are_reported() -> None:
    cold = MemoryColdStore()
    store = sized(cold)
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
    stored = await cold.get("t")
    assert stored is not None and stored.sections == created.sections  # the stored form
    fetched = await store.get("t", fetch_archived=True)
    assert fetched is not None and fetched.sections["billing"] == billing
    await store.update_section("t", "notes", "n", agent_id="x")
    assert [operation for operation, _ in reported] == ["create", "update_section"]
    assert reported[1][1] == len(canonical_json("n"))


@pytest.mark.parametrize(
    "value",
    [
        {"$compressed": "not an envelope"},
        {"$archived": True},
        {"$offloaded": {"ref": "elsewhere~archive~0", "sha256": "0", "bytes": 1}},
    ],
    ids=["compressed", "archived", "offloaded"],
)
async def test_a_value_shaped_like_an_envelope_comes_back_as_written(
    value: dict[str, object],
) -> None:
    """The layer's envelopes are one-key objects any caller may write too: such a value is
    stored so that reading it back returns it, not taken for a reference (which made the
    whole record unreadable, or fetched whatever the reference named)."""
    cold = MemoryColdStore(max_item_bytes=ITEM_LIMIT)
    store = sized(cold)
    created = await store.create("t", {"a": value}, agent_id="x")
    updated = await store.update_section("t", "b", value, agent_id="x", expected_version=1)
    assert created.sections == {"a": value}
    assert updated.sections == {"a": value, "b": value}
    fetched = await store.get("t", fetch_archived=True)
    assert fetched is not None and fetched.sections == {"a": value, "b": value}
    # Archived when completed, and fetched back whole.
    await store.update_section(
        "t", "billing", value, agent_id="x", expected_version=2, completed=True
    )
    fetched = await store.get("t", fetch_archived=True)
    assert fetched is not None and fetched.sections["billing"] == value


async def test_several_sections_shaped_like_envelopes_come_back_as_written() -> None:
    """`update_sections` takes every value as plain, written inline or `offloaded`."""
    cold = MemoryColdStore(max_item_bytes=ITEM_LIMIT)
    store = sized(cold)
    await store.create("t", {}, agent_id="x")
    lookalikes = {"c": {"$compressed": "not an envelope"}, "a": {"$archived": True}}
    writes = [SectionWrite(name, value, "x") for name, value in lookalikes.items()]
    await store.update_sections("t", writes, expected_version=1)
    moved = {"moved-c": {"$compressed": {"codec": "raw", "bytes": 2, "data": "e30="}}}
    record = await store.update_sections(
        "t", [SectionWrite(k, v, "x") for k, v in moved.items()], expected_version=3, offloaded=True
    )
    stored = await cold.get("t")
    assert stored is not None and is_offloaded(stored.sections["moved-c"])
    assert record.sections == {**lookalikes, **moved}
    fetched = await store.get("t")
    assert fetched is not None and fetched.sections == {**lookalikes, **moved}


@pytest.mark.parametrize(
    "value",
    [
        {"$offloaded": True},
        {"$offloaded": {"ref": "elsewhere~archive~0", "sha256": "0", "bytes": 1}},
    ],
    ids=["not-a-reference", "a-reference-elsewhere"],
)
async def test_a_plain_value_shaped_like_an_offload_reference_written_with_others_comes_back(
    value: dict[str, object],
) -> None:
    """`update_sections` is the app's write of several sections (`write_sections`): a value
    shaped like an offload reference is as plain there as in `update_section`, never taken
    for one (which made the record unreadable, or fetched whatever the reference named)."""
    cold = MemoryColdStore(max_item_bytes=ITEM_LIMIT)
    store = sized(cold)
    await store.create("t", {}, agent_id="x")
    record = await store.update_sections(
        "t", [SectionWrite("a", value, "x"), SectionWrite("b", 1, "x")], expected_version=1
    )
    assert record.sections == {"a": value, "b": 1}
    fetched = await store.get("t", fetch_archived=True)
    assert fetched is not None and fetched.sections == {"a": value, "b": 1}
