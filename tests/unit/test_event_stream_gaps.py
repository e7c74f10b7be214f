"""An open stream whose reader fell behind the case's log (a slow client: the log dropped
events it had not served yet) ends rather than jump the gap; its client, reconnecting with
the last id it got, is told (410) instead of missing the dropped events without a sign."""

from __future__ import annotations

import pytest

from support_cases.events import CaseEvents, EventsTrimmed
from tests.support.fakes import MemoryEventLog

KEPT = 150


async def test_a_stream_behind_the_logs_trimming_ends_instead_of_skipping() -> None:
    events = CaseEvents(MemoryEventLog(max_events=KEPT))
    await events.publish("case", "run_started", n=0)
    stream = await events.opened("case", None, seconds=0.5, caller="reader")
    served = [await anext(stream)]
    # The client reads slowly: meanwhile the log drops what the stream has not served.
    for n in range(1, KEPT * 3):
        await events.publish("case", "node_started", n=n)
    served += [event async for event in stream if event is not None]

    numbers = [event.data["n"] for event in served]
    assert numbers == list(range(len(numbers))), f"gap after {numbers[:3]}..."
    assert len(numbers) < KEPT * 3  # the gap was there to jump
    with pytest.raises(EventsTrimmed):
        await events.opened("case", served[-1].id, seconds=0, caller="reader")
