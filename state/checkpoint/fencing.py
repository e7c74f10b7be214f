"""The cold tier's checkpoint fence: the thread's workflow record.

Without a reachable hot tier, what orders a thread's writers over time is the
fence of its workflow record, which every fenced record write raises (a case
run's lease claim included). A checkpoint write is checked against it with one
point read of the record before the cold write; a checkpoint write never raises
it, and a thread with no record is not fenced.
"""

from __future__ import annotations

from ..errors import StaleFencingToken
from ..ports import ColdStateStore


class RecordFence:
    """`CheckpointFence` over a `ColdStateStore` (see the module docstring)."""

    def __init__(self, cold: ColdStateStore) -> None:
        self._cold = cold

    async def admit(self, thread_id: str, fence: int, *, checked: bool = False) -> None:
        # Durable: it never holds nothing for a thread it fences, so `checked` changes nothing.
        record = await self._cold.get(thread_id)
        if record is not None and fence < record.fence:
            raise StaleFencingToken(thread_id, fence, record.fence)
