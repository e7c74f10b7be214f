"""An open stream whose reader fell behind the case's log (a slow client: the log dropped
events it had not served yet) ends rather than jump the gap; its client, reconnecting with
the last id it got, is told (410) instead of missing the dropped events without a sign."""

from __future__ import annotations

import pytest

from state.ports import ResumePoint
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


class CountingResumePoints(MemoryEventLog):
    asked = 0

    async def resume_point(self, thread_id: str, after: str) -> ResumePoint:
        self.asked += 1
        return await super().resume_point(thread_id, after)


async def test_events_coming_one_by_one_cost_one_read_each() -> None:
    """The gap check rides on what a read returns: a stream whose events trickle in makes
    one round trip per event, not a read and a check."""
    log = CountingResumePoints()
    events = CaseEvents(log)
    await events.publish("case", "run_started", n=0)
    stream = await events.opened("case", None, seconds=1, caller="reader")
    served = [await anext(stream)]
    for n in range(1, 4):
        await events.publish("case", "node_started", n=n)
        served.append(await anext(stream))
    await stream.aclose()
    assert [event.data["n"] for event in served if event is not None] == [0, 1, 2, 3]
    assert log.asked == 0
