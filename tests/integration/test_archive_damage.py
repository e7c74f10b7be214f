"""A damaged archived value (`state.size.ColdRecordArchive`) on real servers: whatever part
of its records is damaged, reading it is a `CorruptState`, never another error."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from state.errors import CorruptState
from state.ports import ColdStateStore
from state.size import OFFLOADED_KEY, ColdRecordArchive, StateSizeManager
from state.sized import SizedStateStore
from tests.integration.delta_graph import open_stack, settings_for

# The record to damage (the head or its first chunk), and the sections written over it.
DAMAGE = {
    "chunk count not a number": ("head", {"chunks": "two"}),
    "chunk count missing": ("head", {"chunks": None}),
    "encoding missing": ("head", {"encoding": None}),
    "chunk data missing": ("chunk", {"data": None}),
    "chunk data not text": ("chunk", {"data": 7}),
}


@asynccontextmanager
async def archive_stack(
    backend: str, stack_env: dict[str, str]
) -> AsyncIterator[tuple[ColdStateStore, ColdRecordArchive, SizedStateStore]]:
    """The cold store of `backend`, its record archive and the sized store over both."""
    settings = settings_for(stack_env, backend, False, "write-through")
    async with open_stack(settings) as opened:
        cold = opened.backends.cold
        archive = ColdRecordArchive.from_settings(cold, settings)
        yield (
            cold,
            archive,
            SizedStateStore(cold, StateSizeManager.from_settings(settings, archive)),
        )


@pytest.mark.parametrize("backend", ["postgres", "cosmos"])
@pytest.mark.parametrize("damage", list(DAMAGE))
async def test_a_damaged_archived_value_reads_as_corrupt_state(
    backend: str, damage: str, stack_env: dict[str, str]
) -> None:
    async with archive_stack(backend, stack_env) as (cold, archive, _):
        value = {"notes": [f"note {n}" for n in range(50)]}
        ref = await archive.archive(f"damaged-{uuid.uuid4().hex[:12]}", "notes", value)
        assert await archive.fetch_archived(ref) == value
        which, sections = DAMAGE[damage]
        target = ref if which == "head" else f"{ref}~0"
        record = await cold.get(target)
        assert record is not None
        damaged: dict[str, Any] = {**record.sections}
        for name, section in sections.items():
            if section is None:
                damaged.pop(name)
            else:
                damaged[name] = section
        await cold.delete(target)
        await cold.create(target, damaged, agent_id="damage")
        with pytest.raises(CorruptState):
            await archive.fetch_archived(ref)


@pytest.mark.parametrize("backend", ["postgres", "cosmos"])
@pytest.mark.parametrize(
    "envelope", ["x", {}, {"ref": 7, "sha256": "00"}], ids=["text", "empty", "ref not text"]
)
async def test_a_damaged_reference_to_an_offloaded_section_reads_as_corrupt_state(
    backend: str, envelope: Any, stack_env: dict[str, str]
) -> None:
    # A caller's value shaped like a reference is stored escaped (`size.escaped`): a
    # reference as read is one the size layer wrote, and one it cannot read is damage.
    async with archive_stack(backend, stack_env) as (cold, _, sized):
        thread = f"damaged-ref-{uuid.uuid4().hex[:12]}"
        await cold.create(thread, {"notes": {OFFLOADED_KEY: envelope}}, agent_id="damage")
        with pytest.raises(CorruptState):
            await sized.get(thread)


@pytest.mark.parametrize("backend", ["postgres", "cosmos"])
@pytest.mark.parametrize("count", ["two", None, -1], ids=["not a number", "missing", "negative"])
async def test_deleting_an_archived_value_with_a_damaged_head_is_corrupt_state(
    backend: str, count: Any, stack_env: dict[str, str]
) -> None:
    async with archive_stack(backend, stack_env) as (cold, archive, _):
        ref = await archive.archive(f"damaged-{uuid.uuid4().hex[:12]}", "notes", {"n": 1})
        record = await cold.get(ref)
        assert record is not None
        damaged: dict[str, Any] = {**record.sections}
        damaged.pop("chunks")
        if count is not None:
            damaged["chunks"] = count
        await cold.delete(ref)
        await cold.create(ref, damaged, agent_id="damage")
        with pytest.raises(CorruptState):
            await archive.delete(ref)
        # Left as it was: its chunks are unknown, and retention takes them with the owner.
        assert await cold.get(ref) is not None
        assert await cold.get(f"{ref}~0") is not None


@pytest.mark.parametrize("backend", ["postgres", "cosmos"])
async def test_a_reference_without_the_archive_separator_reads_as_corrupt_state(
    backend: str, stack_env: dict[str, str]
) -> None:
    # A stored reference that lost its separator names a record that is no archive's
    # (here one shaped like a head, with its chunk): damage, not an IndexError.
    async with archive_stack(backend, stack_env) as (cold, archive, sized):
        value = {"notes": [f"note {n}" for n in range(50)]}
        ref = await archive.archive(f"damaged-{uuid.uuid4().hex[:12]}", "notes", value)
        plain = f"plain-{uuid.uuid4().hex[:12]}"
        for source, target in [(ref, plain), (f"{ref}~0", f"{plain}~0")]:
            record = await cold.get(source)
            assert record is not None
            await cold.create(target, {**record.sections}, agent_id="damage")
        with pytest.raises(CorruptState):
            await archive.fetch_archived(plain)
        thread = f"damaged-ref-{uuid.uuid4().hex[:12]}"
        envelope = {"ref": plain, "sha256": "0" * 64, "bytes": 1}
        await cold.create(thread, {"notes": {OFFLOADED_KEY: envelope}}, agent_id="damage")
        with pytest.raises(CorruptState):
            await sized.get(thread)
        with pytest.raises(CorruptState):
            await archive.delete(plain)
        assert await cold.get(plain) is not None
