"""StateSizeManager: each step alone (with properties), then the composition, on a fake archive."""

from __future__ import annotations

import asyncio
import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from state.errors import CorruptState, WorkflowExists, WorkflowNotFound
from state.ports import JSON, WorkflowRecord
from state.settings import Settings
from state.size import (
    ARCHIVED_KEY,
    COMPRESSED_KEY,
    ColdRecordArchive,
    SizePolicy,
    StateSizeManager,
    canonical_json,
    escaped,
    measure,
    prune_messages,
    pruned_count,
    truncate_strings,
    unwrap_compressed,
    wrap_compressed,
)

# Text a store can hold: canonical_json refuses a NUL (Postgres jsonb holds none).
storable = st.characters(codec="utf-8", exclude_characters="\0")
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(storable, max_size=40),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(storable, max_size=8), inner)
    ),
    max_leaves=30,
)


def policy(**overrides: object) -> SizePolicy:
    values: dict[str, object] = {
        "message_window": 3,
        "message_sections": frozenset({"messages"}),
        "reasoning_sections": frozenset({"reasoning"}),
        "reasoning_max_chars": 80,
        "compress_threshold_bytes": 2048,
        "archivable_sections": frozenset({"billing"}),
        "max_item_bytes": 1_800_000,
    }
    values.update(overrides)
    return SizePolicy(**values)  # type: ignore[arg-type]


class MemoryArchive:
    """A SectionArchive in a dict, counting stores to show content addressing."""

    def __init__(self) -> None:
        self.values: dict[str, JSON] = {}
        self.stores = 0

    async def archive(self, thread_id: str, section: str, value: JSON) -> str:
        self.stores += 1
        ref = f"{thread_id}~archive~{section}~{canonical_json(value).hex()[:16]}"
        self.values[ref] = value
        return ref

    async def fetch_archived(self, ref: str) -> JSON:
        if ref not in self.values:
            raise WorkflowNotFound(ref)
        return self.values[ref]


def test_measure_is_canonical_json_bytes_per_section() -> None:
    sections = {"a": {"y": 1, "x": "é"}, "b": [1, 2]}
    report = measure(sections)
    assert report.sections == {"a": len('{"x":"é","y":1}'.encode()), "b": len(b"[1,2]")}
    assert report.total == len(canonical_json(sections))
    assert report.largest(1) == [("a", report.sections["a"])]


# Names JSON escapes ('"', '\\', control characters) or stores as several UTF-8 bytes.
section_names = st.text(alphabet='ab"\\\n\x01é€😀\u2028', max_size=4)


@settings(deadline=None)  # a loaded CI machine must not fail it on time
@given(st.dictionaries(section_names, json_values, max_size=6))
def test_the_total_is_the_whole_document_as_stored(sections: dict[str, JSON]) -> None:
    report = measure(sections)
    assert report.sections == {name: len(canonical_json(v)) for name, v in sections.items()}
    assert report.total == len(canonical_json(sections))


@settings(max_examples=60, deadline=None)
@given(
    st.dictionaries(
        section_names | st.sampled_from(["reasoning", "billing"]),
        json_values | st.text(alphabet="xé", min_size=50, max_size=600),
        max_size=5,
    ),
    st.lists(st.text(alphabet="mé", max_size=40), max_size=6),
    st.booleans(),
)
def test_compact_and_shrink_report_the_sizes_of_what_they_return(
    sections: dict[str, JSON], messages: list[str], packed: bool
) -> None:
    """Pruned, truncated, compressed, archived and offloaded sections measured again."""
    sections = {**sections, "messages": messages}
    if packed:
        sections = {name: wrap_compressed(value, 16) for name, value in sections.items()}
    manager = StateSizeManager(
        policy(
            message_window=2,
            reasoning_max_chars=20,
            compress_threshold_bytes=64,
            max_item_bytes=2_000,
        ),
        MemoryArchive(),
    )
    shrunk = asyncio.run(manager.shrink("c", sections, completed={"billing"}))
    for result, actions in (manager.compact(sections), shrunk):
        assert actions.before == measure(sections)
        assert actions.after == measure(result)
        for name, (raw, stored) in actions.compressed.items():
            assert stored == len(canonical_json(result[name])) or name in actions.offloaded
            assert raw == len(canonical_json(unwrap_compressed(result[name]))) or (
                name in actions.offloaded
            )


