"""Section writes of one record from one process (`support_cases.records`) take turns, so
parallel writers never spend a refused cold write on each other; over in-memory fakes."""

from __future__ import annotations

import asyncio

from state import SectionWrite, TieredStateStore, WorkflowRecord
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
