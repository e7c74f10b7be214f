"""The cold tier's checkpoint fence: the thread's workflow record.

Without a reachable hot tier, what orders a thread's writers over time is the
fence of its workflow record, which every fenced record write raises (a case
run's lease claim included). A checkpoint write is checked against it with one
point read of the record before the cold write; a checkpoint write never raises
it, and a thread with no record is not fenced.

A record its caller has just created holds fence 0, below every token: the first
check of a new thread is known to pass without the read (`NewRecords`). That is the
check every new thread's first write makes, as Redis holds no fence for it yet.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

from ..errors import StaleFencingToken
from ..ports import ColdStateStore

# Threads remembered as just created, and for how long.
NEW_RECORDS = 10_000
NEW_RECORD_SECONDS = 60.0


class RecordFence:
    """`CheckpointFence` over a `ColdStateStore` (see the module docstring)."""

    def __init__(self, cold: ColdStateStore) -> None:
        self._cold = cold

    async def admit(self, thread_id: str, fence: int, *, checked: bool = False) -> None:
        # Durable: it never holds nothing for a thread it fences, so `checked` changes nothing.
        record = await self._cold.get(thread_id)
        if record is not None and fence < record.fence:
            raise StaleFencingToken(thread_id, fence, record.fence)


class NewRecords:
    """Threads whose record the caller has just created. Their durable checks pass unread
    (`passes`) for the first token checked, within NEW_RECORD_SECONDS, until Redis holds
    the thread's fence (`seeded`): a check after that (Redis lost the fence) reads the
    record, which the run's writes have raised since."""

    def __init__(self) -> None:
        # thread -> (until when, the token it passes: the first one checked)
        self._new: OrderedDict[str, tuple[float, int | None]] = OrderedDict()
        # The sync API's writes check fences from their callers' threads.
        self._lock = threading.Lock()

    def declare(self, thread_id: str) -> None:
        with self._lock:
            self._new[thread_id] = (time.monotonic() + NEW_RECORD_SECONDS, None)
            self._new.move_to_end(thread_id)
            while len(self._new) > NEW_RECORDS:
                self._new.popitem(last=False)

    def passes(self, thread_id: str, fence: int) -> bool:
        with self._lock:
            until, token = self._new.get(thread_id, (0.0, None))
            if time.monotonic() > until or token not in (None, fence):
                self._new.pop(thread_id, None)
                return False
            self._new[thread_id] = (until, fence)
            return True

    def seeded(self, thread_id: str) -> None:
        with self._lock:
            self._new.pop(thread_id, None)
