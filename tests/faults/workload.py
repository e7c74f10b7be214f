"""A write workload with an oracle: what was acknowledged must be there, exactly once.

Writers each own one section of a shared record and count 1, 2, 3, ... in it
through the tiered store, the way the app writes (read, then update at that
version, retry on `VersionConflict`). A write whose outcome is unknown (the
store became unavailable mid-call) is reconciled by reading before retrying,
never re-applied blindly. After the fault, the oracle compares:

- lost writes: an acknowledged value not in the cold record at the end, or a
  read right after an acknowledged write that returned an older value;
- silent overwrites: two accepted writes at the same version, or an accepted
  write computed from an outdated copy (its audit `before` is not the value
  the previous write of that section left), i.e. a write nobody was told lost.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TypeVar

from state.errors import BackendUnavailable, VersionConflict
from state.ports import ColdStateStore
from state.tiered import TieredStateStore

from .conftest import Deadline

AGENT_ID = "workload"
T = TypeVar("T")


@dataclass
class WorkloadResult:
    acknowledged: int = 0
    lost_writes: int = 0
    silent_overwrites: int = 0
    stale_reads: int = 0
    unavailable: Counter[str] = field(default_factory=Counter)
    reconciled: int = 0
    slowest_write_s: float = 0.0


class Workload:
    def __init__(
        self, store: TieredStateStore, *, records: int = 3, writers_per_record: int = 3
    ) -> None:
        self.store = store
        prefix = uuid.uuid4().hex[:8]
        self.threads = [f"load-{prefix}-{n}" for n in range(records)]
        self.sections = [f"w{n}" for n in range(writers_per_record)]
        self.acked: dict[tuple[str, str], int] = {}
        self.result = WorkloadResult()

    async def setup(self) -> None:
        for thread_id in self.threads:
            await self.store.create(
                thread_id, {section: 0 for section in self.sections}, agent_id=AGENT_ID
            )

    async def run(self, writes_each: int, deadline: Deadline, pause: float = 0.0) -> None:
        await asyncio.gather(
            *(
                self._writer(thread_id, section, writes_each, deadline, pause)
                for thread_id in self.threads
                for section in self.sections
            )
        )

    async def _writer(
        self, thread_id: str, section: str, count: int, deadline: Deadline, pause: float
    ) -> None:
        for value in range(1, count + 1):
            while True:
                deadline.check(f"writer {thread_id}/{section}")
                try:
                    current = await self.store.get(thread_id)
                    assert current is not None
                    if current.sections[section] >= value:
                        # An earlier attempt whose answer was lost did land.
                        self.result.reconciled += 1
                        break
                    started = time.monotonic()
                    await self.store.update_section(
                        thread_id,
                        section,
                        value,
                        agent_id=AGENT_ID,
                        expected_version=current.version,
                    )
                    self.result.slowest_write_s = max(
                        self.result.slowest_write_s, time.monotonic() - started
                    )
                except VersionConflict:
                    continue
                except BackendUnavailable as unavailable:
                    self.result.unavailable[unavailable.backend] += 1
                    await asyncio.sleep(0.05)
                    continue
                break
            self.acked[(thread_id, section)] = value
            self.result.acknowledged += 1
            await self._read_back(thread_id, section, value, deadline)
            if pause:
                await asyncio.sleep(pause)

    async def _read_back(
        self, thread_id: str, section: str, value: int, deadline: Deadline
    ) -> None:
        while True:
            deadline.check(f"read-back {thread_id}/{section}")
            try:
                seen = await self.store.get(thread_id)
            except BackendUnavailable as unavailable:
                self.result.unavailable[unavailable.backend] += 1
                await asyncio.sleep(0.05)
                continue
            if seen is None or seen.sections[section] < value:
                self.result.stale_reads += 1
            return

    async def verify(self, cold: ColdStateStore) -> WorkloadResult:
        """Count lost and silently overwritten writes against the cold store's record and trail.

        Reads retry a few times on `BackendUnavailable`: a store that just came
        back may still hand out a connection that died with the old server; those
        errors are counted (`unavailable["after recovery"]`), not hidden.
        """
        result = self.result
        result.lost_writes = result.stale_reads
        for thread_id in self.threads:
            record = await self.settled(partial(cold.get, thread_id))
            assert record is not None
            for section in self.sections:
                if record.sections[section] != self.acked.get((thread_id, section), 0):
                    result.lost_writes += 1
            trail = await self.settled(partial(cold.audit_trail, thread_id, limit=10_000))
            versions = Counter(entry.version for entry in trail if entry.section in self.sections)
            result.silent_overwrites += sum(n - 1 for n in versions.values() if n > 1)
            last: dict[str, object] = dict.fromkeys(self.sections, 0)
            for entry in sorted(trail, key=lambda e: e.version):
                if entry.section not in last or entry.version == 1:
                    continue
                if entry.before != last[entry.section]:
                    result.silent_overwrites += 1
                last[entry.section] = entry.after
        return result

    async def settled(self, call: Callable[[], Awaitable[T]], tries: int = 20) -> T:
        for _ in range(tries - 1):
            try:
                return await call()
            except BackendUnavailable:
                self.result.unavailable["after recovery"] += 1
                await asyncio.sleep(0.1)
        return await call()

    async def cleanup(self, cold: ColdStateStore) -> None:
        for thread_id in self.threads:
            await self.settled(partial(cold.delete, thread_id))