@given(st.lists(st.integers(), max_size=40), st.integers(min_value=1, max_value=10))
def test_prune_keeps_newest_window_and_counts_the_rest(messages: list[int], window: int) -> None:
    first, dropped = prune_messages(list(messages), window)
    assert dropped == max(0, len(messages) - window)
    body = first[1:] if dropped else first
    assert body == messages[-window:] if messages else body == []
    assert pruned_count(first) == dropped
    # Pruning again after more messages arrive accumulates the count.
    second, more = prune_messages([*first, *range(window)], window)
    assert pruned_count(second) == dropped + more
    assert (second[1:] if pruned_count(second) else second)[-window:] == list(range(window))


@given(json_values, st.integers(min_value=64, max_value=200))
def test_truncation_bounds_every_string_and_is_idempotent(value: JSON, limit: int) -> None:
    once, _ = truncate_strings(value, limit)

    def strings(v: JSON) -> list[str]:
        if isinstance(v, str):
            return [v]
        if isinstance(v, list):
            return [s for item in v for s in strings(item)]
        if isinstance(v, dict):
            return [s for item in v.values() for s in strings(item)]
        return []

    assert all(len(s) <= limit for s in strings(once))
    assert truncate_strings(once, limit) == (once, 0)


def test_truncation_says_how_much_was_cut() -> None:
    text = "x" * 1000
    cut_text, cut = truncate_strings({"trace": [text]}, 100)
    assert len(cut_text["trace"][0]) == 100
    assert cut_text["trace"][0].endswith(f"[truncated {cut} chars]")
    assert 100 - len(f"…[truncated {cut} chars]") + cut == 1000


@settings(max_examples=50)
@given(json_values)
def test_compression_round_trips(value: JSON) -> None:
    assert unwrap_compressed(wrap_compressed(value, 16)) == value


def test_compression_only_above_threshold_and_only_when_smaller() -> None:
    small = {"a": "b"}
    assert wrap_compressed(small, 2048) is small
    big = {"text": "abc" * 5000}
    packed = wrap_compressed(big, 2048)
    assert set(packed) == {COMPRESSED_KEY}
    assert len(canonical_json(packed)) < len(canonical_json(big)) / 10
    # Incompressible data stays as it is rather than growing.
    noise = {"n": [hash((i, "salt")) for i in range(400)]}
    assert unwrap_compressed(wrap_compressed(noise, 64)) == noise


def test_unknown_codec_or_damaged_payload_is_a_clear_error() -> None:
    with pytest.raises(CorruptState, match="unknown value encoding"):
        unwrap_compressed({COMPRESSED_KEY: {"codec": "lz4", "bytes": 1, "data": ""}})
    packed = wrap_compressed({"text": "abc" * 5000}, 2048)
    packed[COMPRESSED_KEY]["bytes"] += 1
    with pytest.raises(CorruptState, match="bytes"):
        unwrap_compressed(packed)


