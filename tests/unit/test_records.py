"""Section writes of one record from one process (`support_cases.records`) take turns, so
parallel writers never spend a refused cold write on each other; over in-memory fakes."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from state import SectionWrite, TieredStateStore, WorkflowRecord
from state.errors import StateTooLarge
from support_cases.records import ComputeMany, set_section, write_sections
from tests.support.fakes import MemoryColdStore, memory_backends

CASE = "case-records"
WRITERS = 8


async def test_parallel_writers_of_one_record_never_conflict() -> None:
    async with memory_backends() as backends:
        store = TieredStateStore.from_backends(backends)
        await store.create(CASE, {}, agent_id="test")
        cold = backends.cold
        assert isinstance(cold, MemoryColdStore)
        before = cold.requests.copy()
        read = store.get

        async def get_with_latency(
            thread_id: str, *, fetch_archived: bool = False
        ) -> WorkflowRecord | None:
            record = await read(thread_id, fetch_archived=fetch_archived)
            await asyncio.sleep(0.001)  # a real server's round trip: other writers run here
            return record

        store.get = get_with_latency  # type: ignore[method-assign]

        def both(n: int) -> list[SectionWrite]:
            return [
                SectionWrite(f"pair-{n}-a", n, f"agent-{n}"),
                SectionWrite(f"pair-{n}-b", n, f"agent-{n}"),
            ]

        def still_needed(n: int) -> ComputeMany:
            def compute(record: WorkflowRecord) -> list[SectionWrite]:
                return [w for w in both(n) if record.sections.get(w.section) != w.value]

            return compute

        await asyncio.gather(
            *(
                set_section(store, CASE, f"single-{n}", n, agent_id=f"agent-{n}")
                for n in range(WRITERS)
            ),
            *(write_sections(store, CASE, still_needed(n)) for n in range(WRITERS)),
        )

        record = await store.get(CASE)
        assert record is not None
        assert record.version == 1 + 3 * WRITERS
        assert all(record.sections[f"single-{n}"] == n for n in range(WRITERS))
        assert all(record.sections[f"pair-{n}-b"] == n for n in range(WRITERS))
        # One cold write per writer: none was refused and retried.
        writes = cold.requests - before
        assert writes["update_section"] + writes["update_sections"] == 2 * WRITERS


async def test_sections_shaped_like_envelopes_written_offloaded_come_back_as_written() -> None:
    """A write the cold store refuses as too large goes again with its sections offloaded:
    a caller's value shaped like a compressed envelope is archived as written, not as what
    that envelope would hold."""
    async with memory_backends() as backends:
        store = TieredStateStore.from_backends(backends)
        await store.create(CASE, {}, agent_id="test")
        written = {"$compressed": {"codec": "raw", "bytes": 2, "data": "e30="}}
        update_sections = store.update_sections
        refused: list[bool] = []

        async def refuse_unless_making_room(
            thread_id: str, writes: Sequence[SectionWrite], **kw: Any
        ) -> WorkflowRecord:
            if not kw.get("make_room"):
                refused.append(True)
                raise StateTooLarge("record", 1, 0)
            return await update_sections(thread_id, writes, **kw)

        store.update_sections = refuse_unless_making_room  # type: ignore[method-assign]
        record = await write_sections(store, CASE, lambda _: [SectionWrite("note", written, "t")])

        assert refused, "the write was not refused: the offload path did not run"
        assert record.sections["note"] == written
        fresh = await store.get_fresh(CASE)
        assert fresh is not None and fresh.sections["note"] == written