async def test_shrink_touches_only_configured_sections_and_expand_restores_lossless_ones() -> None:
    archive = MemoryArchive()
    manager = StateSizeManager(policy(), archive)
    messages = [{"role": "user", "content": f"m{i}"} for i in range(10)]
    sections: dict[str, JSON] = {
        "messages": messages,
        "reasoning": {"steps": ["r" * 500, "short"]},
        "billing": {"refund": 120.0, "charges": list(range(50))},
        "account": {"locked": True, "notes": "n" * 5000},
        "unconfigured_list": list(range(20)),
    }
    shrunk, actions = await manager.shrink("case-1", sections, completed={"billing", "account"})

    assert actions.pruned == {"messages": 7}
    assert shrunk["messages"][1:] == messages[-3:]
    assert pruned_count(shrunk["messages"]) == 7
    assert set(actions.truncated) == {"reasoning"}
    assert shrunk["reasoning"]["steps"][1] == "short"
    # billing is archivable and completed; account is completed but not archivable.
    assert set(actions.archived) == {"billing"}
    assert set(shrunk["billing"]) == {ARCHIVED_KEY}
    assert set(actions.compressed) == {"account"}
    assert shrunk["unconfigured_list"] == list(range(20))
    assert actions.after.total < actions.before.total

    expanded = await manager.expand(shrunk)
    assert expanded["billing"] == sections["billing"]
    assert expanded["account"] == sections["account"]
    assert expanded["unconfigured_list"] == sections["unconfigured_list"]
    # Without fetching, the reference stays (cheap status reads).
    assert set((await manager.expand(shrunk, fetch_archived=False))["billing"]) == {ARCHIVED_KEY}

    # A second shrink is stable: nothing new pruned, archived or stored again.
    again, more = await manager.shrink("case-1", shrunk, completed={"billing"})
    assert again == shrunk
    assert not (more.pruned or more.truncated or more.archived or more.compressed)
    assert archive.stores == 1


async def test_nothing_is_archived_unless_the_caller_says_it_is_complete() -> None:
    archive = MemoryArchive()
    manager = StateSizeManager(policy(), archive)
    shrunk, actions = await manager.shrink("case-2", {"billing": {"refund": 1}})
    assert shrunk == {"billing": {"refund": 1}}
    assert not actions.archived and archive.stores == 0


async def test_archiving_without_an_archive_fails_loudly() -> None:
    with pytest.raises(ValueError, match="SectionArchive"):
        await StateSizeManager(policy()).shrink("c", {"billing": {}}, completed={"billing"})


async def test_tampered_archive_is_detected() -> None:
    archive = MemoryArchive()
    manager = StateSizeManager(policy(), archive)
    shrunk, actions = await manager.shrink("c", {"billing": {"a": 1}}, completed={"billing"})
    archive.values[actions.archived["billing"]] = {"a": 2}
    with pytest.raises(CorruptState, match="digest"):
        await manager.expand(shrunk)


def incompressible(size: int, seed: int = 0) -> str:
    return random.Random(seed).randbytes(size // 2).hex()


async def test_what_does_not_fit_an_item_is_offloaded_whatever_its_name() -> None:
    archive = MemoryArchive()
    manager = StateSizeManager(policy(max_item_bytes=40_000), archive)
    sections: dict[str, JSON] = {
        "huge": incompressible(30_000),  # over a quarter of an item on its own
        "a": incompressible(9_000, 1),
        "b": incompressible(9_000, 2),
        "small": {"ok": True},
    }
    shrunk, actions = await manager.shrink("c", sections)
    assert set(actions.offloaded) >= {"huge"}
    assert actions.after.total <= 20_000
    assert shrunk["small"] == {"ok": True}
    # Offloaded sections are still needed: expand fetches them even without archived ones.
    assert await manager.expand(shrunk, fetch_archived=False) == sections


async def test_offloading_stops_once_the_record_fits_half_an_item() -> None:
    """The largest section moved, the rest (each within a quarter) fit half: they stay."""
    manager = StateSizeManager(policy(max_item_bytes=40_000), MemoryArchive())
    sections: dict[str, JSON] = {
        "huge": incompressible(30_000),
        "a": incompressible(9_000, 1),
        "b": incompressible(9_000, 2),
    }
    shrunk, actions = await manager.shrink("c", sections)
    assert set(actions.offloaded) == {"huge"}
    assert [unwrap_compressed(shrunk[name]) for name in "ab"] == [sections["a"], sections["b"]]
    assert actions.after == measure(shrunk) and actions.after.total <= 20_000


class MemoryColdStore:
    """Just enough of a ColdStateStore for the archive: create / get / delete."""

    name = "memory"

    def __init__(self) -> None:
        self.records: dict[str, dict[str, JSON]] = {}
        self.creates = 0

    async def create(self, thread_id: str, sections: dict[str, JSON], *, agent_id: str) -> object:
        self.creates += 1
        if thread_id in self.records:
            raise WorkflowExists(thread_id)
        self.records[thread_id] = json.loads(json.dumps(sections))
        return object()

    async def get(self, thread_id: str) -> WorkflowRecord | None:
        if thread_id not in self.records:
            return None
        return WorkflowRecord(thread_id, 1, self.records[thread_id], 1, "", "")

    async def delete(self, thread_id: str) -> None:
        self.records.pop(thread_id, None)


async def test_cold_record_archive_chunks_to_fit_items_and_is_content_addressed() -> None:
    cold = MemoryColdStore()
    archive = ColdRecordArchive(
        cold,  # type: ignore[arg-type]
        max_item_bytes=12_000,
        compress_threshold_bytes=1024,
    )
    value = {"blob": incompressible(50_000), "n": 1}
    ref = await archive.archive("case-1", "billing", value)
    assert ref.startswith("case-1~archive~")
    assert len(cold.records) > 5  # head + chunks
    assert all(
        len(canonical_json(r)) < 12_000 - archive.ENVELOPE_BYTES for r in cold.records.values()
    )
    assert await archive.fetch_archived(ref) == value
    stored = len(cold.records)
    assert await archive.archive("case-1", "billing", value) == ref
    assert len(cold.records) == stored  # nothing new: the same content is already there

    # A missing chunk or a damaged one is an error, never a wrong value.
    cold.records[f"{ref}~1"]["data"] = cold.records[f"{ref}~2"]["data"]
    with pytest.raises(CorruptState):
        await archive.fetch_archived(ref)
    await archive.delete(ref)
    assert cold.records == {}
    with pytest.raises(WorkflowNotFound):
        await archive.fetch_archived(ref)


def test_a_message_section_that_is_not_a_list_is_a_configuration_error() -> None:
    with pytest.raises(TypeError, match="message window"):
        StateSizeManager(policy()).compact({"messages": {"oops": 1}})


def test_policy_comes_from_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COSMOS_ENDPOINT", "https://127.0.0.1:8091/")
    monkeypatch.setenv("STATE_MESSAGE_SECTIONS", "messages, transcript")
    monkeypatch.setenv("STATE_REASONING_SECTIONS", "reasoning")
    monkeypatch.setenv("STATE_ARCHIVABLE_SECTIONS", "")
    monkeypatch.setenv("STATE_MESSAGE_WINDOW", "7")
    monkeypatch.setenv("STATE_REASONING_MAX_CHARS", "300")
    loaded = SizePolicy.from_settings(Settings())
    assert loaded.message_sections == {"messages", "transcript"}
    assert loaded.reasoning_sections == {"reasoning"}
    assert loaded.archivable_sections == frozenset()
    assert loaded.message_window == 7
    assert loaded.reasoning_max_chars == 300


def test_defaults_prune_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COSMOS_ENDPOINT", "https://127.0.0.1:8091/")
    manager = StateSizeManager.from_settings(Settings())
    sections: dict[str, JSON] = {"messages": list(range(500)), "reasoning": "r" * 10_000}
    shrunk, actions = manager.compact(sections)
    assert not actions.pruned and not actions.truncated
    assert {name: unwrap_compressed(value) for name, value in shrunk.items()} == sections


async def test_a_truncated_value_shaped_like_an_envelope_stays_a_plain_value() -> None:
    """Truncation makes a plain value again, which may be shaped like an envelope too."""
    manager = StateSizeManager(policy(reasoning_max_chars=80), MemoryArchive())
    value = {COMPRESSED_KEY: "r" * 200}
    shrunk, actions = await manager.shrink("c", {"reasoning": escaped(value)})
    assert set(actions.truncated) == {"reasoning"}
    assert actions.after == measure(shrunk)
    expanded = await manager.expand(shrunk)
    assert set(expanded["reasoning"]) == {COMPRESSED_KEY}
    assert len(expanded["reasoning"][COMPRESSED_KEY]) == 80
